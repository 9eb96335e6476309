"""Research: can a run judge its own jumps? Blocks with and without jumps, compared inside one run.

    python -m benchmarks.jump_judge                        # all workloads, tuned LR, 24:32, blocks of 48 steps
    python -m benchmarks.jump_judge --regime low_lr --workloads mlp

The one-batch probe right after a jump rolls every drift jump back, also where the jumps leave the run
far better off at its end (benchmarks.jump_sweep --guarded). A judge of lasting value needs a
counterfactual, and a fork costs as many extra steps as it judges. This one is free: after warmup the
run alternates blocks of ``--block`` steps in which the workload's one-step jumps (K:gain as in
benchmarks.jump_sweep, unguarded) may happen and blocks in which none may, in the order J N N J (so a
linear trend in the progress per block cancels), and records the loss on 4 fixed validation batches at
every block boundary. Per J N N J group, d = (progress of the two J blocks - progress of the two N blocks)
/ 2; the judge's evidence is the mean of d over the groups against its standard error. A jump's value
that shows only blocks later leaks into the N blocks after it, so this sees less than all of it.
Reported next to the final val of this half-jumping run and of plain training: what the judge would
have had to see. Writes ``<out>/jump_judge.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.jump_sweep import jump_config, point
from benchmarks.predictor_value import fixed_loss, val_batches
from benchmarks.regimes import REGIMES
from benchmarks.time_to_loss import HERE, WORKLOADS, load_spec, train

PATTERN = "JNNJ"


class BlockSchedule(Callback):
    """From step ``start`` on, blocks of ``block`` steps in the order J N N J: no step of an N block is predicted;
    at each block boundary, the loss of ``batches`` fixed validation batches. The engine decides at the end of a
    step whether the next one is predicted, with the step limit set at that step's start, so the limit follows
    the block of the step after it (held at the engine's step: no phase). Runs before
    :class:`HybridPredictiveTraining` in the callback list."""

    def __init__(self, hybrid, start: int, block: int, batches: int = 4) -> None:
        self.hybrid, self.start, self.block, self.batches = hybrid, start, block, batches
        self.points: list[tuple[int, float]] = []  # (step, fixed-batch loss) at every block boundary
        self._val: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        engine, g = self.hybrid.engine, trainer.global_step
        if engine is None or g < self.start:
            return
        if (g - self.start) % self.block == 0:
            if not self._val:
                self._val = val_batches(trainer, self.batches)
            self.points.append((g, fixed_loss(pl_module, self._val)))
        jumps = PATTERN[(g + 1 - self.start) // self.block % len(PATTERN)] == "J"  # may step g + 1 be predicted?
        engine.step_limit = engine.step + trainer.max_steps - g if jumps else engine.step


def judge(points: list[tuple[int, float]]) -> dict:
    """Per complete J N N J group of blocks, d = (J progress - N progress) / 2; their mean, standard error and
    t, and the N blocks' mean progress (the scale of d)."""
    losses = [v for _, v in points]
    progress = [a - b for a, b in zip(losses, losses[1:])]
    groups = [progress[i:i + 4] for i in range(0, len(progress) - 3, 4)]
    d = [(g[0] + g[3] - g[1] - g[2]) / 2 for g in groups]
    n_prog = [x for g in groups for x in (g[1], g[2])]
    out = {"groups": len(d), "d": d, "mean_d": None, "se": None, "t": None,
           "n_progress": statistics.fmean(n_prog) if n_prog else None}
    if len(d) >= 2:
        out["mean_d"] = statistics.fmean(d)
        out["se"] = statistics.stdev(d) / math.sqrt(len(d))
        out["t"] = out["mean_d"] / out["se"] if out["se"] > 0 else None
    return out


def verdict(t: float | None, threshold: float = 2.0) -> str:
    if t is None:
        return "no evidence"
    return "jumps pay" if t >= threshold else "jumps harm" if t <= -threshold else "not shown"


def _f(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def table(rows: list[dict], args: argparse.Namespace) -> str:
    k, gain = args.point
    lines = [f"Seed {args.seed}, regime {args.regime}, jumps {k}:{gain:g} in blocks of {args.block} steps (J N N J); "
             "d per group = (progress of J blocks - N blocks) / 2 on 4 fixed validation batches.", "",
             "| workload | groups | mean d | N blocks' mean progress | t | verdict (t beyond ±2) | final val: plain / "
             "half-jumping |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        j = r["judge"]
        lines.append(f"| {r['workload']} | {j['groups']} | {_f(j['mean_d'], '+.5f')} | {_f(j['n_progress'], '.5f')} "
                     f"| {_f(j['t'], '+.2f')} | {verdict(j['t'])} | {r['plain']:.4f} / {r['blocks']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--point", type=point, default=(24, 32.0), metavar="K:GAIN")
    p.add_argument("--block", type=int, default=48, help="steps per block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--regime", default="adamw_cosine", choices=REGIMES)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.workloads:
        spec = load_spec(name, args)
        n, lr = spec["steps"], spec["lr"]
        cfg = jump_config(name, *args.point, args.quick)
        sched: list[BlockSchedule] = []

        def blocks(cb, cfg=cfg, sched=sched) -> list[Callback]:
            sched.append(BlockSchedule(cb, cfg["warmup_steps"], args.block))
            return sched[-1:]

        plain = train(spec, "baseline", n, lr, 0, None, "cpu", seed=args.seed)
        half = train(spec, "hybrid:blocks", n, lr, 0, cfg, "cpu", seed=args.seed, extra_callbacks=blocks)
        rows.append({"workload": name, "plain": plain.final_val, "blocks": half.final_val,
                     "backward_passes": half.backward_passes, "points": sched[0].points,
                     "judge": judge(sched[0].points)})
        print(f"[{name}] plain {plain.final_val:.4f}, half-jumping {half.final_val:.4f}, "
              f"judge t {rows[-1]['judge']['t']}", flush=True)
    (args.out / "jump_judge.json").write_text(json.dumps({"seed": args.seed, "regime": args.regime,
                                                          "point": list(args.point), "block": args.block,
                                                          "rows": rows}, indent=1))
    md = table(rows, args)
    (args.out / "jump_judge.md").write_text(md)
    print(md)
    return rows


if __name__ == "__main__":
    main()
