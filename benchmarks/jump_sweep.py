"""Drift jumps: one predicted step of ``gain`` real steps' worth after every ``K`` real steps, swept.

    python -m benchmarks.jump_sweep                                 # K:gain 24:4 24:8 24:16 24:32, seed 0
    python -m benchmarks.jump_sweep --points 12:8 48:32 --seed 1 --workloads mlp cnn
    python -m benchmarks.jump_sweep --regime low_lr
    python -m benchmarks.jump_sweep --points 24:32 --judge 48     # under the block judge (judge.block = 48)
    python -m benchmarks.jump_sweep --points 24:32 --judge 48 --judge-start-scale 0.125  # ... ramping the gain
    python -m benchmarks.jump_sweep --points 24:32 --after-jump zero_momentum  # first moment zeroed after jumps
    python -m benchmarks.jump_sweep --points 24:32 --start 0.5    # jumps only in the second half (--until 0.5: first)
    python -m benchmarks.jump_sweep --points 24:32 --workloads cnn --val-batches 32  # the CNN's whole val set
    python -m benchmarks.jump_sweep --points 24:32 --workloads cnn --only-layers head.0.  # the rest unmoved
    python -m benchmarks.jump_sweep --points 24:32 --tangential   # jumps that turn each tensor, not grow it
    python -m benchmarks.jump_sweep --points 24:32 --direction random  # control: as far, in a random direction
    python -m benchmarks.jump_sweep --summarize DIR0 DIR1 DIR2   # the points the sweeps share, per seed

Per workload, in one process: plain training, then each point as the workload's
``drift_jump16_every24_unguarded`` variant with ``min_full_steps`` = K and ``dynamics.drift_gain`` = gain,
all at the baseline's own number of steps. A screen, not the end-to-end measurement: one run each, so
the final val loss (the same for any repeat) is the number to read; wall-clock to the baseline's final
val is one repeat's and the time_to_loss harness is the place to confirm a point. Writes
``<out>/jump_sweep.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback

from benchmarks.predictor_value import first_batches, fixed_loss
from benchmarks.regimes import REGIMES
from benchmarks.time_to_loss import HERE, WORKLOADS, PredictUntil, Run, load_spec, time_to, train, val_batches_arg
from hybrid_lightning.config import AFTER_JUMP, HybridConfig
from hybrid_lightning.core.predictors import Drift

BASE_VARIANT = "drift_jump16_every24_unguarded"


def point(text: str) -> tuple[int, float]:
    """``"K:gain"`` -> (K, gain)."""
    k, _, g = text.partition(":")
    try:
        return int(k), float(g)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K:gain like 24:16, got {text!r}") from None


def jump_config(name: str, k: int, gain: float, quick: bool = False, guarded: bool = False, judge: int = 0,
                after_jump: str = "keep", start_scale: float = 1.0, tangential: bool = False,
                span: int | None = None) -> dict:
    """The workload's one-step-jump variant with K real steps between jumps and the given gain (``quick``:
    after a 10-step warmup and a 2-observation span, for the tiny smoke-test sizes, whose spec has no such
    variant; ``guarded``: the default guard judges every jump on its probe batch and rolls back the ones
    that raise its loss; ``judge``: the block judge's ``judge.block``, 0 for none, and ``start_scale`` its
    ``judge.start_scale``; ``after_jump``: what the optimizer state does after a kept jump; ``tangential``:
    ``dynamics.tangential``, jumps that turn each tensor without growing it; ``span``: ``dynamics.drift_span``,
    None for the variant's)."""
    base = dict(yaml.safe_load((HERE / "workloads" / f"{name}.yaml").read_text())["hybrids"][BASE_VARIANT])
    if guarded:
        del base["divergence"]
    base.update(min_full_steps=k, dynamics={**base.get("dynamics", {}), "drift_gain": gain})
    if quick:
        base.update(warmup_steps=10, dynamics={**base["dynamics"], "drift_span": 2})
    if judge:
        base["judge"] = {"block": judge} if start_scale == 1 else {"block": judge, "start_scale": start_scale}
    if after_jump != "keep":
        base["after_jump"] = after_jump
    if tangential:
        base["dynamics"]["tangential"] = True
    if span is not None:
        base["dynamics"]["drift_span"] = span
    return base


class LayerMaskedDrift(Drift):
    """Research: the drift predictor's displacement in the parameters whose names start with one of ``prefixes``
    only; the others stay where the real steps left them."""

    def __init__(self, n_layers: int, rank: int, span: int, gain: float, prefixes: tuple[str, ...]) -> None:
        super().__init__(n_layers, rank, span, gain)
        self.prefixes = prefixes

    def predict_displacement(self, trajectory, steps: int):
        disp = super().predict_displacement(trajectory, steps)
        if disp is None:
            return None
        keep = [name.startswith(self.prefixes) for name in trajectory.names]
        if not any(keep):
            raise ValueError(f"no parameter name starts with {' or '.join(self.prefixes)}: {trajectory.names}")
        for view, k in zip(disp.split(trajectory.numels), keep):
            if not k:
                view.zero_()
        return disp


DIRECTIONS = ("drift", "negative", "random")


class ControlDrift(Drift):
    """Research control: a jump as long as the drift predictor's, per tensor, in another direction: ``negative``
    (back along the drift) or ``random`` (a Gaussian direction from a generator seeded with ``seed``, scaled to
    each tensor's norm of the drift). With ``tangential`` (the config's ``dynamics.tangential``, which the engine
    applies after the predictor) both the drift and the random direction are projected first, so the applied
    jumps have the same per-tensor lengths. If the drift's jumps pay and these do not, its direction is the
    point."""

    def __init__(self, n_layers: int, rank: int, span: int, gain: float, direction: str, seed: int = 0,
                 tangential: bool = False) -> None:
        super().__init__(n_layers, rank, span, gain)
        if direction not in ("negative", "random"):
            raise ValueError(f"direction must be negative or random, got {direction!r}")
        self.direction, self.tangential = direction, tangential
        self._gen = torch.Generator().manual_seed(seed)

    def predict_displacement(self, trajectory, steps: int):
        disp = super().predict_displacement(trajectory, steps)
        if disp is None:
            return None
        if self.direction == "negative":
            return disp.neg_()
        noise = torch.randn(disp.shape, generator=self._gen, dtype=disp.dtype)
        if self.tangential:  # the engine's projection then leaves both as they are
            disp, noise = trajectory.tangential(disp), trajectory.tangential(noise)
        for d, z in zip(disp.split(trajectory.numels), noise.split(trajectory.numels)):
            zn = z.norm()
            d.copy_(z * (d.norm() / zn) if zn > 0 else z)
        return disp


def drift_factory(cfg: dict, prefixes: list[str] | None, direction: str = "drift", seed: int = 0):
    """A ``dynamics_factory`` for ``train``: the drift predictor of ``cfg`` moving only ``prefixes``' layers, or
    its ``direction`` control (None: the plain predictor of ``cfg``)."""
    dyn = HybridConfig.from_dict(cfg).dynamics
    if direction != "drift":
        if prefixes:
            raise ValueError("a control direction moves every layer: not with prefixes")
        return lambda n_layers, rank: ControlDrift(n_layers, rank, dyn.drift_span, dyn.drift_gain, direction, seed,
                                                   dyn.tangential)
    if not prefixes:
        return None
    return lambda n_layers, rank: LayerMaskedDrift(n_layers, rank, dyn.drift_span, dyn.drift_gain, tuple(prefixes))


def kind(guarded: bool, judge: int, after_jump: str, start_scale: float, window: tuple[float, float],
         val_batches: int | None = None, only_layers: tuple[str, ...] = (), tangential: bool = False,
         direction: str = "drift", span: int | None = None) -> str:
    """How the jumps of a sweep were run, from its ``_setup`` (less the regime)."""
    ramp = f" ramping the gain from {start_scale:g} of it" if judge and start_scale != 1 else ""
    return (("guarded" if guarded else "unguarded") + (f", block judge of {judge} steps{ramp}" if judge else "")
            + ("" if after_jump == "keep" else f", optimizer state after a jump: {after_jump}")
            + ("" if window == (0.0, 1.0) else f", only from {window[0]:g} to {window[1]:g} of the run")
            + ("" if val_batches is None else f", validation on {val_batches} batches per evaluation")
            + ("" if not only_layers else f", moving only {' / '.join(only_layers)}")
            + (", tangential (each tensor's part along itself removed)" if tangential else "")
            + {"drift": "", "negative": ", control: back along the drift",
               "random": ", control: a random direction with each tensor's norm of the drift"}[direction]
            + ("" if span is None else f", the drift over {span} observations"))


class EndTrainLoss(Callback):
    """At the end of fit, the model's mean loss on the first ``batches`` training batches: the same batches in
    every run of a seed (a fresh loader, in the data module's seeded order), drawn without touching training's
    random stream. Set against the final val loss, it tells faster training from better generalization."""

    def __init__(self, batches: int = 32) -> None:
        self.batches, self.value = batches, float("nan")

    def on_train_end(self, trainer, pl_module) -> None:
        self.value = fixed_loss(pl_module, first_batches(trainer.datamodule.train_dataloader(), self.batches))


def row(label: str, run: Run, baseline: Run, train_loss: float | None = None) -> dict:
    target = baseline.final_val
    t_base, t_run = time_to(baseline.curve, target), time_to(run.curve, target)
    return {"point": label, "final_val": run.final_val, "vs_baseline": run.final_val / target - 1.0,
            "final_train": train_loss,
            "backward_passes": run.backward_passes, "rollbacks": run.rollbacks, "kept": run.kept_phases,
            "speedup": t_base / t_run if t_run else None}


def table(sweep: dict) -> str:
    """One sweep (as written to ``jump_sweep.json``) as a markdown table."""
    results, jumps = sweep["results"], kind(*_setup(sweep)[1:])
    lines = [f"Seed {sweep['seed']}, regime {sweep['regime']}, jumps {jumps}; final val loss (change "
             "against plain training), the loss on the first training batches at the end (`EndTrainLoss`), jumps "
             "kept / rolled back, and one repeat's wall-clock to plain training's final val.", "",
             "| workload | K:gain | final val | vs plain | train loss at end | kept / rolled back "
             "| to plain's final val |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for r in rows:
            sp = "not reached" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            change = "" if r["point"] == "plain" else f"{100 * r['vs_baseline']:+.1f}%"
            kept = "" if r["point"] == "plain" else f"{r.get('kept', 0)} / {r['rollbacks']}"
            train = "" if r.get("final_train") is None else f"{r['final_train']:.4f}"
            lines.append(f"| {name} | {r['point']} | {r['final_val']:.4f} | {change} | {train} | {kept} | {sp} |")
    return "\n".join(lines) + "\n"


def summarize(dirs: list[Path]) -> str:
    """Per workload and point that every seed's sweeps in ``dirs`` ran: the change against plain training per
    seed, and their mean. All in one regime, guard, judge, ramp, after-jump state, window of the run,
    validation size, moved layers, tangential setting, direction and span; sweeps of the same seed are merged
    (a point run twice: the first)."""
    sweeps: list[dict] = []
    for d in dirs:
        s = json.loads((d / "jump_sweep.json").read_text())
        if sweeps and _setup(s) != _setup(sweeps[0]):
            raise SystemExit(f"{d}: another regime, guard, judge, ramp, after-jump state, window, validation size, "
                             f"moved layers, tangential setting, direction or span than {dirs[0]}; summarize one kind "
                             "of sweep at a time")
        same = next((x for x in sweeps if x["seed"] == s["seed"]), None)
        if same is None:
            sweeps.append(s)
            continue
        for name, rows in s["results"].items():
            have = same["results"].setdefault(name, [])
            plain = [r["final_val"] for r in have + rows if r["point"] == "plain"]
            if len(set(plain)) > 1:  # training is deterministic: another plain run means another setup
                raise SystemExit(f"{d}: plain training of seed {s['seed']} ended elsewhere ({plain}) on {name}")
            have += [r for r in rows if r["point"] not in {h["point"] for h in have}]
    guard = kind(*_setup(sweeps[0])[1:])
    # sweeps that measured the training loss at the end (EndTrainLoss) get its mean change too
    train = all(r.get("final_train") is not None for s in sweeps for rows in s["results"].values() for r in rows)
    lines = [f"Seeds {' / '.join(str(s['seed']) for s in sweeps)}, regime {sweeps[0]['regime']}, jumps {guard}; "
             "final val loss against plain training of the same seed" + (", and the mean change of the loss on the "
             "first training batches at the end" if train else "") + ".", "",
             "| workload | K:gain | final val per seed | vs plain per seed | mean |" + (" train loss, mean |" if train
                                                                                        else ""),
             "|---|---|---|---|---|" + ("---|" if train else "")]
    for name in sweeps[0]["results"]:
        if not all(name in s["results"] for s in sweeps):
            continue
        per = [{r["point"]: r for r in s["results"][name]} for s in sweeps]
        for label in [r["point"] for r in sweeps[0]["results"][name] if all(r["point"] in p for p in per)]:
            rows = [p[label] for p in per]
            change = [100 * r["vs_baseline"] for r in rows]
            finals = " / ".join(f"{r['final_val']:.4f}" for r in rows)
            changes = " / ".join(f"{c:+.1f}%" for c in change)
            mean = f"{sum(change) / len(change):+.1f}%"
            line = f"| {name} | {label} | {finals} | " + ("| |" if label == "plain" else f"{changes} | {mean} |")
            if train:
                drop = [100 * (r["final_train"] / p["plain"]["final_train"] - 1) for r, p in zip(rows, per)]
                line += " |" if label == "plain" else f" {sum(drop) / len(drop):+.1f}% |"
            lines.append(line)
    return "\n".join(lines) + "\n"


def _setup(sweep: dict) -> tuple:
    return (sweep["regime"], sweep.get("guarded", False), sweep.get("judge", 0), sweep.get("after_jump", "keep"),
            sweep.get("judge_start_scale", 1.0), tuple(sweep.get("window", (0.0, 1.0))), sweep.get("val_batches"),
            tuple(sweep.get("only_layers") or ()), sweep.get("tangential", False), sweep.get("direction", "drift"),
            sweep.get("span"))


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--points", nargs="+", type=point, default=[(24, 4.0), (24, 8.0), (24, 16.0), (24, 32.0)],
                   metavar="K:GAIN")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--regime", default="adamw_cosine", choices=REGIMES)
    p.add_argument("--guarded", action="store_true",
                   help="the default guard judges every jump on its probe batch (default: unguarded)")
    p.add_argument("--judge", type=int, default=0, metavar="BLOCK",
                   help="jumps only while the block judge (judge.block = BLOCK steps) lets them (default: no judge)")
    p.add_argument("--judge-start-scale", type=float, default=1.0, metavar="S",
                   help="with --judge: its first tests jump S x the gain, x2 per good verdict (default 1)")
    p.add_argument("--after-jump", default="keep", choices=AFTER_JUMP,
                   help="the optimizer state after a kept jump (config after_jump; default: keep)")
    p.add_argument("--start", type=float, default=0.0, metavar="F",
                   help="no jump (and no judge) before F x the run's steps (default: after the variant's warmup)")
    p.add_argument("--until", type=float, default=1.0, metavar="F",
                   help="no jump after F x the run's steps (default 1: to the end)")
    p.add_argument("--val-batches", type=val_batches_arg, default=None, metavar="N",
                   help="validation batches per evaluation, in plain and jump runs alike (default: the workload's "
                        "val_batches; 32 is the CNN's whole validation set)")
    p.add_argument("--only-layers", nargs="+", metavar="PREFIX", default=None,
                   help="jumps move only the parameters whose names start with these (research; default: all)")
    p.add_argument("--tangential", action="store_true",
                   help="jumps less each tensor's part along its own values (dynamics.tangential; default: off)")
    p.add_argument("--direction", choices=DIRECTIONS, default="drift",
                   help="control: jump as far as the drift, per tensor, but back along it (negative) or in a random "
                        "direction seeded by --seed (random); default: along the drift")
    p.add_argument("--span", type=int, default=None, metavar="N",
                   help="the drift's velocity over N observations of trajectory.stride real steps "
                        "(dynamics.drift_span; default: the variant's, 10)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--summarize", nargs="+", type=Path, metavar="DIR",
                   help="run nothing: compare the sweeps written to these --out folders (one per seed)")
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return {}
    if args.judge_start_scale != 1 and not args.judge:
        p.error("--judge-start-scale ramps the block judge's jumps: it needs --judge BLOCK")
    if args.span is not None and args.span < 1:
        p.error(f"--span must be >= 1 observation, got {args.span}")
    if args.direction != "drift" and args.only_layers:
        p.error("--direction moves every layer: not with --only-layers")
    if not 0 <= args.start < args.until <= 1:
        p.error(f"need 0 <= --start < --until <= 1, got {args.start:g} and {args.until:g}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}

    ends: list[EndTrainLoss] = []

    def extra(cb):  # every run's measurement callbacks, and a hybrid run's end of predictions
        ends.append(EndTrainLoss())
        return [ends[-1]] + ([PredictUntil(cb, args.until)] if cb is not None and args.until < 1 else [])

    for name in args.workloads:
        spec = load_spec(name, args)
        n, lr = spec["steps"], spec["lr"]
        base = train(spec, "baseline", n, lr, 0, None, "cpu", seed=args.seed, extra_callbacks=extra)
        rows = [row("plain", base, base, ends[-1].value)]
        print(f"[{name}] plain: final val {base.final_val:.4f}", flush=True)
        for k, gain in args.points:
            cfg = jump_config(name, k, gain, args.quick, args.guarded, args.judge, args.after_jump,
                              args.judge_start_scale, args.tangential, args.span)
            if args.start:
                cfg["warmup_steps"] = max(cfg.get("warmup_steps", 0), round(args.start * n))
            factory = drift_factory(cfg, args.only_layers, args.direction, args.seed)
            h = train(spec, f"hybrid:{k}:{gain:g}", n, lr, 0, cfg, "cpu", factory, seed=args.seed,
                      extra_callbacks=extra)
            rows.append(row(f"{k}:{gain:g}", h, base, ends[-1].value))
            print(f"[{name}] {k}:{gain:g}: final val {h.final_val:.4f}", flush=True)
        results[name] = rows
    sweep = {"seed": args.seed, "regime": args.regime, "guarded": args.guarded, "judge": args.judge,
             "after_jump": args.after_jump, "judge_start_scale": args.judge_start_scale,
             "window": [args.start, args.until], "val_batches": args.val_batches, "only_layers": args.only_layers,
             "tangential": args.tangential, "direction": args.direction, "span": args.span,
             "results": results}
    (args.out / "jump_sweep.json").write_text(json.dumps(sweep, indent=1))
    md = table(sweep)
    (args.out / "jump_sweep.md").write_text(md)
    print(md)
    return results


if __name__ == "__main__":
    main()
