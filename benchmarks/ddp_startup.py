"""DDP start-up cost of the plugin: plain ``ddp`` vs ``hybrid_ddp`` on 2 CPU processes (gloo), interleaved.

    python -m benchmarks.ddp_startup [--repeats 3] [--steps 200]

Measures, on rank 0: seconds from process start to the first training batch, and seconds per optimizer
step after that. ``hybrid_ddp_off`` is the plugin with predict_threshold=1.0 (monitoring only);
``hybrid_ddp`` is the default config (the dynamics model trains; it may predict).
Prints a Markdown table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r'''
import json, sys, time
T0 = time.perf_counter()
from datetime import timedelta
import lightning as L, torch
from lightning.pytorch.strategies import DDPStrategy
from hybrid_lightning import HybridConfig, HybridDDPStrategy, HybridPredictiveTraining
from hybrid_lightning.examples import MLPRegressor, TeacherStudentDataModule

mode, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
marks = {}

class Clock(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            marks["first_batch"] = time.perf_counter() - T0
        if trainer.global_step == 20:
            marks["t20"] = time.perf_counter()
    def on_train_end(self, trainer, pl_module):
        marks["per_step"] = (time.perf_counter() - marks["t20"]) / (trainer.global_step - 20)
        if trainer.global_rank == 0:
            json.dump(marks, open(out, "w"))

kw = dict(process_group_backend="gloo", timeout=timedelta(seconds=120))
callbacks = [Clock()]
if mode.startswith("hybrid_ddp"):
    strategy = HybridDDPStrategy(**kw)
    config = HybridConfig(predict_threshold=1.0) if mode == "hybrid_ddp_off" else HybridConfig()
    callbacks.insert(0, HybridPredictiveTraining(config, verbose=False))
else:
    strategy = DDPStrategy(**kw)
L.seed_everything(0)
trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=2, strategy=strategy, callbacks=callbacks,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, num_sanity_val_steps=0)
trainer.fit(MLPRegressor(width=256), TeacherStudentDataModule(batch_size=128))
'''


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    rows: dict[str, list[dict]] = {"ddp": [], "hybrid_ddp_off": [], "hybrid_ddp": []}
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "child.py"
        script.write_text(CHILD)
        for r in range(args.repeats):
            for mode in rows:  # interleaved: machine noise hits all alike
                out = Path(d) / f"{mode}{r}.json"
                t = time.perf_counter()
                subprocess.run([sys.executable, str(script), mode, str(args.steps), str(out)], check=True,
                               capture_output=True, timeout=600)
                m = json.loads(out.read_text())
                m["wall"] = time.perf_counter() - t
                rows[mode].append(m)
    med = {mode: {k: statistics.median(m[k] for m in ms) for k in ("first_batch", "per_step", "wall")}
           for mode, ms in rows.items()}
    print("| strategy (2 CPU processes, gloo) | to first batch (s) | ms per step | whole run (s) |")
    print("|---|---|---|---|")
    for mode, m in med.items():
        print(f"| {mode} | {m['first_batch']:.2f} | {1000 * m['per_step']:.2f} | {m['wall']:.1f} |")
    base = med["ddp"]
    result = {"repeats": args.repeats, "steps": args.steps}
    for mode in ("hybrid_ddp_off", "hybrid_ddp"):
        result[f"{mode}_first_batch_extra_s"] = med[mode]["first_batch"] - base["first_batch"]
        result[f"{mode}_per_step_ratio"] = med[mode]["per_step"] / base["per_step"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
