"""Partial prediction (issue 7): predict only the first layers, train the rest for real.

    python -m benchmarks.partial_predict [--workloads mlp cnn char_gpt] [--seeds 0 1] [--variants ...]
        [--prefix NAME ...] [--full 24] [--partial 16] [--steps-factor 1.0] [--lr LR] [--between FROM UNTIL]
        [--out DIR]

Backward stops at the first parameter that needs a gradient, so a step whose first layers get a
predicted delta instead of a gradient costs less than a full step (the table's ``c``: the run's extra
wall-clock over its full steps at the baseline's price, per partial step, relative to a baseline step).
If the first layers' motion were predictable, such a step would be worth nearly a real one for less.

Variants, all in the same Lightning harness as ``time_to_loss`` (same seeds, data order, evaluations):

- ``baseline``: plain training at the tuned LR; ``control_0.8`` / ``control_0.7``: plain training for
  80% / 70% of the steps with the schedule compressed (the equal-compute control);
- ``windows_null``: after 10% warmup, 24 full steps then 16 partial steps, repeated; the prefix stands
  still during partial steps (predicted delta 0, Adam state untouched);
- ``windows_mean_velocity``: the same, the prefix moves each partial step by ``--gain`` times its mean
  displacement per step between the oldest and the newest of its last 7 snapshots (taken every 4 full
  steps, so the span crosses the previous partial window when a full window is shorter than 28 steps),
  scaled by the LR ratio. The first version divided the displacement by 24 steps whatever the span (40
  steps for 24 + 16 and 16 + 16 windows, 72 for 8 + 16 and 24 + 48), so it moved 5/3 (or 3) times the
  mean velocity; ``--gain 1.667`` reproduces it for 24 + 16 and 16 + 16 windows (the results README says
  which folders ran with it);
- ``windows_mean_velocity_guarded``: the same, judged at each window's end by a paired probe: the loss of
  the window's last batch (no grad, eval mode) with the prefix where the prediction took it and where the
  window started, the rest as trained; the lower one stays (a prefix-only rollback, 2 forwards per window);
- ``windows_mean_velocity_adaptive``: the same, but each window slot runs partial or full steps as chosen by
  what lasts: the progress of a cycle (window slot + the next full stretch) is the drop in mean training
  loss from the full stretch before the slot to the one after, per second. Slots are measured in ABBA blocks
  (partial, full, full, partial: a linear trend cancels), then the block's winner runs the next 4 slots;
  the sum of the blocks' differences so far picks the winner;
- ``late_null``: the prefix stands still for the second half of training (progressive freezing, as in
  FreezeOut);
- ``prefix_lr_0.5`` (any factor): a control, no partial steps: every step is a real one, but inside the
  windowed range (after warmup, within ``--between``) the prefix's AdamW step is scaled by the factor, i.e.
  its LR is. If the windows' gain came from moving the first layers with less noise (a lower noise
  temperature), a lower LR for them would give it too, at full cost.

``--prefix-lr X`` scales the prefix's real steps by X inside the windowed range (or within
``--prefix-lr-between``) in every variant, the baseline and controls included, so the partial variants
are compared with a baseline whose first layers' LR is tuned too.

Prints one line per run, then writes every run to ``DIR/partial_predict.json`` and a table (per seed, with
medians of ``c`` and of the wall-clock ratio) to ``DIR/partial_predict.md``. Only ``_guarded`` judges a window,
and only ``_adaptive`` chooses between partial and full steps; ``docs/predictors.md`` says how both fared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from benchmarks.layer_lr import WARMUP, ScaledPrefixStep, prefix_params, windowed
from benchmarks.time_to_loss import HERE, Point, Run, load_spec, machine, time_to, train

PREFIX = {  # the first layers of each workload's model, by parameter-name prefix
    "mlp": ("net.0.", "net.2."),
    "cnn": ("features.",),
    "char_gpt": ("wte.", "wpe.", "blocks.0."),
}
VARIANTS = ("baseline", "control_0.8", "control_0.7", "windows_null", "windows_mean_velocity", "late_null")
# the _guarded and _adaptive variants are not in the default set: they came after the default set's runs
FULL, PARTIAL, SNAP_EVERY, SNAPS = 24, 16, 4, 7


class PartialPredict(Callback):
    """Freezes the prefix's parameters on partial steps and, with ``mean_velocity``, moves them."""

    def __init__(self, prefix: tuple[str, ...], schedule: str, mean_velocity: bool, full: int = FULL,
                 partial: int = PARTIAL, guarded: bool = False, adaptive: bool = False,
                 between: tuple[float, float] = (0.0, 1.0), gain: float = 1.0) -> None:
        self.prefix, self.schedule, self.mean_velocity, self.gain = prefix, schedule, mean_velocity, gain
        self.full, self.partial, self.guarded, self.between = full, partial, guarded, between
        self.partial_steps = self.windows = self.rolled_back = 0
        self._start: list[torch.Tensor] = []  # the prefix where the window started (guarded only)
        self.adaptive, self.slots, self.partial_slots = adaptive, 0, 0
        self._arm = True  # the next slot runs partial steps
        self._losses: list[float] = []  # training losses of the current full stretch
        self._before: tuple[float, float] | None = None  # (mean loss before a measured slot, its start time)
        self._rates: list[float] = []  # progress per second of the current ABBA block's slots, in order
        self._edge = 0.0  # sum over measured blocks of (partial - full) progress per second
        self._frozen = False
        self._step = 0
        self._snaps: list[tuple[int, float, list[torch.Tensor]]] = []  # (step, lr, prefix copies)

    def _params(self, module) -> list[torch.nn.Parameter]:
        return prefix_params(module, self.prefix)

    def _partial(self, t: int, total: int) -> bool:
        if self.schedule == "late":
            return t >= total // 2
        return windowed(t, total, self.between) and (t - int(WARMUP * total)) % (self.full + self.partial) >= self.full

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step
        frozen = self._partial(self._step, trainer.max_steps) and (self._arm or not self.adaptive)
        if frozen != self._frozen:
            for p in self._params(pl_module):
                p.requires_grad_(not frozen)  # grad stays None, so AdamW skips them and keeps their state
            self._frozen = frozen
            if frozen and self.guarded:
                self._start = [p.detach().clone() for p in self._params(pl_module)]

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        if self.adaptive:
            self._track(trainer, outputs)
        if self._frozen:
            self.partial_steps += 1
            if self.mean_velocity and len(self._snaps) >= 2:
                (t0, _, first), (t1, last_lr, last) = self._snaps[0], self._snaps[-1]
                for p, a, b in zip(self._params(pl_module), first, last):
                    p.add_(b - a, alpha=self.gain * lr / last_lr / (t1 - t0))
            if self._step + 1 == trainer.max_steps or not self._partial(self._step + 1, trainer.max_steps):
                self.windows += 1
                if self.guarded:
                    self._judge(pl_module, batch)
        elif self._step % SNAP_EVERY == 0:
            self._snaps.append((self._step, lr, [p.detach().clone() for p in self._params(pl_module)]))
            del self._snaps[:-SNAPS]

    def _track(self, trainer, outputs) -> None:
        """Adaptive: measures each slot's lasting progress per second and picks the next slot's arm."""
        total = trainer.max_steps
        if self._partial(self._step, total) or self._step < int(WARMUP * total):
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._losses.append(float(loss))
        if not self._partial(self._step + 1, total) or self._step + 1 == total:
            return
        # a full stretch ends and a slot begins
        now, mean = time.perf_counter(), statistics.fmean(self._losses)
        self._losses = []
        if self._before is not None:
            before, t0 = self._before
            self._rates.append((before - mean) / (now - t0))
        if len(self._rates) == 4:  # an ABBA block is complete
            r = self._rates
            self._edge += (r[0] + r[3] - r[1] - r[2]) / 2
            self._rates = []
        # slots 0-3 of every 8 measure (partial, full, full, partial); slots 4-7 run the winner so far
        k = self.slots % 8
        self._arm = (k in (0, 3)) if k < 4 else self._edge > 0
        self._before = (mean, now) if k < 4 else None
        self.slots += 1
        self.partial_slots += self._arm

    @torch.no_grad()
    def _judge(self, module, batch) -> None:
        """Keeps the prefix where the prediction took it only if the probe loss is lower there."""
        training = module.training
        module.eval()  # no dropout: both probes see the same function of the weights
        params = self._params(module)
        predicted = probe_loss(module, batch)
        moved = [p.detach().clone() for p in params]
        for p, s in zip(params, self._start):
            p.copy_(s)
        if probe_loss(module, batch) > predicted:
            for p, m in zip(params, moved):
                p.copy_(m)
        else:
            self.rolled_back += 1
        module.train(training)


def train_loss(module: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The workloads' training loss: cross-entropy for class targets, MSE for real-valued ones."""
    x, y = batch
    out = module(x)
    if y.is_floating_point():
        return F.mse_loss(out, y)
    return F.cross_entropy(out.reshape(-1, out.size(-1)), y.reshape(-1))


def probe_loss(module: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """:func:`train_loss` as a number."""
    return train_loss(module, batch).item()


def run_variant(spec: dict, name: str, variant: str, seed: int,
                args: argparse.Namespace) -> tuple[Run, PartialPredict | ScaledPrefixStep | None]:
    steps, lr = spec["steps"], args.lr or spec["lr"]
    if variant.startswith("control_"):
        steps = round(steps * float(variant.split("_")[1]))
    cb, prefix = None, tuple(args.prefix) if args.prefix else PREFIX[name]
    scaled_range = tuple(args.prefix_lr_between or args.between)
    scaled = [ScaledPrefixStep(prefix, args.prefix_lr, scaled_range)] if args.prefix_lr != 1.0 else []
    if variant.startswith("prefix_lr_"):
        if scaled:
            raise ValueError(f"{variant} and --prefix-lr both scale the prefix's steps: use one")
        cb = ScaledPrefixStep(prefix, float(variant.split("_")[-1]), tuple(args.between))
    elif variant.startswith(("windows", "late")):
        steps = round(steps * args.steps_factor)  # the schedule stretches with the run
        cb = PartialPredict(prefix, variant.split("_")[0], "mean_velocity" in variant, args.full, args.partial,
                            guarded=variant.endswith("_guarded"), adaptive=variant.endswith("_adaptive"),
                            between=tuple(args.between), gain=args.gain)
    callbacks = scaled + ([cb] if cb else [])  # scaled first: it must see the optimizer's step, not the prediction
    run = train(spec, variant, steps, lr, 0, None, "cpu", seed=seed, extra_callbacks=lambda _: callbacks)
    return run, cb


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=list(PREFIX))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--prefix", nargs="+", help="parameter-name prefixes to predict (default: per workload)")
    ap.add_argument("--full", type=int, default=FULL, help="full steps per window")
    ap.add_argument("--partial", type=int, default=PARTIAL, help="partial steps per window")
    ap.add_argument("--steps-factor", type=float, default=1.0,
                    help="run the partial variants for this many times the baseline's steps")
    ap.add_argument("--between", nargs=2, type=float, default=[0.0, 1.0], metavar=("FROM", "UNTIL"),
                    help="windows only between these fractions of the run (default: all of it after warmup)")
    ap.add_argument("--gain", type=float, default=1.0,
                    help="move the prefix this many times its mean velocity on partial steps")
    ap.add_argument("--prefix-lr", type=float, default=1.0,
                    help="scale the prefix's real steps by this inside the windowed range, in every variant")
    ap.add_argument("--prefix-lr-between", nargs=2, type=float, metavar=("FROM", "UNTIL"),
                    help="where --prefix-lr applies (default: --between)")
    ap.add_argument("--lr", type=float, help="peak LR for every variant (default: the workload's tuned one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny models and runs (smoke test)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "partial_predict")
    args = ap.parse_args(argv)
    args.regime, args.accelerator = "adamw_cosine", "cpu"
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.workloads:
        spec = load_spec(name, args)
        for seed in args.seeds:  # variants interleaved within a seed, so drift on the host hits all alike
            for v in args.variants:
                run, cb = run_variant(spec, name, v, seed, args)
                secs, partial = run.curve[-1].seconds, getattr(cb, "partial_steps", 0)
                print(f"{name} seed {seed} {v:22s} steps {run.steps:5d} partial {partial:4d} "
                      f"seconds {secs:6.1f} final val {run.final_val:.4f}", flush=True)
                rows.append({"workload": name, "seed": seed, "variant": v, "steps": run.steps, "partial": partial,
                             **{k: getattr(cb, k, 0) for k in ("windows", "rolled_back", "slots", "partial_slots")},
                             "seconds": secs, "final_val": run.final_val,
                             "curve": [(p.step, p.seconds, p.val) for p in run.curve]})
    (args.out / "partial_predict.json").write_text(json.dumps(rows, indent=1))
    (args.out / "partial_predict.md").write_text(table(rows, args) + "\n")
    print(table(rows, args))
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    def med(xs: list) -> str:
        xs = [x for x in xs if x is not None]
        return f"{statistics.median(xs):.2f}" if xs else "n/a"

    prefix = " ".join(args.prefix) if args.prefix else "per workload"
    def baseline(r: dict) -> dict | None:
        return next((b for b in rows if b["workload"] == r["workload"] and b["seed"] == r["seed"]
                     and b["variant"] == "baseline"), None)

    def cost(r: dict) -> float | None:
        base = baseline(r)
        if base is None or not r["partial"]:
            return None
        per_step = base["seconds"] / base["steps"]
        return (r["seconds"] / per_step - (r["steps"] - r["partial"])) / r["partial"]

    def time_ratio(r: dict) -> float | None:
        base = baseline(r)
        return None if base is None else r["seconds"] / base["seconds"]

    def speedup(r: dict) -> float | None:
        """As in time_to_loss: the baseline's time to its own final val over this run's."""
        base = baseline(r)
        if base is None:
            return None
        def points(x: dict) -> list[Point]:
            return [Point(step, secs, 0, val) for step, secs, val in x["curve"]]
        t, t_base = time_to(points(r), base["final_val"]), time_to(points(base), base["final_val"])
        return None if t is None or t_base is None else t_base / t

    lines = [f"Machine: {machine(args)}. Prefix: {prefix}; windows {args.full} full + {args.partial} partial; "
             f"partial variants run {args.steps_factor:g}x the baseline's steps. "
             + (f"Peak LR {args.lr:g} for every run. " if getattr(args, "lr", None) else "")
             + (f"Mean velocity times {args.gain:g}. " if getattr(args, "gain", 1.0) != 1.0 else "")
             + (f"The prefix's real steps scaled by {args.prefix_lr:g} between "
                f"{' and '.join(f'{x:g}' for x in (args.prefix_lr_between or args.between))} of the run, "
                "in every variant. " if getattr(args, "prefix_lr", 1.0) != 1.0 else "")
             + (f"Windows only between {args.between[0]:g} and {args.between[1]:g} of the run. "
                if list(getattr(args, "between", [0.0, 1.0])) != [0.0, 1.0] else "")
             + f"Seeds {args.seeds}; per seed, final val / wall-clock relative to the "
             "baseline / speedup to the baseline's final val (not reached: -).", "",
             "| workload | variant | partial steps | c (median) | final val per seed | wall-clock (median) "
             "| to target per seed |",
             "|---|---|---|---|---|---|---|"]
    for name in args.workloads:
        for v in args.variants:
            rs = [r for r in rows if r["workload"] == name and r["variant"] == v]
            if not rs:
                continue
            vals = " / ".join(f"{r['final_val']:.4f}" for r in rs)
            tgt = " / ".join("-" if speedup(r) is None else f"{speedup(r):.2f}x" for r in rs)
            partial = str(rs[0]["partial"])
            if v.endswith("_guarded"):
                judged = " / ".join(f"{r['rolled_back']} of {r['windows']}" for r in rs)
                partial += f" (windows rolled back: {judged})"
            if v.endswith("_adaptive"):
                chosen = " / ".join(f"{r['partial_slots']} of {r['slots']}" for r in rs)
                partial += f" (slots run partial: {chosen})"
            lines.append(f"| {name} | {v} | {partial} | {med([cost(r) for r in rs])} | {vals} | "
                         f"{med([time_ratio(r) for r in rs])}x | {tgt} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
