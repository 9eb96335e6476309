"""Record real training trajectories, then replay them to score dynamics models offline.

:class:`TrajectoryRecorder` watches plain training (call :meth:`step` after every optimizer step) with
the same trajectory bookkeeping and state features the engine uses. Per observation interval it keeps
what a dynamics model observes (features, loss change per step, update coefficients) and, for the
next ``horizon`` intervals, how the *real* multi-interval update projects on the basis that was
current at that time (per-layer dot products, norms and the basis Gram matrix). That is enough to
compute, offline, the cosine between any predicted delta (a combination of that basis) and the real
update, without storing parameter vectors.

:func:`replay` feeds a recording to a model in order (online, as in training) and scores each
prediction against what happened next.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hybrid_lightning.config import HybridConfig
from hybrid_lightning.core.dynamics import DynamicsModel, predict_y_steps
from hybrid_lightning.core.state import TrainingState
from hybrid_lightning.core.trajectory import Trajectory


class TrajectoryRecorder:
    def __init__(self, params: Sequence[Tensor], config: HybridConfig | None = None, horizon: int = 4) -> None:
        self.config = cfg = config or HybridConfig()
        self.trajectory = Trajectory(params, cfg.trajectory)
        self.state = TrainingState(history=max(cfg.divergence.window, 2))
        self.horizon = horizon
        self.stride = cfg.trajectory.stride
        self._pending: deque[dict[str, Any]] = deque(maxlen=horizon)  # theta, basis and index of recent intervals
        self.records: list[dict[str, Any]] = []
        self._block_loss, self._block_n = 0.0, 0
        self._last_block: float | None = None

    def step(self, loss: float) -> None:
        """After a real optimizer step, with the loss of that step (measured before the update)."""
        if math.isfinite(loss):
            self._block_loss += loss
            self._block_n += 1
        due = self.trajectory.step_taken()
        upd = self.trajectory.record_real() if due else None
        self.state.record_real(loss, None, None if upd is None else upd.norm,
                               None if upd is None else upd.cosine, None if upd is None else upd.param_norm)
        if upd is None:
            return
        block = self._block_loss / max(self._block_n, 1)
        delta = (block - self._last_block) / self.stride if self._last_block is not None else float("nan")
        self._last_block, self._block_loss, self._block_n = block, 0.0, 0
        theta = self.trajectory.current  # the parameters now (record_real just synced)
        # the real update since each pending interval, projected on the basis that was current then
        for p in self._pending:
            real = theta - p["theta"]
            both, _ = self.trajectory._layer_dots_many([(d, real) for d in p["basis"]] + [(real, real)])
            dots, sq = both[:-1].T.float(), both[-1].float()  # one read of the device
            self.records[p["index"]]["future"].append({"dots": dots, "sq": sq})
        basis = [d.clone() for d in self.trajectory.basis()]
        self.records.append({
            "features": self.state.features(), "loss_delta": delta, "coeffs": upd.coeffs.clone(), "loss": block,
            "gram": self.trajectory._gram(basis).float(), "future": [],
        })
        self._pending.append({"index": len(self.records) - 1, "theta": theta.clone(), "basis": basis})

    def to_dict(self) -> dict[str, Any]:
        return {"stride": self.stride, "horizon": self.horizon, "names": list(self.trajectory.names),
                "rank": self.trajectory.rank, "records": self.records}


def _r2(pred: Tensor, actual: Tensor) -> float:
    ss_res = float(((pred - actual) ** 2).sum())
    ss_tot = float(((actual - actual.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def replay(model: DynamicsModel, recording: dict[str, Any], score_from: float = 0.5,
           horizon: int | None = None) -> dict[str, float]:
    """Feed ``recording`` to ``model`` in order; score predictions made in the last ``1 - score_from`` of it.

    Returns ``loss_r2`` (cumulative loss change over 1..horizon intervals, pooled), ``delta_cosine``
    (median over predictions and layers of the cosine between the predicted and the real
    horizon-interval update), ``coverage_2sigma`` (fraction of real loss changes inside the predicted
    +-2 sigma band), ``loss_r2_last`` (R^2 at the full horizon only) and ``confidence_query_us``.
    """
    recs = recording["records"]
    stride = recording["stride"]
    H = horizon or recording["horizon"]
    start = int(score_from * len(recs))
    pred_loss, act_loss, inside, cosines, last_pred, last_act = [], [], [], [], [], []
    for i, r in enumerate(recs):
        if math.isfinite(r["loss_delta"]):
            model.observe(r["features"], r["loss_delta"], r["coeffs"])
        if i < start or len(r["future"]) < H:
            continue
        p = predict_y_steps(model, H * stride, stride, r["loss"], floor=-math.inf)
        for y in range(1, H + 1):
            pred = float(p.loss[y * stride - 1]) - r["loss"]
            act = recs[i + y]["loss"] - r["loss"]
            pred_loss.append(pred)
            act_loss.append(act)
            inside.append(abs(act - pred) <= 2 * float(p.loss_std[y * stride - 1]))
            if y == H:
                last_pred.append(pred)
                last_act.append(act)
        coeff = p.coeffs.sum(dim=0)  # [L, K]: the H*stride-step delta in the basis of interval i
        fut = r["future"][H - 1]
        num = (coeff * fut["dots"]).sum(dim=1)
        pred_sq = torch.einsum("lk,lkj,lj->l", coeff, r["gram"], coeff).clamp_min(0)
        den = (pred_sq * fut["sq"]).sqrt()
        ok = den > 0
        cosines += (num[ok] / den[ok]).tolist()
    t = time.perf_counter()
    n = 100_000
    for _ in range(n):
        model.confidence()
    query_us = (time.perf_counter() - t) / n * 1e6
    pl, al = torch.tensor(pred_loss), torch.tensor(act_loss)
    return {
        "loss_r2": _r2(pl, al) if len(pl) else float("nan"),
        "loss_r2_last": _r2(torch.tensor(last_pred), torch.tensor(last_act)) if last_pred else float("nan"),
        "delta_cosine": float(torch.tensor(cosines).median()) if cosines else float("nan"),
        "coverage_2sigma": float(torch.tensor(inside, dtype=torch.float32).mean()) if inside else float("nan"),
        "confidence_query_us": query_us,
        "predictions": len(last_pred),
    }
