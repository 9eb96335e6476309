"""Wall-clock to the same validation loss: plain Lightning vs the hybrid plugin vs an equal-compute control.

    python -m benchmarks.time_to_loss                      # all workloads, 3 interleaved repeats
    python -m benchmarks.time_to_loss --workloads mlp --tune  # re-run the baseline LR sweep first
    python -m benchmarks.time_to_loss --regime tuned_wd --tune-wd  # ... or its LR x weight-decay grid
    python -m benchmarks.time_to_loss --quick              # tiny CI smoke run
    python -m benchmarks.time_to_loss --regime low_lr      # another training regime (benchmarks/regimes.py)
    python -m benchmarks.time_to_loss --regime finetune --tune  # from a source task's weights, fine-tuning LR swept
    python -m benchmarks.time_to_loss --regime finetune_wd --tune-wd  # ... or its LR x weight-decay grid
    python -m benchmarks.time_to_loss --regime wsd --predict-until 0.8  # predict in the WSD's stable phase only
    python -m benchmarks.time_to_loss --workloads mlp --layer-lr net.0. net.2. net.4. --layer-lr-factor 2
        # every run (baseline, hybrids, controls) steps the MLP's hidden layers at twice the LR
        # in the run's second half (--layer-lr-between 0.5 1, the default)

Per workload (``benchmarks/workloads/<name>.yaml``), every repeat runs, back to back and in the same
process: the plain baseline (same model, data order, seed, optimizer, tuned LR), each hybrid variant,
and for each variant an *equal-compute control*: plain training for only as many steps as the variant
ran backward passes, with the LR schedule compressed to that length. Training wall-clock excludes
validation. The target is the baseline's final validation loss (median over repeats); time to target
is interpolated linearly between evaluation points. "not reached" is a valid outcome. A variant with
``steps_factor: f`` trains for f times the baseline's steps (its schedule stretched to match).

Writes ``<out>/<workload>.json`` and ``.png``, and ``<out>/time_to_loss.md`` (the README table); the
last lines printed are one JSON object per workload.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from benchmarks.layer_lr import ScaledPrefixStep
from benchmarks.regimes import FINETUNE, REGIMES, regime_model, regime_spec, source_spec
from hybrid_lightning import HybridConfig, HybridPredictiveTraining

HERE = Path(__file__).resolve().parent
WORKLOADS = ("char_gpt", "mlp", "cnn")


@dataclass
class Point:
    step: int
    seconds: float  # training wall-clock so far, validation excluded
    backward: int  # backward passes so far
    val: float


@dataclass
class Run:
    kind: str  # baseline | hybrid:<variant> | control:<variant> | sweep:<lr> | sweep:<lr>:wd=<weight decay>
    repeat: int
    steps: int
    lr: float
    curve: list[Point] = field(default_factory=list)
    train_seconds: float = 0.0
    backward_passes: int = 0
    predict_fraction: float = 0.0
    rollbacks: int = 0
    kept_phases: int = 0
    refused_phases: int = 0  # line search: refused before their first step
    cost_ratio: float | None = None

    @property
    def final_val(self) -> float:
        return self.curve[-1].val if self.curve else float("nan")


class Clock(Callback):
    """Training wall-clock without validation; a curve point at every validation."""

    def __init__(self, run: Run, hybrid: HybridPredictiveTraining | None, cuda: bool) -> None:
        self.run, self.hybrid, self.cuda = run, hybrid, cuda
        self.t0: float | None = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.t0 is None:
            self.t0 = self._now()

    def on_validation_start(self, trainer, pl_module):
        if self.t0 is not None:
            self.run.train_seconds += self._now() - self.t0
            self.t0 = None

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.record(trainer)

    def on_train_end(self, trainer, pl_module):
        if self.t0 is not None:
            self.run.train_seconds += self._now() - self.t0
            self.t0 = None

    def record(self, trainer) -> None:
        backward = trainer.global_step
        if self.hybrid is not None and self.hybrid.engine is not None:
            backward = self.hybrid.engine.counters["real_steps"]
        val = float(trainer.callback_metrics["val_loss"])
        self.run.curve.append(Point(trainer.global_step, self.run.train_seconds, backward, val))


class PredictUntil(Callback):
    """Research: no Predict phase may start that would not end before ``fraction`` of the run's steps
    (the engine's own end-of-run rule, moved earlier, e.g. to where a schedule starts to decay)."""

    def __init__(self, hybrid: HybridPredictiveTraining, fraction: float) -> None:
        self.hybrid, self.fraction = hybrid, fraction

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        engine = self.hybrid.engine
        if engine is not None and trainer.max_steps > 0:
            # in the engine's own steps, which lag the global step after a fresh engine on a checkpoint
            until = engine.step + math.floor(self.fraction * trainer.max_steps) - trainer.global_step
            engine.step_limit = until if engine.step_limit is None else min(engine.step_limit, until)


def _load(path: str) -> Any:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def train(spec: dict, kind: str, steps: int, lr: float, repeat: int, hybrid: dict | None, accelerator: str,
          dynamics_factory: Any = None, *, seed: int = 0,
          extra_callbacks: Callable[[HybridPredictiveTraining | None], list[Callback]] | None = None) -> Run:
    """One run. ``seed`` sets the model's initialization and the data order (0 for every comparison run).
    ``extra_callbacks(hybrid_callback_or_None)`` adds callbacks that run before the others (measurement hooks)."""
    run = Run(kind, repeat, steps, lr)
    start = pretrained(spec, seed, accelerator) if spec.get("_regime") in FINETUNE else None  # before seeding
    L.seed_everything(seed, verbose=False)
    data = _load(spec["data"])(**{**spec["data_args"], "seed": seed + spec.get("_data_seed_offset", 0)})
    model = _load(spec["model"])(**spec["model_args"], lr=lr, total_steps=0)  # schedule length = max_steps
    if start is not None:
        model.load_state_dict(start)
    model = regime_model(model, spec.get("_regime", "adamw_cosine"))
    cb = None
    if hybrid is not None:
        cb = HybridPredictiveTraining(HybridConfig.from_dict(hybrid), verbose=False, report_dir=spec["_out"],
                                      dynamics_factory=dynamics_factory)
    clock = Clock(run, cb, accelerator == "cuda")
    trainer = L.Trainer(
        max_steps=steps, accelerator=accelerator, devices=1, strategy="hybrid" if cb else "auto",
        callbacks=(extra_callbacks(cb) if extra_callbacks else []) + [clock] + ([cb] if cb else []),
        val_check_interval=spec["eval_every"],
        check_val_every_n_epoch=None, limit_val_batches=spec["val_batches"], num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=spec["_out"])
    trainer.fit(model, data)
    if not run.curve or run.curve[-1].step != trainer.global_step:
        trainer.validate(model, data, verbose=False)  # always end with an evaluation at the last step
    run.backward_passes = run.curve[-1].backward
    if cb is not None:
        rep = cb.report
        run.predict_fraction = rep.backward_skip_ratio
        run.rollbacks, run.kept_phases, run.refused_phases = rep.rollbacks, rep.kept_phases, rep.refused_phases
        run.cost_ratio = None if math.isnan(rep.cost_ratio) else rep.cost_ratio
    return run


class _KeepWeights(Callback):
    def __init__(self, into: list) -> None:
        self.into = into

    def on_train_end(self, trainer, pl_module):
        self.into.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


_PRETRAINED: dict[tuple[str, int], dict[str, torch.Tensor]] = {}


def pretrained(spec: dict, seed: int, accelerator: str) -> dict[str, torch.Tensor]:
    """The ``finetune`` regimes' starting weights: the source task trained as the workload is tuned (init seed
    ``seed``, data seed ``seed`` + the source's ``seed_offset``), once per process and seed."""
    source = source_spec(spec)
    key = (json.dumps({k: source[k] for k in ("model", "model_args", "data", "data_args", "steps", "lr",
                                              "_data_seed_offset")}, sort_keys=True), seed)
    if key not in _PRETRAINED:
        kept: list[dict[str, torch.Tensor]] = []
        run = train(source, "source", source["steps"], source["lr"], 0, None, accelerator, seed=seed,
                    extra_callbacks=lambda _: [_KeepWeights(kept)])
        print(f"source task (seed {seed}): final val {run.final_val:.4f}", flush=True)
        _PRETRAINED[key] = kept[0]
    return _PRETRAINED[key]


def time_to(curve: list[Point], target: float, axis: str = "seconds") -> float | None:
    """First crossing of ``val <= target``, interpolated linearly on ``axis`` between evaluation points."""
    prev_x, prev_v = 0.0, math.inf
    for p in curve:
        x = float(getattr(p, axis))
        if p.val <= target:
            if math.isinf(prev_v):
                return x
            frac = (prev_v - target) / (prev_v - p.val) if prev_v != p.val else 1.0
            return prev_x + frac * (x - prev_x)
        prev_x, prev_v = x, p.val
    return None


def _median(xs: list[float | None]) -> float | None:
    """Median over repeats; None if any repeat did not get there."""
    if not xs or any(x is None for x in xs):
        return None
    return statistics.median(xs)  # type: ignore[arg-type]


def val_batches_arg(text: str) -> int:
    """``--val-batches``: a positive number of batches (more than the validation set has: all of it)."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"need at least 1 validation batch, got {n}")
    return n


def load_spec(name: str, args: argparse.Namespace) -> dict:
    """The workload's spec with ``args.quick`` sizes, ``args.regime`` and ``args.val_batches`` (if set: validation
    batches per evaluation instead of the workload's own) applied, writing to ``args.out``."""
    spec = yaml.safe_load((HERE / "workloads" / f"{name}.yaml").read_text())
    if args.quick:
        spec.update(spec.pop("quick"))
    spec = regime_spec(spec, args.regime)
    if getattr(args, "val_batches", None):
        spec["val_batches"] = args.val_batches
    spec["_out"], spec["_regime"] = str(args.out), args.regime
    return spec


def run_workload(name: str, args: argparse.Namespace) -> dict:
    spec = load_spec(name, args)
    lr = spec["lr"]
    sweep = []
    if args.tune:
        for cand in spec["lr_sweep"]:
            r = train(spec, f"sweep:{cand}", spec["steps"], cand, 0, None, args.accelerator)
            sweep.append({"lr": cand, "final_val": r.final_val})
            print(f"[{name}] sweep lr={cand:g}: final val {r.final_val:.4f}", flush=True)
        lr = min(sweep, key=lambda s: s["final_val"])["lr"]
        print(f"[{name}] tuned lr = {lr:g}", flush=True)
    if args.tune_wd:
        grid = spec["tuned_wd"] if args.regime == "tuned_wd" else spec["finetune"]["wd"]
        for cand_lr in grid["lr_sweep"]:
            for cand in grid["wd_sweep"]:
                s = {**spec, "model_args": {**spec["model_args"], "weight_decay": cand}}
                r = train(s, f"sweep:{cand_lr}:wd={cand}", spec["steps"], cand_lr, 0, None, args.accelerator,
                          seed=args.seed)
                sweep.append({"lr": cand_lr, "weight_decay": cand, "final_val": r.final_val})
                print(f"[{name}] sweep lr={cand_lr:g} weight_decay={cand:g}: final val {r.final_val:.4f}", flush=True)
        best = min(sweep, key=lambda s: s["final_val"])
        lr, spec = best["lr"], {**spec, "model_args": {**spec["model_args"], "weight_decay": best["weight_decay"]}}
        print(f"[{name}] tuned lr = {lr:g}, weight_decay = {best['weight_decay']:g}", flush=True)
    N = spec["steps"]
    variants = {k: dict(v or {}) for k, v in spec["hybrids"].items()}
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants}

    def layer_lr(_: HybridPredictiveTraining | None) -> list[Callback]:
        # the baseline with some layers' LR tuned too: every run of the comparison gets the same scaling
        return [ScaledPrefixStep(tuple(args.layer_lr), args.layer_lr_factor, tuple(args.layer_lr_between))]

    scaled = layer_lr if args.layer_lr else None

    def extras(cb: HybridPredictiveTraining | None) -> list[Callback]:  # a hybrid run's: scaling, then PredictUntil
        until = [PredictUntil(cb, args.predict_until)] if args.predict_until else []
        return (scaled(cb) if scaled else []) + until

    runs: list[Run] = []
    for rep in range(args.repeats):  # interleaved: baseline, hybrids, controls, then again
        runs.append(train(spec, "baseline", N, lr, rep, None, args.accelerator, seed=args.seed, extra_callbacks=scaled))
        _say(name, runs[-1])
        for var, overrides in variants.items():
            # a variant may train longer than the baseline (``steps_factor``): with a flat LR, predicted steps
            # worth less than real ones can still reach the baseline's loss sooner if there are more of them
            hybrid = {k: v for k, v in overrides.items() if k != "steps_factor"}
            steps = round(N * overrides.get("steps_factor", 1.0))
            h = train(spec, f"hybrid:{var}", steps, lr, rep, hybrid, args.accelerator, seed=args.seed,
                      extra_callbacks=extras)
            runs.append(h)
            _say(name, h)
            if h.backward_passes < h.steps:  # it predicted: plain training for as many real steps
                c = train(spec, f"control:{var}", h.backward_passes, lr, rep, None, args.accelerator, seed=args.seed,
                          extra_callbacks=scaled)
                runs.append(c)
                _say(name, c)
    # the noise floor of "final val loss": the same baseline with other initializations and data orders
    for seed in [s for s in range(args.seeds + 1) if s != args.seed][:max(args.seeds - 1, 0)]:
        runs.append(train(spec, f"seed:{seed}", N, lr, 0, None, args.accelerator, seed=seed, extra_callbacks=scaled))
        _say(name, runs[-1])
    return summarize(name, spec, lr, sweep, runs, variants, args)


def _refused(v: dict) -> str:
    return f" ({v['refused_phases']:g} refused)" if v.get("refused_phases") else ""


def _say(name: str, r: Run) -> None:
    extra = (f", predicted {100 * r.predict_fraction:.1f}%, rollbacks {r.rollbacks}, refused {r.refused_phases}"
             if r.kind.startswith("hyb") else "")
    print(f"[{name}] repeat {r.repeat} {r.kind}: {r.steps} steps, {r.train_seconds:.1f} s, "
          f"final val {r.final_val:.4f}{extra}", flush=True)


def summarize(name: str, spec: dict, lr: float, sweep: list, runs: list[Run], variants: dict,
              args: argparse.Namespace) -> dict:
    base = [r for r in runs if r.kind == "baseline"]
    target = statistics.median(r.final_val for r in base)
    base_t = _median([time_to(r.curve, target) for r in base])
    base_b = _median([time_to(r.curve, target, "backward") for r in base])
    seed_vals = [base[0].final_val] + [r.final_val for r in runs if r.kind.startswith("seed:")]
    out: dict[str, Any] = {"workload": name, "regime": spec.get("_regime", "adamw_cosine"), "target_val": target,
                           "lr": lr, "weight_decay": spec["model_args"].get("weight_decay", "the model's default"),
                           "steps": spec["steps"],
                           "layer_lr": ({"prefix": args.layer_lr, "factor": args.layer_lr_factor,
                                         "between": args.layer_lr_between} if args.layer_lr else None),
                           "seed_final_vals": seed_vals,
                           "seed_spread": (max(seed_vals) - min(seed_vals)) if len(seed_vals) > 1 else None,
                           "baseline_seconds": statistics.median(r.train_seconds for r in base),
                           "baseline_time_to_target": base_t, "baseline_backward_to_target": base_b,
                           "final_val_baseline": target, "variants": {}, "sweep": sweep}
    for var in variants:
        hyb = [r for r in runs if r.kind == f"hybrid:{var}"]
        controls = [r for r in runs if r.kind == f"control:{var}"]
        ctl = controls or base  # no skipped steps: the control is the baseline
        h_t = _median([time_to(r.curve, target) for r in hyb])
        c_t = _median([time_to(r.curve, target) for r in ctl])
        ratios = [r.cost_ratio for r in hyb if r.cost_ratio is not None]
        out["variants"][var] = {
            "config": variants[var],
            "final_val_hybrid": statistics.median(r.final_val for r in hyb),
            "final_val_equal_compute": statistics.median(r.final_val for r in ctl),
            "hybrid_seconds": statistics.median(r.train_seconds for r in hyb),
            "equal_compute_steps": ctl[0].steps,
            "equal_compute_run": bool(controls),
            "hybrid_time_to_target": h_t,
            "equal_compute_time_to_target": c_t,
            "speedup_vs_baseline": base_t / h_t if base_t and h_t else None,
            "speedup_vs_equal_compute": c_t / h_t if c_t and h_t else None,
            "backward_to_target": _median([time_to(r.curve, target, "backward") for r in hyb]),
            "predict_fraction": statistics.median(r.predict_fraction for r in hyb),
            "rollbacks": statistics.median(r.rollbacks for r in hyb),
            "kept_phases": statistics.median(r.kept_phases for r in hyb),
            "refused_phases": statistics.median(r.refused_phases for r in hyb),
            "cost_ratio": statistics.median(ratios) if ratios else None,
        }
    out["runs"] = [asdict(r) for r in runs]
    out["machine"] = machine(args)
    (args.out / f"{name}.json").write_text(json.dumps(out, indent=1))
    plot(name, runs, target, args.out / f"{name}.png")
    return out


def machine(args: argparse.Namespace) -> str:
    if args.accelerator == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    # The CPU model and the kernels' instruction set: the same code and seed give other numbers on another CPU
    # (the CNN's baseline ended at 0.2016 on one machine and 0.1787 on this one, code unchanged)
    cpu = _cpu_model() or platform.processor() or platform.machine()
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{cpu} CPU ({isa}), {torch.get_num_threads()} thread(s), torch {torch.__version__}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def plot(name: str, runs: list[Run], target: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        if r.repeat != 0 or r.kind.startswith("sweep"):
            continue
        style = "-" if r.kind == "baseline" else ("--" if r.kind.startswith("hybrid") else ":")
        ax.plot([p.seconds for p in r.curve], [p.val for p in r.curve], style, marker="o", ms=3, label=r.kind)
    ax.axhline(target, color="gray", lw=0.8, label="target (baseline final)")
    ax.set_xlabel("training wall-clock (s, validation excluded)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{name}: validation loss vs time (repeat 0)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(x: float | None, spec: str = ".2f", none: str = "not reached") -> str:
    return none if x is None else format(x, spec)


def table(results: list[dict]) -> str:
    rows = ["| workload | variant | final val: baseline / hybrid / equal-compute (seed spread) | predicted steps "
            "| rollbacks | predict/full cost | wall-clock to target vs baseline | vs equal-compute "
            "| backward passes to target (hybrid / baseline) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for var, v in res["variants"].items():
            skipped = v["equal_compute_run"]
            ctl = f"{v['final_val_equal_compute']:.4f}" if skipped else "same as baseline"
            speed_c = _fmt(v["speedup_vs_equal_compute"], ".2f") + "x" if skipped else "n/a (no step skipped)"
            rows.append(
                f"| {res['workload']} | {var} | {res['final_val_baseline']:.4f} / {v['final_val_hybrid']:.4f} / {ctl} "
                f"({_fmt(res['seed_spread'], '.4f', 'n/a')}) "
                f"| {100 * v['predict_fraction']:.1f}% | {v['rollbacks']:g} of {v['rollbacks'] + v['kept_phases']:g}"
                f"{_refused(v)} "
                f"| {_fmt(v['cost_ratio'], '.3f', 'n/a')} | {_fmt(v['speedup_vs_baseline'], '.2f')}x "
                f"| {speed_c} | {_fmt(v['backward_to_target'], '.0f')} / "
                f"{_fmt(res['baseline_backward_to_target'], '.0f')} |")
    return "\n".join(rows).replace("not reachedx", "not reached")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--variants", nargs="+", help="hybrid variants to run (default: all in the workload YAML)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3, help="baseline runs with seeds 0..n-1: the final-loss noise floor")
    p.add_argument("--seed", type=int, default=0,
                   help="init and data-order seed of the comparison runs (baseline, hybrids, controls)")
    p.add_argument("--regime", default="adamw_cosine", choices=REGIMES,
                   help="training regime; the baseline and the controls train in it too (LR from the regime)")
    p.add_argument("--predict-until", type=float, default=None, metavar="FRACTION",
                   help="research: hybrid runs start no Predict phase that would end after this fraction of "
                        "their steps (0.8 with --regime wsd: the stable phase only)")
    p.add_argument("--layer-lr", nargs="+", metavar="PREFIX", default=None,
                   help="parameters whose names start with these get --layer-lr-factor times the LR in every run")
    p.add_argument("--layer-lr-factor", type=float, default=2.0)
    p.add_argument("--layer-lr-between", nargs=2, type=float, default=[0.5, 1.0], metavar=("FROM", "UNTIL"),
                   help="where --layer-lr applies, as fractions of each run's steps (never during warmup)")
    p.add_argument("--val-batches", type=val_batches_arg, default=None, metavar="N",
                   help="validation batches per evaluation in every run (default: the workload's val_batches)")
    p.add_argument("--tune", action="store_true", help="re-run the baseline LR sweep and use its best LR")
    p.add_argument("--tune-wd", action="store_true",
                   help="with --regime tuned_wd or finetune_wd: re-run the baseline's LR x weight-decay grid (the "
                        "lr_sweep and wd_sweep of tuned_wd or finetune.wd in the workload YAML, at --seed) and "
                        "use its best")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (pinned for comparable timings)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.tune and args.regime not in ("adamw_cosine", "finetune"):
        p.error("--tune sweeps the workload's own learning rates (finetune's with --regime finetune); use it with "
                "the default regime or finetune")
    if args.tune_wd and args.regime not in ("tuned_wd", "finetune_wd"):
        p.error("--tune-wd sweeps the LR and weight decay of the tuned_wd or finetune_wd regime; use it with one")
    if args.predict_until is not None and not 0 < args.predict_until <= 1:
        p.error("--predict-until must be in (0, 1]")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.time_to_loss " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    results = [run_workload(w, args) for w in args.workloads]
    md = (f"Command: `{command.strip()}`  \nMachine: {results[0]['machine']}; {args.repeats} interleaved repeats; "
          f"medians.\n\n{table(results)}\n")
    (args.out / "time_to_loss.md").write_text(md)
    print("\n" + md)
    for res in results:
        default = res["variants"].get("default") or next(iter(res["variants"].values()))
        keys = ("speedup_vs_baseline", "speedup_vs_equal_compute", "final_val_hybrid", "predict_fraction", "rollbacks")
        line = {"workload": res["workload"], **{k: default[k] for k in keys},
                "final_val_baseline": res["final_val_baseline"],
                "variants": {var: {k: v[k] for k in keys} for var, v in res["variants"].items()}}
        print(json.dumps(line))
    return results


if __name__ == "__main__":
    main()
