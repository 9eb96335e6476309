"""TrainingState: what the engine knows about the run, with bounded memory.

``features()`` returns a vector of exactly :data:`FEATURE_DIM` finite numbers in [-1, 1]. The dynamics
model, corrector and bandit all size their inputs from this one constant, so the feature-size
mismatch of the reference implementation (spec §9, Gap 6) cannot happen.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

FEATURE_DIM = 16
"""Length of :meth:`TrainingState.features`; the only place this number is written."""

_EPS = 1e-12
_FAST, _SLOW = 0.9, 0.99  # EMA decays of the loss level; lags 9 and 99 steps


class _Ema:
    """Bias-corrected exponential moving average (Adam-style), O(1) per update."""

    __slots__ = ("decay", "raw", "weight")

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.raw = 0.0
        self.weight = 0.0

    def update(self, x: float) -> None:
        self.raw = self.decay * self.raw + (1.0 - self.decay) * x
        self.weight = self.decay * self.weight + (1.0 - self.decay)

    @property
    def value(self) -> float:
        return self.raw / self.weight if self.weight > 0 else 0.0

    @property
    def ready(self) -> bool:
        return self.weight > 0

    def state(self) -> list[float]:
        return [self.raw, self.weight]

    def load(self, s: list[float]) -> None:
        self.raw, self.weight = float(s[0]), float(s[1])


def _squash(x: float, scale: float = 1.0) -> float:
    """Map any real (or NaN) to [-1, 1]."""
    if not math.isfinite(x):
        return 0.0 if math.isnan(x) else math.copysign(1.0, x)
    return math.tanh(x / scale)


def _log_ratio(a: float, b: float) -> float:
    if a <= 0 or b <= 0 or not (math.isfinite(a) and math.isfinite(b)):
        return 0.0
    return math.log(a / b)


class TrainingState:
    """Rolling statistics of real and predicted steps. All histories have fixed length."""

    def __init__(self, history: int = 64) -> None:
        if history < 2:
            raise ValueError(f"history must be >= 2, got {history}")
        self.history = history
        self.step = 0  # optimizer steps observed (real + predicted)
        self.real_steps = 0
        self.predicted_steps = 0
        self.steps_since_predict = 0
        self.initial_loss: float | None = None
        self.losses: deque[float] = deque(maxlen=history)  # real-step losses
        self.grad_norms: deque[float] = deque(maxlen=history)
        self.update_norms: deque[float] = deque(maxlen=history)
        self.predicted_losses: deque[float] = deque(maxlen=history)  # monitored predicted-step losses
        self.last_residual = 0.0  # normalized residual of the last Predict phase
        self.last_value = 0.0  # measured value q of the last Predict phase (per predicted step)
        self._loss_fast = _Ema(_FAST)
        self._loss_slow = _Ema(_SLOW)
        self._loss_absdev = _Ema(_FAST)
        self._grad_fast = _Ema(_FAST)
        self._grad_slow = _Ema(_SLOW)
        self._update = _Ema(_FAST)
        self._cos = _Ema(_FAST)
        self._rel_update = _Ema(_FAST)
        self._rollback_rate = _Ema(_FAST)
        self._predict_frac = _Ema(_SLOW)
        self._last_cos = 0.0

    # ------------------------------------------------------------------ recording
    def record_real(self, loss: float, grad_norm: float | None = None, update_norm: float | None = None,
                    cosine: float | None = None, param_norm: float | None = None) -> None:
        """A real (backward + optimizer) step finished with this loss (measured before the update)."""
        self.step += 1
        self.real_steps += 1
        self.steps_since_predict += 1
        self._predict_frac.update(0.0)
        if not math.isfinite(loss):
            return  # a non-finite loss is the divergence monitor's business; keep the statistics clean
        if self.initial_loss is None:
            self.initial_loss = loss
        if self._loss_fast.ready:
            self._loss_absdev.update(abs(loss - self._loss_fast.value))
        self._loss_fast.update(loss)
        self._loss_slow.update(loss)
        self.losses.append(loss)
        if grad_norm is not None and math.isfinite(grad_norm):
            self.grad_norms.append(grad_norm)
            self._grad_fast.update(grad_norm)
            self._grad_slow.update(grad_norm)
        if update_norm is not None and math.isfinite(update_norm):
            self.update_norms.append(update_norm)
            self._update.update(update_norm)
            if param_norm is not None and param_norm > 0:
                self._rel_update.update(update_norm / param_norm)
        if cosine is not None and math.isfinite(cosine):
            self._last_cos = cosine
            self._cos.update(cosine)

    def record_predicted(self, loss: float | None = None) -> None:
        """A predicted step finished; ``loss`` is its monitoring forward, if one ran."""
        self.step += 1
        self.predicted_steps += 1
        self.steps_since_predict = 0
        self._predict_frac.update(1.0)
        if loss is not None and math.isfinite(loss):
            self.predicted_losses.append(loss)

    def record_phase_outcome(self, rolled_back: bool | None, residual: float, value: float) -> None:
        """A Predict phase was judged: kept (False) or rolled back (True), its normalized residual and value q.

        ``rolled_back=None``: the phase was refused before it moved the weights (line search); it is
        neither, and leaves the rollback rate as it was."""
        if rolled_back is not None:
            self._rollback_rate.update(1.0 if rolled_back else 0.0)
        self.last_residual = residual if math.isfinite(residual) else 0.0
        self.last_value = value if math.isfinite(value) else 0.0

    # ------------------------------------------------------------------ derived quantities
    @property
    def loss(self) -> float:
        """Smoothed loss level of recent real steps (0.0 before the first one)."""
        return self._loss_fast.value

    @property
    def loss_scale(self) -> float:
        """Typical step-to-step loss fluctuation (> 0), for normalizing residuals."""
        return max(self._loss_absdev.value, 1e-6 * max(abs(self.loss), 1.0), _EPS)

    def progress_rate(self) -> float:
        """Loss decrease per real step (> 0), from the gap between a fast and a slow loss EMA.

        For a loss falling linearly at rate s, the bias-corrected EMAs lag by 9 and 99 steps, so
        slow - fast ~ 90 s. A flat or rising loss gives a small positive floor, never 0.
        """
        floor = 1e-3 * self.loss_scale
        if self.real_steps < 2:
            return floor
        lag_gap = _SLOW / (1 - _SLOW) - _FAST / (1 - _FAST)
        return max((self._loss_slow.value - self._loss_fast.value) / lag_gap, floor)

    def features(self) -> torch.Tensor:
        """Fixed-size (FEATURE_DIM), finite, [-1, 1] summary of the run, float32 on the CPU."""
        loss = self.losses[-1] if self.losses else 0.0
        fast, slow = self._loss_fast.value, self._loss_slow.value
        scale = self.loss_scale
        grad = self.grad_norms[-1] if self.grad_norms else 0.0
        upd = self.update_norms[-1] if self.update_norms else 0.0
        f = [
            _squash(_log_ratio(max(loss, _EPS), max(self.initial_loss or loss, _EPS))),
            _squash((loss - fast) / scale, 3.0),
            _squash((fast - slow) / max(abs(slow), _EPS), 0.05),
            _squash(scale / max(abs(fast), _EPS), 0.1),
            _squash(_log_ratio(grad, self._grad_fast.value)),
            _squash(_log_ratio(self._grad_fast.value, self._grad_slow.value)),
            _squash(_log_ratio(upd, self._update.value)),
            _squash(self._last_cos),
            _squash(self._cos.value),
            _squash(math.log1p(self.step), 10.0),
            _squash(self.steps_since_predict, 100.0),
            _squash(self.last_residual),
            _squash(self._rollback_rate.value * 2.0 - 1.0),
            _squash(self._predict_frac.value * 2.0 - 1.0),
            _squash(self.last_value),
            _squash(math.log10(max(self._rel_update.value, _EPS)) + 3.0),
        ]
        assert len(f) == FEATURE_DIM
        return torch.tensor(f, dtype=torch.float32)

    # ------------------------------------------------------------------ persistence
    _EMAS = ("_loss_fast", "_loss_slow", "_loss_absdev", "_grad_fast", "_grad_slow", "_update", "_cos",
             "_rel_update", "_rollback_rate", "_predict_frac")
    _SCALARS = ("step", "real_steps", "predicted_steps", "steps_since_predict", "initial_loss", "last_residual",
                "last_value", "_last_cos")
    _DEQUES = ("losses", "grad_norms", "update_norms", "predicted_losses")

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"history": self.history}
        sd.update({k: getattr(self, k) for k in self._SCALARS})
        sd.update({k: list(getattr(self, k)) for k in self._DEQUES})
        sd.update({k: getattr(self, k).state() for k in self._EMAS})
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if int(sd["history"]) != self.history:
            self.__init__(int(sd["history"]))  # type: ignore[misc]
        for k in self._SCALARS:
            setattr(self, k, sd[k])
        for k in self._DEQUES:
            setattr(self, k, deque((float(x) for x in sd[k]), maxlen=self.history))
        for k in self._EMAS:
            getattr(self, k).load(sd[k])
