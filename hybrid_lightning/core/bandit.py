"""LinUCB over Predict horizons. Arm 0 means "do not predict" and is worth exactly 0.

Every other arm h learns a linear model of its reward from the state features. The reward of a
Predict phase is its measured net gain per predicted step, in full-step units (see
:func:`phase_reward`), so an arm is chosen only while its upper confidence bound is above 0; when
prediction does not pay, every bound sinks below 0 and the bandit settles on arm 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hybrid_lightning.core.state import FEATURE_DIM


def phase_reward(value: float, kept: bool, horizon: int, forwards: int, forward_cost: float,
                 apply_cost: float, rollback_penalty: float, value_floor: float = 0.0) -> float:
    """Net gain of one Predict phase per predicted step, in units of a full training step.

    ``value`` is q, the measured loss progress per predicted step relative to a real step. A kept
    phase earns q - ``value_floor``: each predicted step takes the place of a real one in a run of
    fixed length, so with a floor of 1 only steps worth more than a real step pay. A rolled-back one
    loses ``rollback_penalty`` per step (schedule steps spent for nothing). Both pay the compute the
    phase used: ``forwards`` no-grad forwards (probes and monitoring) and ``horizon`` delta
    applications. Clipped to [-5, 5].
    """
    h = max(horizon, 1)
    cost = (forwards * forward_cost + h * apply_cost) / h
    gain = value - value_floor if kept else -rollback_penalty
    r = gain - cost
    return max(-5.0, min(5.0, r)) if math.isfinite(r) else -5.0


class LinUCB:
    def __init__(self, arms: Sequence[int], alpha: float = 0.5, ridge: float = 1.0,
                 dim: int = FEATURE_DIM + 1) -> None:
        arms = sorted(set(int(a) for a in arms))
        if not arms or arms[0] < 0:
            raise ValueError(f"arms must be non-negative integers, got {arms}")
        self.arms = arms
        self.alpha, self.dim = alpha, dim
        n = len(arms)
        self.a_inv = torch.eye(dim, dtype=torch.float64).repeat(n, 1, 1) / ridge  # [n, d, d]
        self.b = torch.zeros(n, dim, dtype=torch.float64)
        self.pulls = torch.zeros(n, dtype=torch.int64)
        self.reward_sum = torch.zeros(n, dtype=torch.float64)

    def _context(self, features: Tensor) -> Tensor:
        x = torch.nan_to_num(features.double().reshape(-1), nan=0.0, posinf=1.0, neginf=-1.0)
        return torch.cat([x, torch.ones(1, dtype=torch.float64)])[: self.dim]

    def scores(self, features: Tensor) -> Tensor:
        """[n_arms] upper confidence bounds; arm 0 scores exactly 0."""
        x = self._context(features)
        theta = torch.einsum("nij,nj->ni", self.a_inv, self.b)
        mean = theta @ x
        width = torch.einsum("i,nij,j->n", x, self.a_inv, x).clamp_min(0).sqrt()
        s = mean + self.alpha * width
        return torch.where(torch.tensor(self.arms) == 0, torch.zeros_like(s), s)

    def choose(self, features: Tensor, max_horizon: int, prefer_long: bool = False) -> int:
        """Best arm with horizon <= max_horizon; ties go to the shorter horizon (``prefer_long``: the longer);
        0 when nothing beats 0."""
        allowed = [i for i, a in enumerate(self.arms) if a <= max_horizon]
        if not allowed:
            return 0
        s = self.scores(features)
        sign = 1 if prefer_long else -1
        best = max(allowed, key=lambda i: (float(s[i]), sign * self.arms[i]))
        return self.arms[best] if float(s[best]) > 0 else 0

    def update(self, arm: int, features: Tensor, reward: float) -> None:
        """Sherman-Morrison rank-1 update of the chosen arm's model (O(d^2))."""
        if arm not in self.arms:
            raise ValueError(f"unknown arm {arm}; arms are {self.arms}")
        i = self.arms.index(arm)
        x = self._context(features)
        a_inv = self.a_inv[i]
        ax = a_inv @ x
        self.a_inv[i] = a_inv - torch.outer(ax, ax) / (1.0 + x @ ax)
        self.b[i] += float(reward) * x
        self.pulls[i] += 1
        self.reward_sum[i] += float(reward)

    def mean_rewards(self) -> dict[int, float]:
        return {a: float(self.reward_sum[i] / self.pulls[i]) if self.pulls[i] else float("nan")
                for i, a in enumerate(self.arms)}

    def state_dict(self) -> dict[str, Any]:
        return {"arms": list(self.arms), "a_inv": self.a_inv.clone(), "b": self.b.clone(),
                "pulls": self.pulls.clone(), "reward_sum": self.reward_sum.clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if list(sd["arms"]) != self.arms:
            raise ValueError(f"bandit arms {list(sd['arms'])} in state, {self.arms} configured")
        self.a_inv, self.b = sd["a_inv"].double().clone(), sd["b"].double().clone()
        self.pulls, self.reward_sum = sd["pulls"].clone(), sd["reward_sum"].double().clone()
