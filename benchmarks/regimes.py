"""Training regimes for the research benchmarks (issue 7, item 5): the same workload, trained differently.

``adamw_cosine`` is the workload as tuned (AdamW, warmup + cosine); ``constant_lr`` keeps the LR flat
after warmup; ``low_lr`` is a fine-tuning-like setup (a tenth of the tuned LR, flat); ``large_batch``
uses 4x the batch; ``sgd`` replaces AdamW with SGD + Nesterov momentum 0.9 at the workload's ``sgd_lr``
(same schedule); ``wsd`` keeps AdamW at the tuned LR with a warmup-stable-decay schedule (the same
warmup, flat until ``WSD_DECAY_START`` of the run, then linear decay to the same final LR); ``tuned_wd``
is ``adamw_cosine`` with the LR and AdamW weight decay (on the matrices) of the workload's ``tuned_wd``
entry, tuned together by a one-seed grid (``time_to_loss --regime tuned_wd --tune-wd``): as tuned, the
MLP and the CNN train without weight decay. ``finetune`` starts every run from the workload trained as tuned
on a related *source* task (the workload's ``finetune.source``: data-args overrides and a data seed offset;
here fewer examples of the same task, or the stdlib's first files) and trains at ``finetune.lr``, the best of
a one-seed sweep (``time_to_loss --regime finetune --tune`` sweeps ``finetune.lr_sweep``); ``finetune_wd`` is
the same with the LR and AdamW weight decay of ``finetune.wd``, a one-seed grid like ``tuned_wd``'s
(``--regime finetune_wd --tune-wd``).
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch

from hybrid_lightning.examples.common import WarmupCosine, resolve_total_steps

REGIMES = ("adamw_cosine", "constant_lr", "low_lr", "large_batch", "sgd", "wsd", "tuned_wd", "finetune", "finetune_wd")
FINETUNE = ("finetune", "finetune_wd")  # the regimes that start from the source task's weights
WSD_DECAY_START = 0.8  # fraction of the run after which the wsd regime's LR decays


class WarmupStableDecay:
    """Picklable ``LambdaLR`` callable: linear warmup, flat, then linear decay to ``final_frac`` over the
    steps from ``decay_start * total`` to ``total``."""

    def __init__(self, total: int, warmup_frac: float = 0.05, final_frac: float = 0.1,
                 decay_start: float = WSD_DECAY_START) -> None:
        self.total, self.warmup_frac = max(1, int(total)), float(warmup_frac)
        self.final_frac, self.decay_start = float(final_frac), float(decay_start)

    def __call__(self, step: int) -> float:
        warmup = int(round(self.warmup_frac * self.total))
        if step < warmup:
            return (step + 1) / warmup
        start = max(warmup, math.floor(self.decay_start * self.total))
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, self.total - start))
        return 1.0 + (self.final_frac - 1.0) * progress


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
    if regime == "tuned_wd":
        if "tuned_wd" not in spec:
            raise ValueError("regime tuned_wd needs the workload's tuned_wd entry ({lr, weight_decay}: the best of "
                             "an LR x weight-decay grid)")
        spec["lr"], spec["model_args"]["weight_decay"] = spec["tuned_wd"]["lr"], spec["tuned_wd"]["weight_decay"]
    if regime in FINETUNE:
        if "finetune" not in spec or (regime == "finetune_wd" and "wd" not in spec["finetune"]):
            raise ValueError(f"regime {regime} needs the workload's finetune entry ({{lr, lr_sweep, source: "
                             "{data_args, seed_offset}, wd: {lr, weight_decay, lr_sweep, wd_sweep}}; "
                             "wd for finetune_wd)")
        # the source task trains as the workload is tuned; the runs being compared, at the fine-tuning LR
        spec["_source_lr"], spec["_source_model_args"] = spec["lr"], dict(spec["model_args"])
        tuned = spec["finetune"]["wd"] if regime == "finetune_wd" else spec["finetune"]
        spec["lr"], spec["lr_sweep"] = tuned["lr"], tuned["lr_sweep"]
        if regime == "finetune_wd":
            spec["model_args"]["weight_decay"] = tuned["weight_decay"]
    return spec


def source_spec(spec: dict) -> dict:
    """The ``finetune`` regimes' source task: the workload as tuned, with the source's data args and data seed
    offset (``_data_seed_offset``, added to the run's seed for its data)."""
    source = spec["finetune"]["source"]
    return {**spec, "lr": spec["_source_lr"], "model_args": spec["_source_model_args"], "_regime": "adamw_cosine",
            "data_args": {**spec["data_args"], **source.get("data_args", {})},
            "_data_seed_offset": source.get("seed_offset", 0)}


def _sgd_optimizers(self: Any) -> dict:  # replaces configure_optimizers for the ``sgd`` regime
    hp = self.hparams
    sgd = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9, nesterov=True)
    schedule = WarmupCosine(resolve_total_steps(self, hp.total_steps), hp.warmup_frac, hp.final_lr_frac)
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, schedule)
    return {"optimizer": sgd, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def _wsd_optimizers(self: Any) -> dict:  # the workload's own optimizer, with the schedule replaced
    hp = self.hparams
    out = type(self).configure_optimizers(self)
    opt = out["optimizer"]
    schedule = WarmupStableDecay(resolve_total_steps(self, hp.total_steps), hp.warmup_frac, hp.final_lr_frac)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def regime_model(model: Any, regime: str) -> Any:
    """The model with the regime's optimizer or schedule (``sgd`` and ``wsd`` change them)."""
    if regime == "sgd":
        model.configure_optimizers = types.MethodType(_sgd_optimizers, model)
    if regime == "wsd":
        model.configure_optimizers = types.MethodType(_wsd_optimizers, model)
    return model
