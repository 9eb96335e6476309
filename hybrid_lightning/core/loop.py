"""A plain-PyTorch training loop driven by the engine (no Lightning): for tests and pure-torch users."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hybrid_lightning.core.engine import HybridEngine, StepObservation, StepReport

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass
class LoopResult:
    losses: list[float | None] = field(default_factory=list)  # per step; None on predicted steps without forward
    phases: list[str] = field(default_factory=list)
    reports: list[StepReport] = field(default_factory=list)


def train_steps(model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, batches: Iterable[Any],
                engine: HybridEngine, scheduler: Any = None, clip_grad_norm: float | None = None,
                clock: Callable[[], float] | None = time.perf_counter) -> LoopResult:
    """Run one optimizer step per batch. Real steps: forward, backward, optimizer (skipped when gradients
    are non-finite). Predicted steps: optional no-grad forward, then the engine's delta. The probe
    re-evaluates the step's batch without gradients, as the engine's phase check requires. Each step's
    time by ``clock`` feeds ``bandit.overhead_budget``; ``clock=None`` makes dormancy count steps alone
    (reproducible to the step, whatever the machine's speed). Calls may follow one another on the same
    engine; after the last, ``engine.end_of_training(probe)`` judges a Predict phase the run stopped inside."""
    out = LoopResult()
    for batch in batches:
        t0 = clock() if clock is not None else 0.0
        plan = engine.plan()
        obs = StepObservation()
        if plan.runs_backward:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            grads = [p.grad for p in engine.trajectory.params if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else 0.0
            obs.loss = float(loss.detach())
            obs.grad_norm = norm if plan.measure_grad_norm or not math.isfinite(norm) else None
            if math.isfinite(norm):
                if clip_grad_norm is not None:
                    nn.utils.clip_grad_norm_(engine.trajectory.params, clip_grad_norm)
                optimizer.step()
            else:
                obs.skipped = True
        else:
            if plan.run_forward:
                with torch.no_grad():
                    obs.loss = float(loss_fn(model, batch))
            engine.apply(plan)
        if scheduler is not None:
            scheduler.step()

        def probe(batch: Any = batch) -> float:
            with torch.no_grad():
                return float(loss_fn(model, batch))

        report = engine.observe(obs, probe=probe)
        if clock is not None:
            engine.record_seconds(clock() - t0)
        out.losses.append(obs.loss)
        out.phases.append(plan.phase.name)
        out.reports.append(report)
    return out
