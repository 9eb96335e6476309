"""Wall-clock to one target shared by several seeds: the median of their baselines' final validation losses.

    python -m benchmarks.seed_target benchmarks/results/drift/time_to_loss_k96_y48{,_seed1,_seed2}

``time_to_loss --seed S --seeds 1`` measures each seed against that seed's own baseline, so a seed whose
baseline happens to end high makes every variant look fast on it. This reads such runs back (one output
directory per seed: the same workloads and variants) and measures every seed against one target, the
median over seeds of the baselines' final validation losses (each the median over its repeats). A seed's
baseline that never gets there has no ratio; the cell then gives a lower bound, its whole training time
over the variant's time to target. Writes nothing: prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.time_to_loss import WORKLOADS, Point, _median, time_to


def _curves(data: dict, kind: str) -> list[list[Point]]:
    return [[Point(**p) for p in r["curve"]] for r in data["runs"] if r["kind"] == kind]


def _time(curves: list[list[Point]], target: float) -> float | None:
    return _median([time_to(c, target) for c in curves])


def _cell(base: float | None, base_total: float, other: float | None) -> str:
    if other is None:
        return "not reached"
    if base is None:
        return f"≥ {base_total / other:.2f}x (baseline not reached)"
    return f"{base / other:.2f}x"


def compare(dirs: list[Path]) -> list[dict]:
    """Per workload and variant: the shared target and, per seed directory, the ratios to it."""
    rows = []
    names = [w for w in WORKLOADS if (dirs[0] / f"{w}.json").exists()]  # the plugin writes its own reports there too
    for name in names:
        per_seed = [json.loads((d / f"{name}.json").read_text()) for d in dirs]
        target = statistics.median(s["final_val_baseline"] for s in per_seed)
        for var in per_seed[0]["variants"]:
            seeds = []
            for d, s in zip(dirs, per_seed):
                base = _curves(s, "baseline")
                base_t = _time(base, target)
                base_total = statistics.median(r["train_seconds"] for r in s["runs"] if r["kind"] == "baseline")
                h_t = _time(_curves(s, f"hybrid:{var}"), target)
                controls = _curves(s, f"control:{var}") or base
                c_t = _time(controls, target)
                seeds.append({"dir": str(d), "final_val_baseline": s["final_val_baseline"],
                              "final_val_hybrid": s["variants"][var]["final_val_hybrid"],
                              "baseline_time_to_target": base_t, "hybrid_time_to_target": h_t,
                              "equal_compute_time_to_target": c_t,
                              "vs_baseline": _cell(base_t, base_total, h_t),
                              "control_vs_baseline": _cell(base_t, base_total, c_t)})
            rows.append({"workload": name, "variant": var, "target": target, "seeds": seeds})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| workload | variant | shared target | final val per seed: baseline / hybrid | hybrid to target "
             "vs baseline, per seed | equal-compute control vs baseline, per seed |", "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seeds"]
        lines.append(f"| {r['workload']} | {r['variant']} | {r['target']:.4f} | "
                     + ", ".join(f"{x['final_val_baseline']:.4f} / {x['final_val_hybrid']:.4f}" for x in s) + " | "
                     + " / ".join(x["vs_baseline"] for x in s) + " | "
                     + " / ".join(x["control_vs_baseline"] for x in s) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path, help="time_to_loss output directories, one per seed")
    args = p.parse_args(argv)
    rows = compare(args.dirs)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
