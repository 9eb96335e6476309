"""Do no harm: a predictor that is always wrong, against plain training, side by side.

    python -m benchmarks.do_no_harm [--workloads mlp cnn] [--repeats 3] [--val-batches N]

The hybrid run uses a test double that is always confident and always predicts 40 mean updates
*backwards*. The guard must roll every phase back and the bandit must stop predicting, so the final
validation loss stays within 2% of plain training at the same number of steps and the wall-clock
overhead within 10%. Interleaved repeats, repeat r with seed r (model init and data order) for both
runs; the val ratio is the median of the per-seed ratios, shown next to the plain runs' own spread
across seeds. Prints a table and, last, one JSON line per workload.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.time_to_loss import HERE, Run, _say, load_spec, train, val_batches_arg
from hybrid_lightning.core.dynamics import ConstantVelocity, Rollout


class AlwaysWrong(ConstantVelocity):
    def rollout(self, intervals: int) -> Rollout:
        r = super().rollout(intervals)
        return Rollout(r.loss_delta, r.loss_var, torch.full_like(r.coeffs, -40.0))

    def confidence(self) -> float:
        return 1.0


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["mlp", "cnn"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--val-batches", type=val_batches_arg, default=None, metavar="N",
                   help="validation batches per evaluation (default: the workload's; 32 is the CNN's whole val set)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.set_defaults(quick=False, regime="adamw_cosine")  # load_spec's full sizes and the tuned regime
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in args.workloads:
        spec = load_spec(name, args)
        runs: list[Run] = []
        for rep in range(args.repeats):  # interleaved; repeat r uses seed r for both runs (paired)
            runs.append(train(spec, "baseline", spec["steps"], spec["lr"], rep, None, "cpu", seed=rep))
            _say(name, runs[-1])
            # the default config, with the always-wrong predictor in place of the RSSM
            runs.append(train(spec, "hybrid:always_wrong", spec["steps"], spec["lr"], rep, {}, "cpu", AlwaysWrong,
                              seed=rep))
            _say(name, runs[-1])
        base = [r for r in runs if r.kind == "baseline"]
        hyb = [r for r in runs if r.kind != "baseline"]
        fb, fh = statistics.median(r.final_val for r in base), statistics.median(r.final_val for r in hyb)
        tb, th = statistics.median(r.train_seconds for r in base), statistics.median(r.train_seconds for r in hyb)
        pairs = [h.final_val / b.final_val for b, h in zip(base, hyb)]
        lines.append({"workload": name, "final_val_baseline": fb, "final_val_always_wrong": fh,
                      "val_ratio": statistics.median(pairs), "val_ratios_per_seed": pairs,
                      "baseline_seed_spread": (max(r.final_val for r in base) - min(r.final_val for r in base)) / fb,
                      "wall_clock_ratio": th / tb,
                      "predict_fraction": statistics.median(r.predict_fraction for r in hyb),
                      "rollbacks": statistics.median(r.rollbacks for r in hyb),
                      "kept_phases": statistics.median(r.kept_phases for r in hyb)})
    print("\n| workload | final val plain / always-wrong | ratio (target <= 1.02) | wall-clock ratio (target <= 1.10) "
          "| predicted steps | phases rolled back / kept | plain runs' seed spread |")
    print("|---|---|---|---|---|---|---|")
    for x in lines:
        print(f"| {x['workload']} | {x['final_val_baseline']:.4f} / {x['final_val_always_wrong']:.4f} | "
              f"{x['val_ratio']:.4f} | {x['wall_clock_ratio']:.3f} | {100 * x['predict_fraction']:.1f}% | "
              f"{x['rollbacks']:g} / {x['kept_phases']:g} | {100 * x['baseline_seed_spread']:.1f}% |")
    for x in lines:
        print(json.dumps(x))
    return lines


if __name__ == "__main__":
    main()
