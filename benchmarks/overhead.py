"""Per-step cost of having the plugin installed when it does not predict, vs the plain Trainer.

    python -m benchmarks.overhead [--steps 1000] [--repeats 3] [--accelerator cuda]

Per workload, interleaved: plain Lightning; the plugin with ``predict_threshold=1.0`` (prediction
impossible: the engine only monitors); the plugin with the default config but
``predict_threshold=0.999`` (never confident enough to predict, so after ``min_full_steps +
bandit.dormant_after`` steps it goes dormant for doubling periods, lengthened where observing took
more than ``bandit.overhead_budget`` of the time); the same without the budget
(``overhead_budget: null``); and with dormancy off (``dormant_after=0``: trajectory reads and
dynamics-model training on every observation, all run long). Per-step wall time after 50 warm-up
steps, no validation. Target for the first ratio: <= 1.03. ``--modes`` runs a subset. Last lines: one
JSON object per workload, with the plugin's own measured observation share where it ran.

Modes ``monitor_read_late`` and ``never_confident_read_late`` (not in the default set) are the first two
with ``idle_read_every: 16``: while the engine only monitors, losses are read to the host 16 steps at a
time instead of on every step (a device sync on a GPU). Against the first two they measure what that
sync costs.
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
         "no_budget": {"predict_threshold": 0.999, "bandit": {"overhead_budget": None}},
         "never_dormant": {"predict_threshold": 0.999, "bandit": {"dormant_after": 0}},
         "monitor_read_late": {"predict_threshold": 1.0, "idle_read_every": 16},
         "never_confident_read_late": {"predict_threshold": 0.999, "idle_read_every": 16}}
TITLES = {"monitor_only": "threshold 1.0 (monitor only)", "never_confident": "default, never confident",
          "no_budget": "same, no overhead budget", "never_dormant": "same, dormant_after 0",
          "monitor_read_late": "monitor only, losses read 16 at a time",
          "never_confident_read_late": "never confident, losses read 16 at a time"}
DEFAULT_MODES = ["monitor_only", "never_confident", "no_budget", "never_dormant"]


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


def per_step(spec: dict, steps: int, hybrid: dict | None, accelerator: str = "cpu") -> tuple[float, dict]:
    """-> seconds per step, and the plugin's report (empty without the plugin)."""
    L.seed_everything(0, verbose=False)
    model = _load(spec["model"])(**spec["model_args"], lr=spec["lr"], total_steps=0)
    data = _load(spec["data"])(**spec["data_args"])
    clock = StepClock()
    callbacks: list = [clock]
    cb = HybridPredictiveTraining(HybridConfig.from_dict(hybrid), verbose=False) if hybrid is not None else None
    if cb is not None:
        callbacks.append(cb)
    L.Trainer(max_steps=steps, accelerator=accelerator, devices=1, strategy="hybrid" if hybrid is not None else "auto",
              callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(model, data)
    report = {} if cb is None else {"observe_share": cb.report.observe_share,
                                    "budget_extensions": cb.report.budget_extensions,
                                    "dormant_steps": cb.report.dormant_steps}
    return clock.per_step, report


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES)[1:],
                   help=f"plugin modes to compare with plain Lightning (default: {' '.join(DEFAULT_MODES)})")
    args = p.parse_args(argv)
    modes = {"plain": None, **{m: MODES[m] for m in args.modes}}
    torch.set_num_threads(1)
    out = []
    for name in args.workloads:
        spec = yaml.safe_load((HERE / "workloads" / f"{name}.yaml").read_text())
        times: dict[str, list[float]] = {m: [] for m in modes}
        reports: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode, hybrid in modes.items():  # interleaved
                seconds, report = per_step(spec, args.steps, hybrid, args.accelerator)
                times[mode].append(seconds)
                reports[mode].append(report)
        med = {m: statistics.median(t) for m, t in times.items()}
        row = {"workload": name, "plain_ms": 1000 * med["plain"]}
        row.update({f"{m}_ratio": med[m] / med["plain"] for m in args.modes})
        # each repeat against the plain run of the same repeat: their spread is this machine's noise
        row.update({f"{m}_ratios": [t / p for t, p in zip(times[m], times["plain"], strict=True)] for m in args.modes})
        row.update({f"{m}_observe_share": statistics.median(r["observe_share"] for r in reports[m])
                    for m in args.modes})
        row.update({f"{m}_budget_extensions": [r["budget_extensions"] for r in reports[m]] for m in args.modes})
        print(json.dumps(row), flush=True)
        out.append(row)
    print(f"\n{args.steps} steps; ratios of per-step wall time to plain Lightning, medians of {args.repeats} "
          "interleaved repeats (in brackets: the lowest and highest ratio of a repeat to its own plain run).\n")
    print("| workload | plain ms/step | " + " | ".join(TITLES[m] for m in args.modes) + " |")
    print("|---|---|" + "---|" * len(args.modes))
    for x in out:
        print(f"| {x['workload']} | {x['plain_ms']:.2f} | " + " | ".join(
            f"{x[m + '_ratio']:.3f}x ({min(x[m + '_ratios']):.2f}–{max(x[m + '_ratios']):.2f})" for m in args.modes)
              + " |")
    return out


if __name__ == "__main__":
    main()
