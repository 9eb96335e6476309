"""What does a predicted step really cost? Per-step wall-clock of a hybrid run, split by step kind.

    python -m benchmarks.step_cost [--workloads char_gpt] [--variant dmd_line_search_every24_long]
        [--regime low_lr] [--steps 600] [--repeats 2]

The report's ``cost_ratio`` times the callback's own window (from ``on_train_batch_start`` to the end
of ``on_train_batch_end``). A predicted step costs more than that: Lightning's loop still fetches and
moves its batch and runs its hooks. This benchmark times every step end to end, from one
``on_train_batch_start`` to the next (validation excluded), in a plain run and a hybrid run of the same
workload, interleaved, and splits the hybrid run's steps into:

- ``real``: Full/Correct steps that neither start nor end a Predict phase;
- ``real, starts phase`` / ``real, refused``: the real step whose ``observe`` starts a phase (with a
  line search: its trial forwards) or refuses one;
- ``predicted`` and ``predicted, judged``: predicted steps; the last one carries the phase's probes.

``c (end to end)`` charges to the predicted steps everything the hybrid run spent beyond what its
real steps cost in the plain run: c = (hybrid seconds - real steps x plain seconds per step) /
(predicted steps x plain seconds per step). A predicted step pays when its value q exceeds this c.
Last line: one JSON object per workload.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.regimes import REGIMES
from benchmarks.time_to_loss import HERE, WORKLOADS, load_spec, machine, train
from hybrid_lightning import HybridPredictiveTraining
from hybrid_lightning.core.phases import Phase

KINDS = ("real", "real, starts phase", "real, refused", "predicted", "predicted, judged")


class StepTimer(Callback):
    """Seconds from one ``on_train_batch_start`` to the next, labelled by what the step did."""

    def __init__(self, hybrid: HybridPredictiveTraining | None) -> None:
        self.hybrid = hybrid
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self._t: float | None = None
        self._cuda = False

    def on_train_start(self, trainer, pl_module):
        self._cuda = pl_module.device.type == "cuda"

    def _now(self) -> float:
        if self._cuda:
            # a step's kernels are charged to the step that queued them. This wait also stops the host from
            # queueing the next step while the device runs this one, in the plain run as in the hybrid run:
            # on a GPU both runs are a little slower than without the timer.
            torch.cuda.synchronize()
        return time.perf_counter()

    def _kind(self) -> str:
        report = self.hybrid.last_report if self.hybrid is not None else None
        if report is None:
            return "real"
        if report.phase is Phase.PREDICT:
            return "predicted, judged" if report.phase_result is not None else "predicted"
        if report.phase_result is not None:
            return "real, refused"
        return "real, starts phase" if report.next_phase is Phase.PREDICT else "real"

    def _close(self) -> None:
        if self._t is not None:
            self.seconds[self._kind()].append(self._now() - self._t)
            self._t = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close()
        self._t = self._now()

    def on_validation_start(self, trainer, pl_module):
        self._close()  # the step before validation still counts; the validation itself does not

    def on_train_end(self, trainer, pl_module):
        self._close()


def _timed(spec: dict, kind: str, steps: int, rep: int, hybrid: dict | None, accelerator: str) -> StepTimer:
    timers: list[StepTimer] = []

    def add(cb: HybridPredictiveTraining | None) -> list[Callback]:
        timers.append(StepTimer(cb))
        return timers

    train(spec, kind, steps, spec["lr"], rep, hybrid, accelerator, extra_callbacks=add)
    return timers[0]


def measure(name: str, args: argparse.Namespace) -> dict:
    spec = load_spec(name, args)
    overrides = dict(spec["hybrids"][args.variant] or {})
    overrides.pop("steps_factor", None)
    steps = args.steps or spec["steps"]
    plain: list[float] = []
    hybrid: dict[str, list[float]] = defaultdict(list)
    for rep in range(args.repeats):  # interleaved: plain, hybrid, plain, hybrid
        plain += _timed(spec, "baseline", steps, rep, None, args.accelerator).seconds["real"]
        timer = _timed(spec, f"hybrid:{args.variant}", steps, rep, overrides, args.accelerator)
        for kind, xs in timer.seconds.items():
            hybrid[kind] += xs
    unit = statistics.fmean(plain)
    total = sum(sum(xs) for xs in hybrid.values())
    n_real = sum(len(hybrid[k]) for k in ("real", "real, starts phase", "real, refused"))
    n_pred = sum(len(hybrid[k]) for k in ("predicted", "predicted, judged"))
    rows = {k: {"steps": len(hybrid[k]), "mean_ms": 1e3 * statistics.fmean(hybrid[k]),
                "median_ms": 1e3 * statistics.median(hybrid[k]), "seconds": sum(hybrid[k]),
                "vs_plain_step": statistics.fmean(hybrid[k]) / unit} for k in KINDS if hybrid[k]}
    c = (total - n_real * unit) / (n_pred * unit) if n_pred else None
    return {"workload": name, "variant": args.variant, "regime": args.regime, "steps": steps,
            "repeats": args.repeats, "plain_step_ms": 1e3 * unit, "plain_median_ms": 1e3 * statistics.median(plain),
            "hybrid_seconds": total, "plain_seconds": sum(plain), "plain_steps": len(plain),
            "real_steps": n_real, "predicted_steps": n_pred,
            "kinds": rows, "c_end_to_end": c, "machine": machine(args)}


def table(results: list[dict]) -> str:
    lines = ["| workload | step kind | steps | mean ms | median ms | vs a plain step | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['workload']} | plain run, every step | {r['plain_steps']} | "
                     f"{r['plain_step_ms']:.2f} | {r['plain_median_ms']:.2f} | 1.00 | {r['plain_seconds']:.1f} |")
        for kind, row in r["kinds"].items():
            lines.append(f"| {r['workload']} | {kind} | {row['steps']} | {row['mean_ms']:.2f} | "
                         f"{row['median_ms']:.2f} | {row['vs_plain_step']:.2f} | {row['seconds']:.1f} |")
        c = "n/a (nothing predicted)" if r["c_end_to_end"] is None else f"{r['c_end_to_end']:.2f}"
        lines.append(f"| {r['workload']} | **c (end to end)** | {r['predicted_steps']} predicted | | | **{c}** | "
                     f"{r['hybrid_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["char_gpt"], choices=WORKLOADS)
    p.add_argument("--variant", default="dmd_line_search_every24_long", help="hybrid variant of the workload YAML")
    p.add_argument("--regime", default="low_lr", choices=REGIMES)
    p.add_argument("--steps", type=int, default=0, help="steps per run (0: the workload's)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results" / "step_cost")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [measure(w, args) for w in args.workloads]
    command = "python -m benchmarks.step_cost " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    md = f"Command: `{command.strip()}`  \nMachine: {results[0]['machine']}\n\n{table(results)}\n"
    (args.out / "step_cost.md").write_text(md)
    print("\n" + md)
    for r in results:
        print(json.dumps(r))
    return results


if __name__ == "__main__":
    main()
