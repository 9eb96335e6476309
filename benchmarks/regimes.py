"""Training regimes for the research benchmarks (issue 7, item 5): the same workload, trained differently.

``adamw_cosine`` is the workload as tuned (AdamW, warmup + cosine); ``constant_lr`` keeps the LR flat
after warmup; ``low_lr`` is a fine-tuning-like setup (a tenth of the tuned LR, flat); ``large_batch``
uses 4x the batch; ``sgd`` replaces AdamW with SGD + Nesterov momentum 0.9 at the workload's ``sgd_lr``
(same schedule).
"""

from __future__ import annotations

import types
from typing import Any

import torch

from hybrid_lightning.examples.common import WarmupCosine, resolve_total_steps

REGIMES = ("adamw_cosine", "constant_lr", "low_lr", "large_batch", "sgd")


def regime_spec(spec: dict, regime: str) -> dict:
    """The workload spec with one regime's changes (model/data args, LR)."""
    spec = {**spec, "model_args": dict(spec["model_args"]), "data_args": dict(spec["data_args"])}
    if regime in ("constant_lr", "low_lr"):
        spec["model_args"]["final_lr_frac"] = 1.0
    if regime == "low_lr":
        spec["lr"] = spec["lr"] / 10
    if regime == "large_batch":
        spec["data_args"]["batch_size"] = 4 * spec["data_args"].get("batch_size", 64)
    if regime == "sgd":
        spec["lr"] = spec["sgd_lr"]
    return spec


def _sgd_optimizers(self: Any) -> dict:  # replaces configure_optimizers for the ``sgd`` regime
    hp = self.hparams
    sgd = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9, nesterov=True)
    schedule = WarmupCosine(resolve_total_steps(self, hp.total_steps), hp.warmup_frac, hp.final_lr_frac)
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, schedule)
    return {"optimizer": sgd, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def regime_model(model: Any, regime: str) -> Any:
    """The model with the regime's optimizer (only ``sgd`` changes it)."""
    if regime == "sgd":
        model.configure_optimizers = types.MethodType(_sgd_optimizers, model)
    return model
