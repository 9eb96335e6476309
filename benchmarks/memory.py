"""Memory: the plugin's extra RSS is a fixed multiple of the parameter count and does not grow with steps.

    python -m benchmarks.memory [--steps 20000] [--width 1024]

Runs plain Lightning and the plugin on the MLP example, each in a fresh process, sampling resident memory
every 1000 steps: the eager config (it predicts, rolls back and corrects throughout), the default config
(here it never predicts: dormant for doubling periods after step 220) and monitor-only mode
(``predict_threshold: 1.0``). Prints the samples, the RSS growth after warm-up, and the peak RSS ratio
hybrid / plain next to the expected extra memory: ``bytes(flat dtype) * P * (4 + window + basis_rank - 1)``
(previous parameters, scratch, mean update, rollback snapshot, update window, principal directions) plus
one transient delta of P during Predict. The default config holds 3 P while awake and 1 P (the mean
update) while dormant; monitor-only mode holds none. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import json, os, resource, sys
import lightning as L, torch
from hybrid_lightning import HybridConfig, HybridPredictiveTraining
from hybrid_lightning.examples import MLPRegressor, TeacherStudentDataModule

mode, steps, width, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
page = os.sysconf("SC_PAGE_SIZE")
samples = []

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page

class Sample(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % 1000 == 0:
            samples.append((trainer.global_step, rss()))

callbacks = [Sample()]
if mode == "hybrid":
    cfg = HybridConfig(warmup_steps=200, min_full_steps=20, predict_threshold=0.0, predictor="constant_velocity")
    cfg.bandit.alpha = 5.0  # keep predicting, so every buffer is in use
    callbacks.insert(0, HybridPredictiveTraining(cfg, verbose=False))
elif mode in ("default", "monitor_only"):
    cfg = HybridConfig(predict_threshold=1.0) if mode == "monitor_only" else HybridConfig()
    callbacks.insert(0, HybridPredictiveTraining(cfg, verbose=False))
L.seed_everything(0)
model = MLPRegressor(width=width, depth=3)
params = sum(p.numel() for p in model.parameters())
trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, strategy="auto" if mode == "plain" else "hybrid",
                    callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, TeacherStudentDataModule(batch_size=64, n_train=8192))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
json.dump({"samples": samples, "peak": peak, "params": params}, open(out, "w"))
'''


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--width", type=int, default=1024)
    args = p.parse_args(argv)
    res = {}
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "child.py"
        script.write_text(CHILD)
        for mode in ("plain", "hybrid", "default", "monitor_only"):
            out = Path(d) / f"{mode}.json"
            subprocess.run([sys.executable, str(script), mode, str(args.steps), str(args.width), str(out)],
                           check=True, capture_output=True, timeout=3600)
            res[mode] = json.loads(out.read_text())
    P = res["plain"]["params"]
    expected = 4 * P * 4 + 4 * P  # defaults: window 0, rank 1, float32 flat buffers; + one transient delta
    mb = 1024**2
    print(f"MLP width {args.width}: P = {P:,} parameters ({4 * P / mb:.1f} MB in float32), {args.steps} steps\n")
    print("| step | plain RSS (MB) | eager (MB) | default (MB) | monitor-only (MB) |")
    print("|---|---|---|---|---|")
    for (s, a), (_, b), (_, c), (_, e) in zip(*(res[m]["samples"] for m in ("plain", "hybrid", "default",
                                                                              "monitor_only"))):
        print(f"| {s} | {a / mb:.1f} | {b / mb:.1f} | {c / mb:.1f} | {e / mb:.1f} |")
    hs = [r for s, r in res["hybrid"]["samples"] if s >= 2000]
    ps = [r for s, r in res["plain"]["samples"] if s >= 2000]
    summary = {
        "params": P,
        "peak_ratio": res["hybrid"]["peak"] / res["plain"]["peak"],
        "peak_extra_mb": (res["hybrid"]["peak"] - res["plain"]["peak"]) / mb,
        "expected_extra_mb": expected / mb,
        "hybrid_growth_after_2000_mb": (hs[-1] - hs[0]) / mb if hs else None,
        "plain_growth_after_2000_mb": (ps[-1] - ps[0]) / mb if ps else None,
        # the other configs' extra peak RSS over plain (single samples move by about +-15 MB in every mode)
        **{f"{m}_peak_extra_mb": (res[m]["peak"] - res["plain"]["peak"]) / mb for m in ("default", "monitor_only")},
    }
    print(f"\npeak RSS hybrid / plain = {summary['peak_ratio']:.3f} (+{summary['peak_extra_mb']:.1f} MB; "
          f"expected from the formula: {summary['expected_extra_mb']:.1f} MB)")
    print(f"RSS growth from step 2000 to the end: hybrid {summary['hybrid_growth_after_2000_mb']:+.1f} MB, "
          f"plain {summary['plain_growth_after_2000_mb']:+.1f} MB")
    for m, awake in (("default", 3), ("monitor_only", 0)):
        dormant = f", {4 * P / mb:.1f} MB while dormant" if awake else ""
        print(f"{m}: peak RSS {summary[f'{m}_peak_extra_mb']:+.1f} MB over plain (its buffers: "
              f"{awake * 4 * P / mb:.1f} MB while awake{dormant})")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
