"""Per-step cost of having the plugin installed when it does not predict, vs the plain Trainer.

    python -m benchmarks.overhead [--steps 1000] [--repeats 3] [--accelerator cuda]

Per workload, interleaved: plain Lightning; the plugin with ``predict_threshold=1.0`` (prediction
impossible: the engine only monitors); the plugin with the default config but
``predict_threshold=0.999`` (never confident enough to predict, so after ``min_full_steps +
bandit.dormant_after`` steps it goes dormant for doubling periods); and the same with dormancy off
(``dormant_after=0``: trajectory reads and dynamics-model training on every observation, all run
long). Per-step wall time after 50 warm-up steps, no validation. Target for the first ratio:
<= 1.03. Last lines: one JSON object per workload.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from benchmarks.time_to_loss import HERE, WORKLOADS, _load
from hybrid_lightning import HybridConfig, HybridPredictiveTraining

MODES = {"plain": None, "monitor_only": {"predict_threshold": 1.0}, "never_confident": {"predict_threshold": 0.999},
         "never_dormant": {"predict_threshold": 0.999, "bandit": {"dormant_after": 0}}}


class StepClock(Callback):
    def __init__(self, skip: int = 50) -> None:
        self.skip, self.t0, self.per_step = skip, None, float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.skip:
            _sync(pl_module)
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        _sync(pl_module)
        self.per_step = (time.perf_counter() - self.t0) / (trainer.global_step - self.skip)


def _sync(pl_module) -> None:
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


def per_step(spec: dict, steps: int, hybrid: dict | None, accelerator: str = "cpu") -> float:
    L.seed_everything(0, verbose=False)
    model = _load(spec["model"])(**spec["model_args"], lr=spec["lr"], total_steps=0)
    data = _load(spec["data"])(**spec["data_args"])
    clock = StepClock()
    callbacks: list = [clock]
    if hybrid is not None:
        callbacks.append(HybridPredictiveTraining(HybridConfig.from_dict(hybrid), verbose=False))
    L.Trainer(max_steps=steps, accelerator=accelerator, devices=1, strategy="hybrid" if hybrid is not None else "auto",
              callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(model, data)
    return clock.per_step


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = []
    for name in args.workloads:
        spec = yaml.safe_load((HERE / "workloads" / f"{name}.yaml").read_text())
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(args.repeats):
            for mode, hybrid in MODES.items():  # interleaved
                times[mode].append(per_step(spec, args.steps, hybrid, args.accelerator))
        med = {m: statistics.median(t) for m, t in times.items()}
        out.append({"workload": name, "plain_ms": 1000 * med["plain"],
                    "monitor_only_ratio": med["monitor_only"] / med["plain"],
                    "never_confident_ratio": med["never_confident"] / med["plain"],
                    "never_dormant_ratio": med["never_dormant"] / med["plain"]})
    print(f"{args.steps} steps; ratios of per-step wall time to plain Lightning, medians of {args.repeats} "
          "interleaved repeats.\n")
    print("| workload | plain ms/step | threshold 1.0 (monitor only) | default, never confident | "
          "same, dormant_after 0 |")
    print("|---|---|---|---|---|")
    for x in out:
        print(f"| {x['workload']} | {x['plain_ms']:.2f} | {x['monitor_only_ratio']:.3f}x | "
              f"{x['never_confident_ratio']:.3f}x | {x['never_dormant_ratio']:.3f}x |")
    for x in out:
        print(json.dumps(x))
    return out


if __name__ == "__main__":
    main()
