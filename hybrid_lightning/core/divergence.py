"""DivergenceMonitor: turns losses and gradient norms into a level and a RecoveryAction.

Signals: NaN/Inf, loss spike (robust z-score over a window of real-step losses), gradient norm
explosion or vanishing (against the running median), oscillation (the loss changes sign almost
every step), and prediction error (a predicted step's loss far outside the predicted band, or a
Predict phase that raised the loss on its paired probe batch).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hybrid_lightning.config import DivergenceConfig
from hybrid_lightning.errors import (
    HybridTrainingError,
    NumericalError,
    PredictionDivergence,
    RecoveryAction,
    TrainingInstability,
)


class Level(enum.IntEnum):
    NORMAL = 0
    CAUTION = 1  # worth knowing; shorten predictions
    WARNING = 2  # stop predicting now
    CRITICAL = 3  # numerical failure or a phase that must be undone


@dataclass
class DivergenceReport:
    level: Level = Level.NORMAL
    signals: list[str] = field(default_factory=list)
    action: RecoveryAction = RecoveryAction.CONTINUE
    error: HybridTrainingError | None = None

    @property
    def alarm(self) -> bool:
        """True when prediction must stop (and, inside a Predict phase, be rolled back)."""
        return self.level >= Level.WARNING

    def raise_to(self, level: Level, signal: str, action: RecoveryAction, error: HybridTrainingError) -> None:
        self.signals.append(signal)
        if level > self.level:
            self.level, self.action, self.error = level, action, error


def _median(xs: list[float]) -> float:
    """Plain-float median (statistics.median is exact but slow: it is called every step)."""
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _finite(*xs: float | None) -> bool:
    return all(x is None or math.isfinite(x) for x in xs)


class DivergenceMonitor:
    def __init__(self, config: DivergenceConfig | None = None) -> None:
        self.config = c = config or DivergenceConfig()
        self.losses: deque[float] = deque(maxlen=c.window)
        self.grad_norms: deque[float] = deque(maxlen=c.window)
        self.events = 0
        self.peak = 0.0  # largest median loss seen: the scale of "meaningful" loss changes

    # ------------------------------------------------------------------ statistics
    def _loss_center_spread(self) -> tuple[float, float] | None:
        if len(self.losses) < self.config.min_history:
            return None
        xs = list(self.losses)
        med = _median(xs)
        mad = _median([abs(x - med) for x in xs])
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
        self.peak = max(self.peak, abs(med))
        # 1.4826 * MAD estimates sigma for Gaussian noise; half the std covers two-valued (oscillating)
        # histories where the MAD collapses to 0. The floor is relative to the largest loss level seen:
        # near convergence a loss of 1e-5 that triples is noise, not a spike.
        spread = max(1.4826 * mad, 0.5 * std, 1e-2 * self.peak, 1e-12)
        return med, spread

    def loss_zscore(self, loss: float) -> float:
        cs = self._loss_center_spread()
        if cs is None:
            return 0.0
        return (loss - cs[0]) / cs[1]

    def _oscillating(self) -> bool:
        xs = list(self.losses)
        if len(xs) < self.config.min_history + 2:
            return False
        d = [b - a for a, b in zip(xs, xs[1:])]
        flips = sum(1 for a, b in zip(d, d[1:]) if a * b < 0)
        return flips / (len(d) - 1) >= self.config.oscillation_threshold

    # ------------------------------------------------------------------ checks
    def check_real(self, loss: float | None, grad_norm: float | None = None) -> DivergenceReport:
        """After a real step. Records the values (a spike is recorded clipped, NaN not at all)."""
        r = DivergenceReport()
        c = self.config
        if not _finite(loss, grad_norm):
            r.raise_to(Level.CRITICAL, "nonfinite", RecoveryAction.FORCE_FULL,
                       NumericalError(f"non-finite value on a real step: loss={loss}, grad_norm={grad_norm}",
                                      RecoveryAction.FORCE_FULL))
        else:
            cs = self._loss_center_spread() if loss is not None else None
            if loss is not None and cs is not None:
                z = (loss - cs[0]) / cs[1]
                if z > c.loss_sigma:
                    r.raise_to(Level.WARNING, "loss_spike", RecoveryAction.FORCE_FULL,
                               TrainingInstability(f"loss spike on a real step: loss={loss:.4g} is {z:.1f} "
                                                   f"robust sigmas above the recent median"))
            if grad_norm is not None and len(self.grad_norms) >= c.min_history:
                med = _median(list(self.grad_norms))
                if med > 0 and grad_norm > c.grad_explosion_factor * med:
                    r.raise_to(Level.WARNING, "grad_explosion", RecoveryAction.FORCE_FULL,
                               TrainingInstability(f"gradient norm {grad_norm:.4g} exceeds "
                                                   f"{c.grad_explosion_factor:g} x running median {med:.4g}"))
                elif med > 0 and grad_norm < c.grad_vanishing_factor * med:
                    r.raise_to(Level.CAUTION, "grad_vanishing", RecoveryAction.REDUCE_HORIZON,
                               TrainingInstability(f"gradient norm {grad_norm:.3g} fell below "
                                                   f"{c.grad_vanishing_factor:g} x running median {med:.3g}",
                                                   RecoveryAction.REDUCE_HORIZON))
            if loss is not None:
                self.losses.append(loss if cs is None else min(loss, cs[0] + c.loss_sigma * cs[1]))
            if grad_norm is not None:
                self.grad_norms.append(grad_norm)
            if self._oscillating():
                r.raise_to(Level.CAUTION, "oscillation", RecoveryAction.REDUCE_HORIZON,
                           TrainingInstability("loss oscillates: its change flips sign on almost every step",
                                               RecoveryAction.REDUCE_HORIZON))
        if r.level > Level.NORMAL:
            self.events += 1
        return r

    def check_predicted(self, loss: float | None, predicted: float | None = None,
                        predicted_std: float | None = None) -> DivergenceReport:
        """After a predicted step that ran a monitoring forward."""
        r = DivergenceReport()
        if loss is None:
            return r
        c = self.config
        if not math.isfinite(loss):
            r.raise_to(Level.CRITICAL, "nonfinite", RecoveryAction.ROLLBACK,
                       NumericalError(f"non-finite loss {loss} on a predicted step"))
        else:
            z = self.loss_zscore(loss)
            if z > c.loss_sigma:
                r.raise_to(Level.CRITICAL, "loss_spike", RecoveryAction.ROLLBACK,
                           PredictionDivergence(f"loss spike on a predicted step: loss={loss:.4g} is {z:.1f} "
                                                "robust sigmas above recent real losses"))
            elif predicted is not None and math.isfinite(predicted):
                cs = self._loss_center_spread()
                noise = cs[1] if cs is not None else 0.0
                band = c.loss_sigma * math.hypot(predicted_std or 0.0, noise)
                if band > 0 and loss - predicted > band:
                    r.raise_to(Level.WARNING, "prediction_error", RecoveryAction.ROLLBACK,
                               PredictionDivergence(f"predicted step loss {loss:.4g} exceeds the prediction "
                                                    f"{predicted:.4g} by more than {band:.3g}"))
        if r.level > Level.NORMAL:
            self.events += 1
        return r

    def check_phase(self, before: float, after: float) -> DivergenceReport:
        """A Predict phase's paired probe: same batch before and after the phase."""
        r = DivergenceReport()
        if not _finite(before, after):
            r.raise_to(Level.CRITICAL, "nonfinite", RecoveryAction.ROLLBACK,
                       NumericalError(f"non-finite probe loss after a Predict phase (before={before}, "
                                      f"after={after})"))
        elif after > before + self.config.rollback_tolerance * abs(before):
            r.raise_to(Level.WARNING, "phase_worse", RecoveryAction.ROLLBACK,
                       PredictionDivergence(f"Predict phase raised the probe loss from {before:.5g} to {after:.5g}"))
        if r.level > Level.NORMAL:
            self.events += 1
        return r

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms), "events": self.events,
                "peak": self.peak}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.losses = deque((float(x) for x in sd["losses"]), maxlen=self.config.window)
        self.grad_norms = deque((float(x) for x in sd["grad_norms"]), maxlen=self.config.window)
        self.events = int(sd["events"])
        self.peak = float(sd["peak"])
