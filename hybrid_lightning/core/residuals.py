"""ResidualStore: what Predict phases predicted versus what really happened, in a fixed-size ring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hybrid_lightning.core.state import FEATURE_DIM


@dataclass
class Residual:
    """One judged Predict phase. Loss changes are measured on the same (paired) batch."""

    step: int  # optimizer step at which the phase ended
    horizon: int  # predicted steps in the phase
    predicted_change: float  # predicted loss change over the phase
    actual_change: float  # measured loss change over the phase
    features: Tensor  # [FEATURE_DIM] state features when the phase began

    @property
    def residual(self) -> float:
        """Positive when training went worse than predicted."""
        return self.actual_change - self.predicted_change


class ResidualStore:
    """Fixed-capacity ring buffer backed by preallocated tensors: O(1) add, never grows."""

    _FIELDS = 5  # step, horizon, predicted, actual, residual

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._rows = torch.zeros(capacity, self._FIELDS, dtype=torch.float64)
        self._features = torch.zeros(capacity, FEATURE_DIM)
        self._next = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, r: Residual) -> None:
        i = self._next
        self._rows[i] = torch.tensor([r.step, r.horizon, r.predicted_change, r.actual_change, r.residual],
                                     dtype=torch.float64)
        self._features[i] = r.features.reshape(FEATURE_DIM)
        self._next = (i + 1) % self.capacity
        self._count = min(self._count + 1, self.capacity)

    def _live(self) -> slice:
        return slice(0, self._count)

    def residuals(self) -> Tensor:
        """[n] residuals, oldest first."""
        if self._count < self.capacity:
            return self._rows[: self._count, 4].clone()
        return torch.roll(self._rows[:, 4], -self._next).clone()

    def max_abs_residual(self) -> float:
        return float(self._rows[self._live(), 4].abs().max()) if self._count else 0.0

    def mean_residual(self) -> float:
        return float(self._rows[self._live(), 4].mean()) if self._count else 0.0

    def std_residual(self) -> float:
        return float(self._rows[self._live(), 4].std(unbiased=False)) if self._count > 1 else 0.0

    def latest(self) -> Residual | None:
        if not self._count:
            return None
        i = (self._next - 1) % self.capacity
        step, horizon, pred, actual, _ = self._rows[i].tolist()
        return Residual(int(step), int(horizon), pred, actual, self._features[i].clone())

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "rows": self._rows.clone(), "features": self._features.clone(),
                "next": self._next, "count": self._count}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if int(sd["capacity"]) != self.capacity:
            raise ValueError(f"residual store capacity {sd['capacity']} in state, {self.capacity} configured")
        self._rows = sd["rows"].double().clone()
        self._features = sd["features"].float().clone()
        self._next, self._count = int(sd["next"]), int(sd["count"])
