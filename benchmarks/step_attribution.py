"""Does the overhead budget see what observing costs? Every step timed from outside, the device drained.

    python -m benchmarks.step_attribution [--workloads mlp cnn] [--steps 1000] [--repeats 2] [--accelerator cuda]

Per workload, interleaved: plain Lightning and the plugin in one mode (default ``never_confident``: the
default config, never confident enough to predict). A callback placed after the plugin drains the device at
every step's end and times each step, end to end; each step carries the label the engine gave it for its
overhead budget (``plain``, ``observe``, ``other``). The run's extra time over plain training then splits into

- monitoring: the plugin's plain-labelled steps against plain training's median step;
- observation: its observe-labelled steps above its own plain-labelled median (what the budget charges);

and the observation part, as a share of the run's time, is set beside the share the plugin measured itself
(``observe_share``). Draining the device every step removes the CPU/GPU overlap from both runs alike: the
ratios here are not the ones ``benchmarks.overhead`` reports, but each step's time includes its device work.
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

from benchmarks.overhead import MODES
from benchmarks.time_to_loss import HERE, WORKLOADS, _load
from hybrid_lightning import HybridConfig, HybridPredictiveTraining

SKIP = 50


class StepTimes(Callback):
    """Each step's wall time (device drained at its end) and the engine's budget label for it."""

    def __init__(self, hybrid: HybridPredictiveTraining | None) -> None:
        self.hybrid, self.times, self.kinds, self._t = hybrid, [], [], 0.0

    def _now(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self._t = self._now(pl_module)
        if self.hybrid is not None:
            engine = self.hybrid.engine
            record = engine.record_seconds

            def labelled(seconds: float) -> None:
                self.kinds.append(engine._last_kind)
                record(seconds)

            engine.record_seconds = labelled

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = self._now(pl_module)
        self.times.append(now - self._t)
        self._t = now
        if self.hybrid is None:
            self.kinds.append("plain")


def timed_run(spec: dict, steps: int, hybrid: dict | None, accelerator: str) -> tuple[list[float], list[str], float]:
    """-> per-step seconds and labels (after SKIP warm-up steps), and the plugin's own observe_share."""
    L.seed_everything(0, verbose=False)
    model = _load(spec["model"])(**spec["model_args"], lr=spec["lr"], total_steps=0)
    data = _load(spec["data"])(**spec["data_args"])
    cb = HybridPredictiveTraining(HybridConfig.from_dict(hybrid), verbose=False) if hybrid is not None else None
    tap = StepTimes(cb)
    L.Trainer(max_steps=steps, accelerator=accelerator, devices=1, strategy="hybrid" if cb else "auto",
              callbacks=([cb] if cb else []) + [tap], limit_val_batches=0, num_sanity_val_steps=0, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(model, data)
    return tap.times[SKIP:], tap.kinds[SKIP:], (cb.report.observe_share if cb else 0.0)


def split(plain: list[float], times: list[float], kinds: list[str]) -> dict:
    """The plugin run's extra time over plain training, by kind of step, as shares of the plugin run's time."""
    total = sum(times)
    base = statistics.median(plain)
    own = [t for t, k in zip(times, kinds, strict=True) if k == "plain"]
    own_base = statistics.median(own) if own else base
    observe = sum(max(0.0, t - own_base) for t, k in zip(times, kinds, strict=True) if k == "observe")
    return {"extra": (total - len(times) * statistics.fmean(plain)) / total,
            "monitoring": len(own) * (own_base - base) / total, "observation": observe / total,
            "steps": {k: kinds.count(k) for k in ("plain", "observe", "other")}}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--mode", default="never_confident", choices=list(MODES)[1:])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = []
    for name in args.workloads:
        spec = yaml.safe_load((HERE / "workloads" / f"{name}.yaml").read_text())
        rows = []
        for _ in range(args.repeats):  # interleaved
            plain, _, _ = timed_run(spec, args.steps, None, args.accelerator)
            times, kinds, share = timed_run(spec, args.steps, MODES[args.mode], args.accelerator)
            rows.append({**split(plain, times, kinds), "plugin_observe_share": share,
                         "plain_ms": 1000 * statistics.median(plain)})
        row = {"workload": name, "mode": args.mode, "repeats": rows}
        print(json.dumps(row), flush=True)
        out.append(row)
    print(f"\n{args.steps} steps, device drained every step; shares of the plugin run's time, per repeat.\n")
    print("| workload | plain ms/step | extra over plain | monitoring | observation (measured here) | "
          "observation (plugin's own observe_share) |")
    print("|---|---|---|---|---|---|")
    for x in out:
        cells = [" / ".join(f"{100 * r[k]:.1f}%" for r in x["repeats"])
                 for k in ("extra", "monitoring", "observation", "plugin_observe_share")]
        ms = statistics.median(r["plain_ms"] for r in x["repeats"])
        print(f"| {x['workload']} | {ms:.2f} | " + " | ".join(cells) + " |")
    return out


if __name__ == "__main__":
    main()
