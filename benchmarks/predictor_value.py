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

from benchmarks.partial_predict import probe_loss
from benchmarks.regimes import REGIMES, regime_model, regime_spec
from benchmarks.time_to_loss import HERE, WORKLOADS, _load
from hybrid_lightning import HybridConfig, HybridPredictiveTraining
from hybrid_lightning.config import PREDICTORS


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
            with torch.random.fork_rng():  # an iterator may draw a seed: keep training's random stream
                self._val = [b for _, b in zip(range(self.batches), trainer.datamodule.val_dataloader())]
        torch._foreach_lerp_(self._ema, params, 1 - self.decay)
        if trainer.global_step % self.every:
            return
        training = pl_module.training
        pl_module.eval()
        raw = statistics.fmean(probe_loss(pl_module, b) for b in self._val)
        saved = [p.clone() for p in params]
        torch._foreach_copy_(params, self._ema)
        ema = statistics.fmean(probe_loss(pl_module, b) for b in self._val)
        torch._foreach_copy_(params, saved)
        pl_module.train(training)
        self.curve.append((trainer.global_step, raw, ema))


def measure(spec: dict, predictor: str, horizon: int, min_full: int, nowcaster: str = "",
            regime: str = "adamw_cosine", seed: int = 0, line_search: list[float] | None = None,
            unguarded: bool = False, drift_span: int | None = None, steps: int | None = None,
            averaged_probe: bool = False) -> dict:
    """One forced run (``predictor="real"``: no prediction at all) -> q per phase and the final val loss.
    ``seed`` sets the model's initialization and the data order. ``unguarded``: keep every phase whose probe
    loss does not grow more than 11-fold (the paired probe still measures q). ``steps``: run this many steps instead
    of the workload's (the schedule compressed to them). ``averaged_probe``: record :class:`AveragedProbe`'s curve."""
    if steps is not None:
        spec = {**spec, "steps": steps}
    cfg = forced_config(spec["steps"], predictor, horizon, min_full, nowcaster, line_search, unguarded, drift_span)
    L.seed_everything(seed, verbose=False)
    spec = regime_spec(spec, regime)
    model = regime_model(_load(spec["model"])(**spec["model_args"], lr=spec["lr"], total_steps=0), regime)
    data = _load(spec["data"])(**{**spec["data_args"], "seed": seed})
    cb = HybridPredictiveTraining(cfg, verbose=False)
    probe = AveragedProbe() if averaged_probe else None
    quiet = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                 enable_model_summary=False)
    L.Trainer(max_steps=spec["steps"], strategy="hybrid", callbacks=[cb] + ([probe] if probe else []),
              limit_val_batches=0,
              num_sanity_val_steps=0, **quiet).fit(model, data)
    [val] = L.Trainer(limit_val_batches=spec["val_batches"], **quiet).validate(model, data, verbose=False)
    rows = [(r.start_step, r.raw_value) for r in cb.results if r.reason == "probe"]
    lengths = [r.step_length for r in cb.results if r.reason == "probe"]
    n = spec["steps"]
    thirds = {}
    for name, lo, hi in (("early", 0, n / 3), ("mid", n / 3, 2 * n / 3), ("late", 2 * n / 3, n)):
        qs = [q for s, q in rows if lo <= s < hi]
        thirds[name] = {"median_q": statistics.median(qs) if qs else None,
                        "positive": sum(q > 0 for q in qs) / len(qs) if qs else None, "phases": len(qs)}
    qs = [q for _, q in rows]
    return {"phases": len(qs), "median_q": statistics.median(qs) if qs else None,
            "mean_q": statistics.fmean(qs) if qs else None,
            "positive": sum(q > 0 for q in qs) / len(qs) if qs else None,
            "kept": cb.report.kept_phases, "thirds": thirds, "final_val": float(val["val_loss"]),
            "predicted_steps": cb.report.backward_skipped, "steps": n,
            "refused": sum(r.refused for r in cb.results),
            "probe_curve": probe.curve if probe else None,
            "median_step_length": statistics.median(lengths) if lengths else None}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--predictors", nargs="+", default=["real", "null", "constant_velocity", "rssm", "tail_average",
                                                       "dmd"], choices=("real", "control", *PREDICTORS))
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--min-full", type=int, default=24)
    p.add_argument("--nowcaster", default="", help="weights for predictor nowcast (default: the shipped ones)")
    p.add_argument("--regimes", nargs="+", default=["adamw_cosine"], choices=REGIMES)
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
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    args = p.parse_args(argv)
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
                                 args.drift_span, steps, args.averaged_probe)}
                out.append(res)
                print(f"[{w} {regime}] {pred}: median q {res['median_q']}, q>0 in {res['positive']}", flush=True)

    report(out, args.horizon, args.min_full)
    report_midrun(out)
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
            for lo, hi in ((0, n / 3), (n / 3, 2 * n / 3), (2 * n / 3, n + 1)):
                qs = [r[field] for r in mine if lo <= r["step"] < hi and r[field] is not None]
                parts.append(f"{statistics.median(qs):+.2f}" if qs else "n/a")
            cells.append(" / ".join(parts))
        last = finals.get(key)
        print(f"| {' | '.join(key)} | {cells[0]} | {cells[1]} | {'n/a' if last is None else f'{last:+.2f}'} |")


def _line_search_cell(r: dict) -> str:
    if not r.get("refused") and r.get("median_step_length") in (None, 1.0):
        return "-"
    length = r["median_step_length"]
    return f"{r['refused']} / {'n/a' if length is None else f'{length:g}'}"


if __name__ == "__main__":
    main()
