"""Research predictors that work on the parameters themselves (:class:`ParameterDynamics`).

Each is scored like every predictor: online by the engine's paired probe (the value q of a predicted
step) and end to end by ``benchmarks/time_to_loss.py`` against the tuned baseline and the
equal-compute control. Method cards with the measurements are in ``docs/predictors.md``.

- :class:`NullPredictor`: predicted steps change nothing (only the schedule advances). The control
  that every other predictor must beat.
- :class:`TailAverage`: jump to an exponential average of recent iterates, plus that average's own
  drift over the horizon (the averaged trajectory is much less noisy than the last iterate).
- :class:`Drift`: the mean velocity of the real steps over a long span, from the last iterate.
- :class:`DMDPredictor`: per-layer dynamic mode decomposition of the last few parameter snapshots:
  a linear map of successive displacements, fitted in their own span, iterated forward with its
  spectral radius clamped to 1. Oscillation along a valley wall shows up as a negative or complex
  eigenvalue and cancels out instead of being extrapolated.

All keep the loss model of :class:`ConstantVelocity` for the predicted loss trajectory and report
a confidence of 1 (:class:`Drift`: once its span is full): whether to predict is left to the bandit
and the guard.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor

from hybrid_lightning.core.dynamics import ConstantVelocity, Rollout
from hybrid_lightning.core.trajectory import Trajectory


class _ParameterPredictor(ConstantVelocity):
    def rollout(self, intervals: int) -> Rollout:
        r = super().rollout(intervals)
        return Rollout(r.loss_delta, r.loss_var, torch.zeros_like(r.coeffs))

    def confidence(self) -> float:
        return 1.0

    def observe_params(self, trajectory: Trajectory) -> None:
        pass  # the null predictor needs no history

    def predict_displacement(self, trajectory: Trajectory, steps: int) -> Tensor | None:
        return torch.zeros_like(trajectory.current)


class NullPredictor(_ParameterPredictor):
    """Predicted steps change nothing."""


class TailAverage(_ParameterPredictor):
    def __init__(self, n_layers: int, rank: int, decay: float = 0.8, drift: bool = True) -> None:
        super().__init__(n_layers, rank)
        self.decay, self.drift = decay, drift
        self._avg: Tensor | None = None
        self._prev_avg: Tensor | None = None

    def observe_params(self, trajectory: Trajectory) -> None:
        theta = trajectory.current
        if self._avg is None:
            self._avg = theta.clone()
            return
        # reuse the buffer: this runs on every observed real step
        if self._prev_avg is None:
            self._prev_avg = self._avg.clone()
        else:
            self._prev_avg.copy_(self._avg)
        self._avg.lerp_(theta, 1 - self.decay)

    def restart(self) -> None:
        self._avg = self._prev_avg = None  # an average over a gap points into the past

    def predict_displacement(self, trajectory: Trajectory, steps: int) -> Tensor | None:
        if self._avg is None:
            return None
        disp = self._avg - trajectory.current
        if self.drift and self._prev_avg is not None:
            # velocity of the average per real step, carried over the horizon
            disp.add_(self._avg - self._prev_avg, alpha=steps / trajectory.config.stride)
        return disp

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd.update(avg=None if self._avg is None else self._avg.clone(),
                  prev_avg=None if self._prev_avg is None else self._prev_avg.clone())
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self._avg = None if sd["avg"] is None else sd["avg"].clone()
        self._prev_avg = None if sd["prev_avg"] is None else sd["prev_avg"].clone()


class Drift(_ParameterPredictor):
    """The mean velocity of the *real* steps over the last ``span`` observations, from the last iterate.

    Unlike :class:`ConstantVelocity` (an EMA of the updates, weighted toward the latest) every observation in
    the span counts alike, and predicted motion never enters the velocity: it is summed from the real updates
    alone. Confident (1) only once the span is full, so a phase never extrapolates a few steps' velocity (after
    waking from dormancy, say). Memory: ``span + 1`` parameter-sized buffers (the running sum at each
    observation in the span). Each predicted step moves ``gain`` real steps' worth of the velocity: with a
    one-step phase, a jump that skips one backward pass and moves as far as ``gain`` real steps would.
    """

    def __init__(self, n_layers: int, rank: int, span: int = 10, gain: float = 1.0) -> None:
        super().__init__(n_layers, rank)
        if span < 1:
            raise ValueError(f"span must be >= 1 observation, got {span}")
        if not gain > 0:
            raise ValueError(f"gain must be > 0, got {gain}")
        self.span, self.gain = span, gain
        self._snaps: deque[tuple[int, Tensor]] = deque()  # (real steps, sum of the real updates), oldest first

    def observe_params(self, trajectory: Trajectory) -> None:
        steps = trajectory.last_update_steps
        update = trajectory.last_update  # per step
        if not self._snaps:
            self._snaps.append((0, torch.zeros_like(update)))
        t, last = self._snaps[-1]
        # the oldest sum leaves the span: reuse its buffer for the newest
        buf = self._snaps.popleft()[1] if len(self._snaps) > self.span else torch.empty_like(last)
        torch.add(last, update, alpha=steps, out=buf)
        self._snaps.append((t + steps, buf))

    def restart(self) -> None:
        self._snaps.clear()

    def confidence(self) -> float:
        return 1.0 if len(self._snaps) > self.span else 0.0

    def history_steps(self, stride: int) -> int:
        """Real steps after a restart before the span is full again."""
        return self.span * stride

    def predict_displacement(self, trajectory: Trajectory, steps: int) -> Tensor | None:
        if len(self._snaps) < 2:
            return None
        (t0, first), (t1, last) = self._snaps[0], self._snaps[-1]
        return (last - first).mul_(self.gain * steps / (t1 - t0))

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["snaps"] = [(t, s.clone()) for t, s in self._snaps]
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self._snaps = deque((int(t), s.clone()) for t, s in sd["snaps"])


class DMDPredictor(_ParameterPredictor):
    """Per-layer DMD over the last ``window`` displacements between observations."""

    def __init__(self, n_layers: int, rank: int, window: int = 6, rcond: float = 1e-3) -> None:
        super().__init__(n_layers, rank)
        self.window, self.rcond = window, rcond
        self._snaps: deque[Tensor] = deque(maxlen=window + 2)

    def observe_params(self, trajectory: Trajectory) -> None:
        self._snaps.append(trajectory.current.clone())

    def restart(self) -> None:
        self._snaps.clear()  # the fit needs equally spaced snapshots

    def predict_displacement(self, trajectory: Trajectory, steps: int) -> Tensor | None:
        snaps = list(self._snaps)
        if len(snaps) < 4:
            return None
        diffs = snaps[0].new_empty(len(snaps) - 1, snaps[0].numel())  # rows x_0 .. x_m, per observation interval
        for j, (a, b) in enumerate(zip(snaps, snaps[1:])):
            torch.sub(b, a, out=diffs[j])
        m = len(diffs) - 1
        k = trajectory._layer_grams(diffs)  # [L, m+1, m+1]
        gx, xy, xlast = k[:, :m, :m], k[:, :m, 1:], k[:, :m, m]
        evals, evecs = torch.linalg.eigh(gx)  # ascending
        keep = evals > self.rcond * evals[:, -1:].clamp_min(1e-300)
        inv_sigma = torch.where(keep, evals.clamp_min(1e-300).rsqrt(), torch.zeros_like(evals))
        # reduced operator A = S^-1 V^T (X^T Y) V S^-1, state a0 = S^-1 V^T X^T x_m
        vs = evecs * inv_sigma[:, None, :]  # V S^-1, [L, m, m]
        a = vs.transpose(1, 2) @ xy @ vs
        radius = torch.linalg.eigvals(a).abs().amax(dim=1).clamp_min(1.0)
        a = a / radius[:, None, None]  # no growing modes: extrapolation never explodes
        state = (vs.transpose(1, 2) @ xlast[..., None]).squeeze(-1)  # [L, m]
        intervals = steps / trajectory.config.stride
        total = torch.zeros_like(state)
        k_full, frac = int(intervals), intervals - int(intervals)
        for i in range(k_full + (1 if frac > 0 else 0)):
            state = (a @ state[..., None]).squeeze(-1)
            total += state * (1.0 if i < k_full else frac)
        weights = (vs @ total[..., None]).squeeze(-1)  # [L, m]: displacement_l = sum_j w[l, j] * x_j
        return trajectory._layer_combine(diffs[:m], weights)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["snaps"] = [s.clone() for s in self._snaps]
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self._snaps = deque((s.clone() for s in sd["snaps"]), maxlen=self.window + 2)
