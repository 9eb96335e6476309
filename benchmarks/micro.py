"""Micro-benchmarks of the engine's parts against the spec's §5.1 targets (this CPU, one thread).

    python -m benchmarks.micro

Prints a table (component, measured, target, met?) and, last, one JSON object of the measurements.
Timings are medians of repeated batches of calls; the first calls (warm-up) are discarded.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch

from hybrid_lightning.config import HybridConfig
from hybrid_lightning.core.dynamics import RSSMLite, predict_y_steps
from hybrid_lightning.core.state import FEATURE_DIM, TrainingState

N_LAYERS = 30  # about the parameter-tensor count of the char-GPT example


def timed(fn: Callable[[], object], inner: int, outer: int = 7) -> float:
    """Median seconds per call."""
    for _ in range(max(inner // 10, 1)):
        fn()
    runs = []
    for _ in range(outer):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        runs.append((time.perf_counter() - t) / inner)
    return statistics.median(runs)


def main() -> dict:
    torch.set_num_threads(1)
    cfg = HybridConfig()
    rssm = RSSMLite(N_LAYERS, 1, cfg.dynamics)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        features = torch.rand(FEATURE_DIM, generator=g) * 2 - 1
        rssm.observe(features, -0.01, 1 + 0.1 * torch.randn(N_LAYERS, 1, generator=g))
    state = TrainingState()
    for i in range(100):
        state.record_real(1.0 / (i + 1), 1.0, 0.1, 0.5, 10.0)
    stride = cfg.trajectory.stride
    feats, coeffs = state.features(), torch.ones(N_LAYERS, 1)

    def observe_and_train() -> None:
        rssm.observe(feats, -0.01, coeffs)
        rssm._train()

    results = {
        "rssm_predict_1_step_us": timed(lambda: predict_y_steps(rssm, 1, 1, 1.0), 200) * 1e6,
        "rssm_predict_15_steps_us": timed(lambda: predict_y_steps(rssm, 15, 1, 1.0), 50) * 1e6,
        "rssm_predict_75_steps_us": timed(lambda: predict_y_steps(rssm, 75, 1, 1.0), 10) * 1e6,
        "rssm_predict_75_steps_strided_us": timed(lambda: predict_y_steps(rssm, 75, stride, 1.0), 50) * 1e6,
        "state_encoding_us": timed(state.features, 2000) * 1e6,
        "gradient_observation_ms": timed(observe_and_train, 30) * 1e3,
        "confidence_cached_us": timed(rssm.confidence, 100_000) * 1e6,
        "history_update_ns": timed(lambda: state.record_real(0.5, 1.0), 20_000) * 1e9,
    }
    targets = [
        ("RSSM prediction, 1 step", "rssm_predict_1_step_us", "us", 100),
        ("RSSM prediction, 15 steps", "rssm_predict_15_steps_us", "us", 1000),
        ("RSSM prediction, 75 steps (one interval per step)", "rssm_predict_75_steps_us", "us", 10_000),
        (f"RSSM prediction, 75 steps (stride {stride}: {-(-75 // stride)} intervals)",
         "rssm_predict_75_steps_strided_us", "us", 10_000),
        (f"State encoding ({FEATURE_DIM} features)", "state_encoding_us", "us", 50),
        ("Gradient observation (filter + one BPTT update)", "gradient_observation_ms", "ms", 5),
        ("Confidence (cached)", "confidence_cached_us", "us", 1),
        ("State history update", "history_update_ns", "ns", 100),
    ]
    print(f"| component ({N_LAYERS} layers, ensemble {cfg.dynamics.ensemble_size} x {cfg.dynamics.samples} samples) "
          "| measured | spec target | met |")
    print("|---|---|---|---|")
    for label, key, unit, target in targets:
        v = results[key]
        print(f"| {label} | {v:.3g} {unit} | < {target} {unit} | {'yes' if v < target else 'no'} |")
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))
    return results


if __name__ == "__main__":
    main()
