"""Helpers shared by the example workloads: LR schedule, optimizer setup, batched tensor datasets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset


def warmup_cosine(step: int, total: int, warmup_frac: float = 0.05, final_frac: float = 0.1) -> float:
    """LR multiplier: linear warmup over ``warmup_frac * total`` steps, then cosine decay to ``final_frac``.

    ``step`` is 0-based (the value ``LambdaLR`` passes). Steps past ``total`` stay at ``final_frac``.
    """
    total = max(1, int(total))
    warmup = int(round(warmup_frac * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    return final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Picklable ``LambdaLR`` callable; its attributes go into the scheduler's ``state_dict``."""

    def __init__(self, total: int, warmup_frac: float = 0.05, final_frac: float = 0.1) -> None:
        self.total = int(total)
        self.warmup_frac = float(warmup_frac)
        self.final_frac = float(final_frac)

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.total, self.warmup_frac, self.final_frac)


def resolve_total_steps(module: Any, total_steps: int = 0) -> int:
    """``total_steps`` if > 0, else ``module.trainer.estimated_stepping_batches``."""
    if total_steps and total_steps > 0:
        return int(total_steps)
    try:
        estimated = module.trainer.estimated_stepping_batches
    except RuntimeError as exc:  # module not attached to a Trainer
        raise ValueError("no Trainer attached: pass total_steps > 0 to size the LR schedule") from exc
    if not math.isfinite(estimated) or estimated <= 0:
        raise ValueError(
            f"cannot size the LR schedule from estimated_stepping_batches={estimated}; "
            "set Trainer(max_steps=...) / max_epochs, or the module's total_steps hparam"
        )
    return int(estimated)


def configure_adamw(
    module: torch.nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    warmup_frac: float = 0.05,
    final_lr_frac: float = 0.1,
    total_steps: int = 0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> dict[str, Any]:
    """AdamW + per-step warmup/cosine ``LambdaLR``, in the dict form ``configure_optimizers`` returns.

    With ``weight_decay > 0`` only parameters with ``dim >= 2`` (matrices, embeddings, conv kernels)
    are decayed (two param groups: decay first, then no-decay); otherwise a single group.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if weight_decay > 0:
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
    else:
        groups = [{"params": params, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas)
    total = resolve_total_steps(module, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total, warmup_frac, final_lr_frac))
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
    }


class BatchedTensorDataset(Dataset):
    """Like ``TensorDataset`` but fetches a whole batch with one indexing op (``__getitems__``).

    Use with ``collate_fn=collate_batched``; batches are tuples of tensors, as with ``TensorDataset``.
    """

    def __init__(self, *tensors: torch.Tensor) -> None:
        if not tensors or any(t.size(0) != tensors[0].size(0) for t in tensors):
            raise ValueError("tensors must be non-empty and share their first dimension")
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors[0].size(0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[idx] for t in self.tensors)


def collate_batched(batch: Any) -> Any:
    """``collate_fn`` for datasets whose ``__getitems__`` already returns a batch."""
    if isinstance(batch, list):  # per-item fallback (dataset without __getitems__ / sampler yields ints)
        return torch.utils.data.default_collate(batch)
    return batch
