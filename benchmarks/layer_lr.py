"""Per-layer learning rates for the benchmarks' baselines: scale some layers' optimizer steps.

A predictor that moves some layers further than their optimizer does may only be making up for a global
LR that is too low for them; a baseline whose steps for those layers are scaled too (their LR tuned)
tells the two apart. Used by ``partial_predict`` (``--prefix-lr``) and ``time_to_loss`` (``--layer-lr``).
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

WARMUP = 0.1  # the workloads' warmup, a fraction of the run: its steps are never scaled


def prefix_params(module: torch.nn.Module, prefix: tuple[str, ...]) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if n.startswith(prefix)]


def windowed(t: int, total: int, between: tuple[float, float]) -> bool:
    """Step ``t`` lies after warmup and within the ``between`` fractions of the run."""
    return t >= int(WARMUP * total) and between[0] * total <= t < between[1] * total


class ScaledPrefixStep(Callback):
    """Scales the prefix's optimizer step by ``scale`` (its LR, for AdamW) on steps inside the range.

    Only steps that run the optimizer are scaled: a hybrid run's predicted steps are left as predicted. Put it
    before :class:`~hybrid_lightning.HybridPredictiveTraining` in the callback list, so that the plugin observes
    the scaled update."""

    def __init__(self, prefix: tuple[str, ...], scale: float, between: tuple[float, float] = (0.0, 1.0)) -> None:
        self.prefix, self.scale, self.between = prefix, scale, between
        self.scaled_steps = 0
        self._before: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        inside = windowed(trainer.global_step, trainer.max_steps, self.between)
        self._before = [p.detach().clone() for p in prefix_params(pl_module, self.prefix)] if inside else []

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._before:
            return
        # AdamW's step (weight decay included) is linear in the LR, so scaling the step scales the LR
        for p, b in zip(prefix_params(pl_module, self.prefix), self._before):
            p.copy_(torch.lerp(b, p, self.scale))
        self.scaled_steps += 1
        self._before = []
