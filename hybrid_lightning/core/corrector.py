"""ResidualCorrector: turns Predict-phase residuals into a loss correction and a weight correction.

- Loss correction: an online linear model (features -> normalized residual), so the next phase's
  predicted loss change is shifted by what similar phases missed by. Bounded by the largest
  residual in the store; zero when the store is empty.
- Weight correction: when a kept phase ended worse than predicted (residual r > 0), move each
  layer further along its mean real update, by ``gain * r / progress_rate`` steps' worth: the
  real progress the phase missed. Each layer's correction is bounded by the largest per-step real
  update observed for that layer. The engine keeps a correction only if the paired probe loss
  improves, and reports the outcome back here: the gain grows after corrections that helped and
  halves after ones that did not (O(1) online learning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hybrid_lightning.config import CorrectorConfig
from hybrid_lightning.core.residuals import Residual, ResidualStore
from hybrid_lightning.core.state import FEATURE_DIM


@dataclass
class Correction:
    loss_correction: float  # expected residual of the next phase (loss units), to add to its prediction
    coeffs: Tensor | None  # [L, K] basis coefficients of the weight correction; None = no correction
    confidence: float  # in [0, 1]: how consistent the stored residuals are


class ResidualCorrector:
    def __init__(self, n_layers: int, rank: int, config: CorrectorConfig | None = None) -> None:
        self.config = config or CorrectorConfig()
        self.n_layers, self.rank = n_layers, rank
        self.weights = torch.zeros(FEATURE_DIM + 1, dtype=torch.float64)  # input size from the state encoder
        self.gain = self.config.initial_gain
        self.updates = 0
        self.kept = 0
        self.tried = 0

    @staticmethod
    def _x(features: Tensor) -> Tensor:
        x = torch.nan_to_num(features.double().reshape(FEATURE_DIM), nan=0.0, posinf=1.0, neginf=-1.0)
        return torch.cat([x, torch.ones(1, dtype=torch.float64)])

    def loss_correction(self, features: Tensor, store: ResidualStore, loss_scale: float) -> float:
        if len(store) == 0:
            return 0.0
        pred = float(self.weights @ self._x(features)) * loss_scale
        bound = store.max_abs_residual()
        return max(-bound, min(bound, pred)) if math.isfinite(pred) else 0.0

    def compute_correction(self, features: Tensor, store: ResidualStore, residual: float, loss_scale: float,
                           progress_rate: float, direction_norms: Tensor, max_layer_norms: Tensor) -> Correction:
        """Correction after a kept phase that missed its prediction by ``residual`` (loss units)."""
        if len(store) == 0:
            return Correction(0.0, None, 0.0)
        res = store.residuals()
        mean = float(res.mean())
        consistency = float((torch.sign(res) == math.copysign(1.0, mean)).double().mean()) if len(res) else 0.0
        loss_corr = self.loss_correction(features, store, loss_scale)
        coeffs = None
        if (self.config.weight_correction and self.gain > 0 and math.isfinite(residual) and residual > 0
                and progress_rate > 0):
            steps = self.gain * residual / progress_rate
            # ||steps * D0_l|| <= max observed real update of layer l
            bound = torch.where(direction_norms > 0, max_layer_norms / direction_norms.clamp_min(1e-30),
                                torch.zeros_like(direction_norms))
            kappa = torch.minimum(torch.full_like(bound, steps), bound)
            if float(kappa.abs().max()) > 0:
                coeffs = torch.zeros(self.n_layers, self.rank)
                coeffs[:, 0] = kappa
        return Correction(loss_corr, coeffs, consistency)

    def update_from_residual(self, residual: Residual, loss_scale: float) -> None:
        """One SGD step of the loss-residual model on a normalized residual (O(FEATURE_DIM))."""
        target = residual.residual / max(loss_scale, 1e-12)
        if not math.isfinite(target):
            return
        target = max(-10.0, min(10.0, target))
        x = self._x(residual.features)
        err = target - float(self.weights @ x)
        self.weights += self.config.learning_rate * err * x / float(x @ x)
        self.updates += 1

    def record_outcome(self, improved: bool) -> None:
        self.tried += 1
        if improved:
            self.kept += 1
            self.gain = min(self.gain * 1.25, self.config.max_gain)
        else:
            self.gain *= 0.5

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.clone(), "gain": self.gain, "updates": self.updates, "kept": self.kept,
                "tried": self.tried}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.weights = sd["weights"].double().clone()
        self.gain = float(sd["gain"])
        self.updates, self.kept, self.tried = int(sd["updates"]), int(sd["kept"]), int(sd["tried"])
