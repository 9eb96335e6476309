"""What is a predicted step worth? q per Predict phase, for each predictor, over a whole training run.

    python -m benchmarks.predictor_value [--workloads mlp cnn char_gpt] [--predictors ...] [--horizon 16]
        [--regimes adamw_cosine constant_lr low_lr large_batch sgd] [--seed 0] [--line-search 0.5 1 2 4]

For each workload and predictor, one run with the plugin forced to predict for ``horizon`` steps after
every ``min_full`` real steps (threshold 0, one horizon arm, no cooldown, exploration always on). Each
phase is judged by the engine's paired probe; q = (probe loss before - after) / (steps x the real
loss decrease per step), before the keep/rollback decision: q = 1 means a predicted step was worth
a real one, 0 nothing, < 0 harm. Reports the median q and its fraction > 0 per third of training.
Each run also ends with the validation loss, and ``real`` (no prediction) and ``null`` (the same
steps predicted as "no change") anchor a *lasting* q: how much of a real step's value the predicted
steps still hold at the end of training (1: as good as real steps; 0: as good as skipping them).
``control`` (after ``null``) is the equal-compute control: plain training for as many real steps as the
null run took, its schedule compressed to them.
Output is about value, not time: no timing claims. Last lines: one JSON object per (workload, predictor).

``--unguarded`` keeps phases the paired probe would roll back, to measure their lasting value: a
predictor whose probe q is negative can still leave a lasting gain (``drift``, docs/predictors.md).

``--fork-judge R ...`` follows each kept phase for R real steps and compares it with a counterfactual trained
from the weights before the phase on the same batches at the same learning rates (:class:`ForkJudge`): how long
until a phase's value shows, which a probe right after it cannot see.

``--regimes`` (issue 7, item 5) changes the training setup (``benchmarks/regimes.py``): ``adamw_cosine``
is the workload as tuned (AdamW, warmup + cosine); ``constant_lr`` keeps the LR flat after warmup;
``low_lr`` is a fine-tuning-like setup (a tenth of the tuned LR, flat); ``large_batch`` uses 4x the
batch; ``sgd`` replaces AdamW with SGD + Nesterov momentum 0.9 at the workload's ``sgd_lr``.
"""

from __future__ import annotations

import argparse
import json
import statistics

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from benchmarks.partial_predict import probe_loss, train_loss
from benchmarks.regimes import FINETUNE, REGIMES, regime_model, regime_spec
from benchmarks.time_to_loss import HERE, WORKLOADS, _load
from hybrid_lightning import HybridConfig, HybridPredictiveTraining
from hybrid_lightning.config import PREDICTORS
from hybrid_lightning.core.phases import Phase


def forced_config(steps: int, predictor: str, horizon: int, min_full: int, nowcaster: str = "",
                  line_search: list[float] | None = None, unguarded: bool = False,
                  drift_span: int | None = None) -> HybridConfig:
    """The plugin forced to predict ``horizon`` steps after every ``min_full`` real ones (``real``: never)."""
    real = predictor == "real"
    cfg = HybridConfig(warmup_steps=steps // 10, min_full_steps=min_full, max_predict_steps=horizon,
                       predict_threshold=1.0 if real else 0.0, predictor="null" if real else predictor)
    cfg.bandit.arms = [0, horizon]
    cfg.bandit.alpha = 100.0
    cfg.bandit.cooldown_steps = 0
    cfg.bandit.dormant_after = 0
    cfg.corrector.weight_correction = False  # value of the prediction itself
    cfg.dynamics.nowcaster = nowcaster
    if drift_span is not None:
        cfg.dynamics.drift_span = drift_span
    if unguarded:
        cfg.divergence.rollback_tolerance = 10.0  # the largest the config allows
        cfg.divergence.confirm_batches = 0
    if predictor not in ("real", "null"):  # the null control must stay a null control
        cfg.line_search = line_search
    return cfg.validate()


def thirds(n: int) -> tuple[tuple[float, float], ...]:
    """The early, mid and late thirds of an ``n``-step run as half-open step ranges; step ``n`` is late."""
    return (0, n / 3), (n / 3, 2 * n / 3), (2 * n / 3, n + 1)


def first_batches(loader, n: int) -> list:
    """The first ``n`` batches of ``loader``, drawn without touching training's random stream (an iterator may
    draw a seed)."""
    with torch.random.fork_rng():
        return [b for _, b in zip(range(n), loader)]


def val_batches(trainer, n: int) -> list:
    """The first ``n`` validation batches (see :func:`first_batches`)."""
    return first_batches(trainer.datamodule.val_dataloader(), n)


@torch.no_grad()
def fixed_loss(module: torch.nn.Module, batches: list, weights: list[torch.Tensor] | None = None) -> float:
    """Mean loss of ``batches`` in eval mode, of the module's weights or of ``weights`` put in for the measurement;
    the module is left as it was."""
    params = [p.detach() for p in module.parameters()]
    if weights is not None:
        saved = [p.clone() for p in params]
        torch._foreach_copy_(params, weights)
    training = module.training
    module.eval()
    with torch.random.fork_rng():
        value = statistics.fmean(probe_loss(module, b) for b in batches)
    module.train(training)
    if weights is not None:
        torch._foreach_copy_(params, saved)
    return value


def _opt_state(opt: torch.optim.Optimizer) -> dict:
    return {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for p, st in opt.state.items()}


class AveragedProbe(Callback):
    """Every ``every`` steps, the loss of the weights and of their EMA (``decay`` per step, predicted steps included)
    on the same ``batches`` validation batches. The EMA removes the back-and-forth across the valley that the
    schedule's final anneal also removes, so what a predicted step will be worth at the end shows in it mid-run."""

    def __init__(self, every: int = 40, batches: int = 4, decay: float = 0.99) -> None:
        self.every, self.batches, self.decay = every, batches, decay
        self.curve: list[tuple[int, float, float]] = []  # (step, loss of the weights, loss of their EMA)
        self._ema: list[torch.Tensor] | None = None
        self._val: list = []

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = [p.detach() for p in pl_module.parameters()]
        if self._ema is None:
            self._ema = [p.clone() for p in params]
            self._val = val_batches(trainer, self.batches)
        torch._foreach_lerp_(self._ema, params, 1 - self.decay)
        if trainer.global_step % self.every:
            return
        raw, ema = fixed_loss(pl_module, self._val), fixed_loss(pl_module, self._val, self._ema)
        self.curve.append((trainer.global_step, raw, ema))


class ForkJudge(Callback):
    """After a kept Predict phase, the loss on ``batches`` fixed validation batches of the weights ``r`` real steps
    later (r in ``at``), against a counterfactual: the weights from before the phase, optimizer state as it was,
    trained on the very same ``r`` batches at the very same learning rates. Paired this way the only difference is
    the phase, so its value shows after ``r`` steps of re-equilibration that a probe right at the phase's end
    (r = 0) cannot see. With r beyond the next phase, the window holds the later phases too: the predicting
    schedule against plain training on the same real batches. The next window opens at the next kept phase.
    Runs after :class:`HybridPredictiveTraining` in the callback list; training is left bit-identical (the
    weights, ``state_dict`` buffers, optimizer state and learning rates are put back). The replay calls the
    module and the optimizer directly: no gradient clipping, precision plugin or accumulation, which the
    workloads do not use. A window still open when training ends is dropped."""

    def __init__(self, hybrid: HybridPredictiveTraining, at: tuple[int, ...] = (0, 4, 8, 16, 24),
                 batches: int = 4) -> None:
        self.hybrid, self.at, self.batches = hybrid, at, batches
        # per judged phase: start step, {r: predicted steps so far}, {r: (loss, counterfactual's)}
        self.rows: list[dict] = []
        self._val: list = []
        self._before: dict | None = None  # weights + buffers before the phase that is running
        self._open: dict | None = None  # a kept phase being followed

    def _state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def _loss(self, module: torch.nn.Module, weights: list[torch.Tensor] | None = None) -> float:
        return fixed_loss(module, self._val, weights)

    @staticmethod
    def _add(total: list[torch.Tensor] | None, module: torch.nn.Module) -> list[torch.Tensor]:
        params = [p.detach() for p in module.parameters()]
        if total is None:
            return [p.clone() for p in params]
        torch._foreach_add_(total, params)
        return total

    def _mean_loss(self, module: torch.nn.Module, total: list[torch.Tensor], n: int) -> float:
        return self._loss(module, torch._foreach_div(total, n))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        plan = getattr(trainer.strategy, "hybrid_plan", None)
        if self._open is not None and plan is not None and plan.runs_backward:
            self._open["steps"].append((batch, [g["lr"] for g in trainer.optimizers[0].param_groups]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        report = self.hybrid.last_report
        if report is None:
            return
        if not self._val:
            self._val = val_batches(trainer, self.batches)
        if self._open is not None and not report.phase.runs_backward:
            self._open["predicted"] += 1  # a later phase inside the window: the counterfactual has none
        if self._open is not None and report.phase.runs_backward:
            n = len(self._open["steps"])
            self._open["sum"] = self._add(self._open["sum"], pl_module)
            if n in self.at:
                self._open["predicted_at"][n] = self._open["predicted"]
                self._open["phase"][n] = self._loss(pl_module)
                self._open["phase_avg"][n] = self._mean_loss(pl_module, self._open["sum"], n)
            if n == max(self.at):
                self._counterfactual(trainer, pl_module)
        result = report.phase_result
        if result is not None and self._before is not None:
            if result.kept and self._open is None:
                self._open = {"start": result.start_step, "predicted": result.steps, "predicted_at": {0: result.steps},
                              "before": self._before, "steps": [], "phase": {0: self._loss(pl_module)},
                              "phase_avg": {}, "sum": None,
                              "opt": _opt_state(trainer.optimizers[0])}
            self._before = None
        if report.phase.runs_backward and report.next_phase is Phase.PREDICT:
            self._before = self._state(pl_module)

    def _counterfactual(self, trainer, pl_module) -> None:
        o, self._open = self._open, None
        opt = trainer.optimizers[0]
        now = self._state(pl_module)
        opt_now = _opt_state(opt)
        lrs = [g["lr"] for g in opt.param_groups]
        live = pl_module.state_dict()
        with torch.no_grad():
            for k, v in o["before"].items():
                live[k].copy_(v)
        _put_opt_state(opt, o["opt"])
        cf, cf_avg, total = {0: self._loss(pl_module)}, {}, None
        with torch.random.fork_rng():
            for i, (b, step_lrs) in enumerate(o["steps"], 1):
                for g, lr in zip(opt.param_groups, step_lrs):
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                train_loss(pl_module, b).backward()
                opt.step()
                total = self._add(total, pl_module)
                if i in self.at:
                    cf[i] = self._loss(pl_module)
                    cf_avg[i] = self._mean_loss(pl_module, total, i)
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, v in now.items():
                live[k].copy_(v)
        _put_opt_state(opt, opt_now)
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        self.rows.append({"start": o["start"], "predicted": o["predicted_at"],
                          "loss": {r: (o["phase"][r], cf[r]) for r in self.at},
                          # the mean of the weights over the r real steps after the phase: the back-and-forth
                          # across the valley that the final anneal removes, averaged out
                          "avg": {r: (o["phase_avg"][r], cf_avg[r]) for r in self.at if r}})


def _put_opt_state(opt: torch.optim.Optimizer, saved: dict) -> None:
    """Write a saved optimizer state back into the live tensors (in place: nothing else's references break)."""
    for p, st in saved.items():
        live = opt.state[p]
        for k, v in st.items():
            if torch.is_tensor(v) and torch.is_tensor(live.get(k)):
                live[k].copy_(v)
            else:
                live[k] = v.clone() if torch.is_tensor(v) else v


def measure(spec: dict, predictor: str, horizon: int, min_full: int, nowcaster: str = "",
            regime: str = "adamw_cosine", seed: int = 0, line_search: list[float] | None = None,
            unguarded: bool = False, drift_span: int | None = None, steps: int | None = None,
            averaged_probe: bool = False, fork_judge: tuple[int, ...] = ()) -> dict:
    """One forced run (``predictor="real"``: no prediction at all) -> q per phase and the final val loss.
    ``seed`` sets the model's initialization and the data order. ``unguarded``: keep every phase whose probe
    loss does not grow more than 11-fold (the paired probe still measures q). ``steps``: run this many steps instead
    of the workload's (the schedule compressed to them). ``averaged_probe``: record :class:`AveragedProbe`'s curve.
    ``fork_judge``: record :class:`ForkJudge`'s rows at these numbers of real steps after each kept phase."""
    if steps is not None:
        spec = {**spec, "steps": steps}
    cfg = forced_config(spec["steps"], predictor, horizon, min_full, nowcaster, line_search, unguarded, drift_span)
    L.seed_everything(seed, verbose=False)
    spec = regime_spec(spec, regime)
    model = regime_model(_load(spec["model"])(**spec["model_args"], lr=spec["lr"], total_steps=0), regime)
    data = _load(spec["data"])(**{**spec["data_args"], "seed": seed})
    cb = HybridPredictiveTraining(cfg, verbose=False)
    probe = AveragedProbe() if averaged_probe else None
    judge = ForkJudge(cb, tuple(sorted({0, *fork_judge}))) if fork_judge and predictor != "real" else None
    quiet = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                 enable_model_summary=False)
    L.Trainer(max_steps=spec["steps"], strategy="hybrid", callbacks=[cb] + [c for c in (probe, judge) if c],
              limit_val_batches=0,
              num_sanity_val_steps=0, **quiet).fit(model, data)
    [val] = L.Trainer(limit_val_batches=spec["val_batches"], **quiet).validate(model, data, verbose=False)
    rows = [(r.start_step, r.raw_value) for r in cb.results if r.reason == "probe"]
    lengths = [r.step_length for r in cb.results if r.reason == "probe"]
    n = spec["steps"]
    by_third = {}
    for name, (lo, hi) in zip(("early", "mid", "late"), thirds(n)):
        qs = [q for s, q in rows if lo <= s < hi]
        by_third[name] = {"median_q": statistics.median(qs) if qs else None,
                        "positive": sum(q > 0 for q in qs) / len(qs) if qs else None, "phases": len(qs)}
    qs = [q for _, q in rows]
    return {"phases": len(qs), "median_q": statistics.median(qs) if qs else None,
            "mean_q": statistics.fmean(qs) if qs else None,
            "positive": sum(q > 0 for q in qs) / len(qs) if qs else None,
            "kept": cb.report.kept_phases, "thirds": by_third, "final_val": float(val["val_loss"]),
            "predicted_steps": cb.report.backward_skipped, "steps": n,
            "refused": sum(r.refused for r in cb.results),
            "probe_curve": probe.curve if probe else None,
            "fork_judge": judge.rows if judge else None,
            "median_step_length": statistics.median(lengths) if lengths else None}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--predictors", nargs="+", default=["real", "null", "constant_velocity", "rssm", "tail_average",
                                                       "dmd"], choices=("real", "control", *PREDICTORS))
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--min-full", type=int, default=24)
    p.add_argument("--nowcaster", default="", help="weights for predictor nowcast (default: the shipped ones)")
    # its runs build their own models from an initialization: the fine-tuning regimes need time_to_loss.train's start
    p.add_argument("--regimes", nargs="+", default=["adamw_cosine"], choices=[r for r in REGIMES if r not in FINETUNE])
    p.add_argument("--seed", type=int, default=0, help="init and data-order seed of every run")
    p.add_argument("--line-search", type=float, nargs="+", default=None,
                   help="config line_search for every predictor but real and null (issue 7 item 1)")
    p.add_argument("--unguarded", action="store_true",
                   help="keep every phase unless its probe loss grows 11-fold: the lasting value of phases the "
                        "one-batch probe would roll back")
    p.add_argument("--drift-span", type=int, default=None, help="config dynamics.drift_span (predictor drift)")
    p.add_argument("--averaged-probe", action="store_true",
                   help="every 40 steps, the loss of the weights and of their EMA on 4 validation batches; reports "
                        "mid-run lasting q from them (needs real and null)")
    p.add_argument("--fork-judge", type=int, nargs="*", default=None, metavar="R",
                   help="after a kept phase, its value R real steps later (default 4 8 16 24) against the same steps "
                        "from the weights before it (ForkJudge; R > --min-full: the later phases count too); costs "
                        "max(R) extra real steps per judged window")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    args = p.parse_args(argv)
    fork = () if args.fork_judge is None else tuple(args.fork_judge or (4, 8, 16, 24))
    torch.set_num_threads(1)
    out = []
    for w in args.workloads:
        spec = yaml.safe_load((HERE / "workloads" / f"{w}.yaml").read_text())
        if args.quick:
            spec.update(spec.pop("quick"))
        for regime in args.regimes:
            for pred in args.predictors:
                steps = None
                if pred == "control":  # plain training for as many real steps as the null run took
                    null = next((r for r in out if r["workload"] == w and r["regime"] == regime
                                 and r["predictor"] == "null"), None)
                    if null is None:
                        p.error("predictor control needs null before it in --predictors")
                    steps = null["steps"] - null["predicted_steps"]
                res = {"workload": w, "regime": regime, "predictor": pred, "seed": args.seed,
                       **measure(spec, "real" if pred == "control" else pred, args.horizon, args.min_full,
                                 args.nowcaster, regime, args.seed, args.line_search, args.unguarded,
                                 args.drift_span, steps, args.averaged_probe, fork)}
                out.append(res)
                print(f"[{w} {regime}] {pred}: median q {res['median_q']}, q>0 in {res['positive']}", flush=True)

    report(out, args.horizon, args.min_full)
    report_midrun(out)
    report_fork_judge(out)
    for r in out:
        print(json.dumps(r))
    return out


def lasting_q(out: list[dict]) -> None:
    """Set ``lasting_q`` on every run: the share of a real step's value its predicted steps keep.

    A run with a share f of its steps predicted as worth nothing would end, by linear interpolation
    between the ``real`` run (f = 0) and the ``null`` run (f = f_null), at
    L0 = real + (null - real) * f / f_null; lasting q = (L0 - final) / (L0 - real). Single runs:
    when f is small, (L0 - real) is small and the value is mostly seed noise (``None`` below 5%).
    """
    runs = {(r["workload"], r["regime"], r["predictor"]): r for r in out}
    for r in out:
        real, null = (runs.get((r["workload"], r["regime"], k)) for k in ("real", "null"))
        r["lasting_q"] = None
        if r["predictor"] == "real" or real is None or null is None or not null["predicted_steps"]:
            continue
        f = r["predicted_steps"] / null["predicted_steps"]
        skipped_cost = (null["final_val"] - real["final_val"]) * f
        if r["predicted_steps"] >= 0.05 * r["steps"] and skipped_cost > 0:
            r["lasting_q"] = (real["final_val"] + skipped_cost - r["final_val"]) / skipped_cost


def report(out: list[dict], horizon: int, min_full: int) -> None:
    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:+.2f}"

    lasting_q(out)
    print(f"\nHorizon {horizon} predicted steps after every {min_full} real steps; q = value of a predicted "
          "step relative to a real one (paired probe), median over phases. Lasting q: the share of a real step's "
          "value the run's predicted steps still hold at the end of training, from its final val loss against the "
          "real (nothing predicted) and null (predicted steps change nothing) runs, scaled to its share of "
          "predicted steps (n/a below 5%). One seed: treat |differences| below ~0.3 as noise.\n")
    print("| workload | regime | predictor | phases | median q (all) | q>0 | early | mid | late | predicted | "
          "final val | lasting q | refused / step length |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in out:
        t = r["thirds"]
        print(f"| {r['workload']} | {r['regime']} | {r['predictor']} | {r['phases']} | {f(r['median_q'])} | "
              f"{0 if r['positive'] is None else r['positive']:.0%} | {f(t['early']['median_q'])} | "
              f"{f(t['mid']['median_q'])} | {f(t['late']['median_q'])} | {r['predicted_steps'] / r['steps']:.0%} | "
              f"{r['final_val']:.4f} | "
              f"{f(r['lasting_q'])} | {_line_search_cell(r)} |")


def midrun_q(out: list[dict]) -> list[dict]:
    """Per predicted run, lasting q at every probe step from the weights' and their EMA's loss against the real
    and null runs' at the same step: (null - run) / (null - real), where null - real > 1% of real."""
    runs = {(r["workload"], r["regime"], r["predictor"]): r for r in out}
    rows = []
    for r in out:
        real, null = (runs.get((r["workload"], r["regime"], k)) for k in ("real", "null"))
        if r["predictor"] in ("real", "null", "control") or not r.get("probe_curve") or real is None or null is None:
            continue
        at = [{t: (raw, ema) for t, raw, ema in run["probe_curve"]} for run in (real, null)]
        for t, raw, ema in r["probe_curve"]:
            if t not in at[0] or t not in at[1]:  # compared at equal steps only
                continue
            (raw0, ema0), (raw1, ema1) = at[0][t], at[1][t]
            q = [(n - x) / (n - o) if n - o > 0.01 * abs(o) else None
                 for x, o, n in ((raw, raw0, raw1), (ema, ema0, ema1))]
            rows.append({"workload": r["workload"], "regime": r["regime"], "predictor": r["predictor"], "step": t,
                         "q_weights": q[0], "q_ema": q[1]})
    return rows


def report_midrun(out: list[dict]) -> None:
    rows = midrun_q(out)
    if not rows:
        return
    print("\nMid-run lasting q from the loss on 4 fixed validation batches (every 40 steps), of the weights and "
          "of their EMA (decay 0.99 per step): median over the probes in each third of training.\n")
    print("| workload | regime | predictor | weights: early / mid / late | EMA: early / mid / late | final val's |")
    print("|---|---|---|---|---|---|")
    finals = {(r["workload"], r["regime"], r["predictor"]): r["lasting_q"] for r in out}
    for key in dict.fromkeys((r["workload"], r["regime"], r["predictor"]) for r in rows):
        mine = [r for r in rows if (r["workload"], r["regime"], r["predictor"]) == key]
        n = max(r["step"] for r in mine)
        cells = []
        for field in ("q_weights", "q_ema"):
            parts = []
            for lo, hi in thirds(n):
                qs = [r[field] for r in mine if lo <= r["step"] < hi and r[field] is not None]
                parts.append(f"{statistics.median(qs):+.2f}" if qs else "n/a")
            cells.append(" / ".join(parts))
        last = finals.get(key)
        print(f"| {' | '.join(key)} | {cells[0]} | {cells[1]} | {'n/a' if last is None else f'{last:+.2f}'} |")


def fork_judge_q(rows: list[dict], r: int, field: str = "loss") -> float | None:
    """The judged phases' value r real steps after them, in real steps per predicted step: the loss the phase saved
    (counterfactual - phase) over what its predicted steps would have saved at the counterfactual's own rate of
    progress per real step over those r steps. Summed over phases before dividing: single phases are noisy."""
    if not r or not rows:
        return None
    saved = sum(x[field][r][1] - x[field][r][0] for x in rows)
    worth = sum(x["predicted"][r] * (x["loss"][0][1] - x["loss"][r][1]) / r for x in rows)
    return saved / worth if worth > 0 else None


def report_fork_judge(out: list[dict]) -> None:
    runs = [r for r in out if r.get("fork_judge") and r["predictor"] != "null"]  # null's are 0 by construction
    if not runs:
        return
    at = sorted(int(k) for k in runs[0]["fork_judge"][0]["avg"])
    print("\nForkJudge: after each kept phase, the loss on 4 fixed validation batches r real steps later against the "
          "same r steps (batches, learning rates) from the weights before the phase: of the weights, and of their "
          "mean over the r steps. q: loss saved over what the predicted steps would have been worth at the "
          "counterfactual weights' progress per real step over those r steps, summed over the phases in each third "
          "of training; saved: the share of phases whose loss is lower than the counterfactual's.\n")
    print("| workload | regime | predictor | phases | r | weights: q early / mid / late | saved | "
          "mean over r: q early / mid / late | saved | final val's lasting q |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def cells(values: list, fmt: str) -> str:
        return " / ".join("n/a" if v is None else format(v, fmt) for v in values)

    for run in runs:
        rows, n = run["fork_judge"], run["steps"]
        parts_of = [[x for x in rows if lo <= x["start"] < hi] for lo, hi in thirds(n)]
        last = run.get("lasting_q")
        for r in at:
            parts = []
            for field in ("loss", "avg"):
                parts.append(cells([fork_judge_q(t, r, field) for t in parts_of], "+.2f"))
                parts.append(cells([sum(x[field][r][1] > x[field][r][0] for x in t) / len(t) if t else None
                                    for t in parts_of], ".0%"))
            print(f"| {run['workload']} | {run['regime']} | {run['predictor']} | {len(rows)} | {r} | "
                  f"{' | '.join(parts)} | {'n/a' if last is None else f'{last:+.2f}'} |")


def _line_search_cell(r: dict) -> str:
    if not r.get("refused") and r.get("median_step_length") in (None, 1.0):
        return "-"
    length = r["median_step_length"]
    return f"{r['refused']} / {'n/a' if length is None else f'{length:g}'}"


if __name__ == "__main__":
    main()
