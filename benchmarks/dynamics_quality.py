"""How well do the dynamics models predict real training? Record, replay, score.

    python -m benchmarks.dynamics_quality [--quick] [--rerecord]

1. Records real trajectories of plain training on the example workloads (cached under
   ``benchmarks/results/trajectories``; regenerate with ``--rerecord``).
2. Replays each recording through every predictor, online and in order, and scores the predictions
   made in the second half of each run (held out: nothing was tuned on them) against what happened:
   loss R^2 over the horizon, per-layer cosine between predicted and real horizon updates, and the
   calibration of the +-2 sigma band.
3. Measures the weight correction online: an eager hybrid run on each workload proposes corrections
   after Predict phases that missed their prediction; the gain is the probe-loss improvement of the
   correction over the uncorrected phase, as a fraction of the residual it was meant to repair.
4. Times the cached confidence query.

Prints a table per workload and predictor, then, as the last line, one JSON object with ``loss_r2``,
``delta_cosine``, ``correction_gain``, ``coverage_2sigma``, ``confidence_query_us`` for the RSSM pooled
over workloads (medians across workloads).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from benchmarks.time_to_loss import _load
from hybrid_lightning import HybridConfig, HybridPredictiveTraining
from hybrid_lightning.core.dynamics import make_dynamics
from hybrid_lightning.core.recorder import TrajectoryRecorder, replay

HERE = Path(__file__).resolve().parent
WORKLOADS = ("mlp", "cnn", "char_gpt")
PREDICTORS = ("constant_velocity", "rssm")


class Record(Callback):
    def __init__(self, config: HybridConfig, horizon: int) -> None:
        self.config, self.horizon = config, horizon
        self.recorder: TrajectoryRecorder | None = None

    def on_train_start(self, trainer, pl_module):
        params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
        self.recorder = TrajectoryRecorder(params, self.config, self.horizon)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.recorder.step(float(outputs["loss"]))


def _spec(name: str, quick: bool) -> dict:
    spec = yaml.safe_load((HERE / "workloads" / f"{name}.yaml").read_text())
    if quick:
        spec.update(spec.pop("quick"))
    return spec


def _trainer(steps: int, callbacks: list, strategy: str = "auto") -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, strategy=strategy, callbacks=callbacks,
                     limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


def record(name: str, spec: dict, config: HybridConfig, horizon: int, path: Path) -> dict:
    L.seed_everything(0, verbose=False)
    model = _load(spec["model"])(**spec["model_args"], lr=spec["lr"], total_steps=0)
    data = _load(spec["data"])(**spec["data_args"])
    rec = Record(config, horizon)
    _trainer(spec["steps"], [rec]).fit(model, data)
    out = rec.recorder.to_dict()
    torch.save(out, path)
    return out


def correction_gain(spec: dict, config: HybridConfig) -> dict:
    """Online: corrections proposed during an eager hybrid run (constant-velocity phases at threshold 0)."""
    L.seed_everything(0, verbose=False)
    model = _load(spec["model"])(**spec["model_args"], lr=spec["lr"], total_steps=0)
    data = _load(spec["data"])(**spec["data_args"])
    eager = HybridConfig.from_dict({**config.to_dict(), "predict_threshold": 0.0, "predictor": "constant_velocity",
                                    "warmup_steps": max(spec["steps"] // 10, 10), "min_full_steps": 10})
    eager.bandit.alpha = 5.0  # keep predicting: this run exists to exercise the corrector
    cb = HybridPredictiveTraining(eager, verbose=False)
    _trainer(spec["steps"], [cb], "hybrid").fit(model, data)
    gains, improved = [], []
    for r in cb.results:
        if math.isfinite(r.correction_loss) and r.residual > 0:
            gains.append((r.loss_uncorrected - r.correction_loss) / r.residual)
            improved.append(r.correction_loss < r.loss_uncorrected)
    return {"tried": len(gains), "mean_gain": statistics.fmean(gains) if gains else float("nan"),
            "median_gain": statistics.median(gains) if gains else float("nan"),
            "improved_fraction": sum(improved) / len(improved) if improved else float("nan")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rerecord", action="store_true")
    p.add_argument("--horizon", type=int, default=3, help="prediction horizon in observation intervals")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    config = HybridConfig()
    tdir = args.out / "trajectories"
    tdir.mkdir(parents=True, exist_ok=True)
    rows, per = [], {}
    for name in args.workloads:
        spec = _spec(name, args.quick)
        path = tdir / f"{name}{'_quick' if args.quick else ''}.pt"
        rec = torch.load(path, weights_only=False) if path.exists() and not args.rerecord else None
        if rec is None or rec["horizon"] < args.horizon:
            rec = record(name, spec, config, args.horizon, path)
        n_layers, rank = len(rec["names"]), rec["rank"]
        for pred in PREDICTORS:
            model = make_dynamics(pred, n_layers, rank, config.dynamics, config.seed)
            score = replay(model, rec, horizon=args.horizon)
            per[(name, pred)] = score
            rows.append((name, pred, score))
        per[(name, "correction")] = correction_gain(spec, config)
    print(f"Horizon {args.horizon} observation intervals = {args.horizon * config.trajectory.stride} steps; scored on "
          "the second half of each recording.\n")
    print("| workload | predictor | loss R^2 | loss R^2 at horizon | median layer cosine | 2-sigma coverage "
          "| predictions |")
    print("|---|---|---|---|---|---|---|")
    for name, pred, s in rows:
        print(f"| {name} | {pred} | {s['loss_r2']:.3f} | {s['loss_r2_last']:.3f} | {s['delta_cosine']:.3f} "
              f"| {s['coverage_2sigma']:.3f} | {s['predictions']} |")
    print("\n| workload | corrections tried | mean gain (fraction of residual) | median gain | improved |")
    print("|---|---|---|---|---|")
    for name in args.workloads:
        c = per[(name, "correction")]
        print(f"| {name} | {c['tried']} | {c['mean_gain']:.3f} | {c['median_gain']:.3f} | "
              f"{c['improved_fraction']:.2f} |")
    rssm = [per[(n, "rssm")] for n in args.workloads]
    corr = [per[(n, "correction")]["mean_gain"] for n in args.workloads]
    corr = [c for c in corr if math.isfinite(c)]
    summary = {
        "loss_r2": statistics.median(s["loss_r2"] for s in rssm),
        "delta_cosine": statistics.median(s["delta_cosine"] for s in rssm),
        "correction_gain": statistics.median(corr) if corr else None,
        "coverage_2sigma": statistics.median(s["coverage_2sigma"] for s in rssm),
        "confidence_query_us": statistics.median(s["confidence_query_us"] for s in rssm),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
