"""Dynamics models: predict how training proceeds for the next Y steps.

A model observes real training once per observation interval (the trajectory stride): the state
features, the mean loss change per step, and the real update's per-step coefficients in the
trajectory's direction basis. It rolls out a horizon in one call (spec Gap 7): the loss change per
step with its variance, and per-step basis coefficients, from which the engine composes weight
deltas. ``confidence()`` is cached and only recomputed when a new observation arrives (Gap 8).

Two implementations:
- :class:`ConstantVelocity`: keep moving along the mean real update at the mean loss slope.
- :class:`RSSMLite`: an ensemble of small recurrent state-space models (GRU deterministic path,
  Gaussian stochastic latent, loss head, coefficient head), trained online on every observation by
  truncated back-propagation through time (Gaps 1-3).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybrid_lightning.config import DynamicsConfig
from hybrid_lightning.core.state import FEATURE_DIM


@dataclass
class Rollout:
    """Per observation interval b = 0..B-1 of a rollout (quantities are per real step)."""

    loss_delta: Tensor  # [B] mean loss change per step
    loss_var: Tensor  # [B] variance of that change (ensemble spread + latent samples + noise)
    coeffs: Tensor  # [B, L, K] basis coefficients of the per-step update


@dataclass
class Prediction:
    """A Predict phase's plan, per predicted step y = 1..Y."""

    loss: Tensor  # [Y] predicted loss after each step (finite, >= floor)
    loss_std: Tensor  # [Y] standard deviation of that loss; non-decreasing in y
    coeffs: Tensor  # [Y, L, K] basis coefficients of each step's delta
    confidence: float  # in [0, 1]

    @property
    def horizon(self) -> int:
        return int(self.loss.shape[0])


@runtime_checkable
class DynamicsModel(Protocol):
    def observe(self, features: Tensor, loss_delta: float, coeffs: Tensor) -> None:
        """One observation interval of real training: features after it, loss change per step, coeffs [L, K]."""

    def rollout(self, intervals: int) -> Rollout:
        """Predict the next ``intervals`` observation intervals."""

    def confidence(self) -> float:
        """Cached confidence in [0, 1] that rollouts are usable."""

    def observe_residual(self, residual: float) -> None:
        """A Predict phase missed its predicted loss change by ``residual`` (in loss-scale units)."""

    # Optional: ``restart()``, called when the engine wakes from dormancy (many real steps went
    # unobserved); a model with a history of consecutive observations drops it there.

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, sd: dict[str, Any]) -> None: ...


@runtime_checkable
class ParameterDynamics(Protocol):
    """Optional capability of a dynamics model that works on the parameters themselves.

    The engine calls ``observe_params`` after every observed real update (the trajectory is synced:
    ``trajectory.current`` holds the parameters), and at the start of a Predict phase asks
    ``predict_displacement`` for the whole phase's parameter change as one flat tensor (or None to
    fall back to the rollout's basis coefficients). The phase then applies it in equal parts.
    """

    def observe_params(self, trajectory: Any) -> None: ...

    def predict_displacement(self, trajectory: Any, steps: int) -> Tensor | None: ...


def predict_y_steps(model: DynamicsModel, steps: int, stride: int, loss0: float,
                    floor: float = 0.0) -> Prediction:
    """One rollout covering ``steps`` real steps, expanded to per-step loss, std and coefficients.

    The std of the loss after y steps is the square root of the summed per-step variances, so
    uncertainty never shrinks with the horizon.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    intervals = math.ceil(steps / stride)
    r = model.rollout(intervals)
    idx = torch.arange(steps) // stride
    delta = torch.nan_to_num(r.loss_delta.double()[idx], nan=0.0, posinf=0.0, neginf=0.0)
    var = torch.nan_to_num(r.loss_var.double()[idx], nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    loss = (loss0 + delta.cumsum(0)).clamp_min(floor)
    std = var.cumsum(0).sqrt()
    coeffs = r.coeffs[idx].float()  # not sanitized: the engine refuses a non-finite delta and rolls back
    conf = float(min(max(model.confidence(), 0.0), 1.0))
    return Prediction(loss.float(), std.float(), coeffs, conf)


class _RunningScale:
    """Running mean/second moment of a vector, for normalizing targets (bias-corrected EMA)."""

    def __init__(self, dim: int, decay: float = 0.98) -> None:
        self.decay = decay
        self.mean = torch.zeros(dim)
        self.sq = torch.zeros(dim)
        self.weight = 0.0

    def update(self, x: Tensor) -> None:
        self.mean.mul_(self.decay).add_(x, alpha=1 - self.decay)
        self.sq.mul_(self.decay).add_(x * x, alpha=1 - self.decay)
        self.weight = self.decay * self.weight + (1 - self.decay)

    @property
    def m(self) -> Tensor:
        return self.mean / self.weight if self.weight > 0 else self.mean

    @property
    def scale(self) -> Tensor:
        """RMS about zero (>0): keeps the sign of targets meaningful after normalization."""
        s = self.sq / self.weight if self.weight > 0 else self.sq
        return s.clamp_min(1e-24).sqrt()

    @property
    def var(self) -> Tensor:
        if self.weight <= 0:
            return torch.ones_like(self.mean)
        return (self.sq / self.weight - self.m**2).clamp_min(1e-24)

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean.clone(), "sq": self.sq.clone(), "weight": self.weight}

    def load(self, s: dict[str, Any]) -> None:
        self.mean, self.sq, self.weight = s["mean"].clone(), s["sq"].clone(), float(s["weight"])


class ConstantVelocity:
    """Baseline: every future step repeats the mean real update (coefficient 1 on direction 0).

    Confidence is the signal fraction mean(c)^2 / mean(c^2) of the observed coefficients on
    direction 0, averaged over layers: 1 when real updates repeat exactly, near 0 when they are
    mostly noise around the mean.
    """

    def __init__(self, n_layers: int, rank: int, decay: float = 0.9) -> None:
        self.n_layers, self.rank = n_layers, rank
        self._coef = _RunningScale(n_layers, decay)
        self._loss = _RunningScale(1, decay)
        self._conf = 0.0
        self.observations = 0

    def observe(self, features: Tensor, loss_delta: float, coeffs: Tensor) -> None:
        c0 = coeffs.reshape(self.n_layers, self.rank)[:, 0].float()
        self._coef.update(c0)
        if math.isfinite(loss_delta):
            self._loss.update(torch.tensor([loss_delta], dtype=torch.float32))
        self.observations += 1
        frac = self._coef.m.pow(2) / (self._coef.var + self._coef.m.pow(2))
        self._conf = float(frac.mean().clamp(0, 1)) if self.observations >= 2 else 0.0

    def rollout(self, intervals: int) -> Rollout:
        coeffs = torch.zeros(intervals, self.n_layers, self.rank)
        coeffs[:, :, 0] = 1.0
        return Rollout(self._loss.m.expand(intervals).clone(), self._loss.var.expand(intervals).clone(), coeffs)

    def confidence(self) -> float:
        return self._conf

    def observe_residual(self, residual: float) -> None:
        if math.isfinite(residual):
            self._conf *= 1.0 / (1.0 + residual * residual)

    def restart(self) -> None:
        """Observations resume after a gap: the running means of a steady trajectory still apply."""

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self._coef.state(), "loss": self._loss.state(), "conf": self._conf,
                "observations": self.observations}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._coef.load(sd["coef"])
        self._loss.load(sd["loss"])
        self._conf = float(sd["conf"])
        self.observations = int(sd["observations"])


class _Ensemble(nn.Module):
    """M independent RSSM-lite members, stored as stacked weights so one batched op runs them all."""

    def __init__(self, members: int, obs_dim: int, target_dim: int, hidden: int, latent: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.M, self.H, self.Z, self.T = members, hidden, latent, target_dim

        def w(i: int, o: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(members, i, o, generator=generator) / math.sqrt(i))

        def b(o: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(members, 1, o))

        self.gru_x, self.gru_h, self.gru_b = w(latent, 3 * hidden), w(hidden, 3 * hidden), b(3 * hidden)
        self.embed_w, self.embed_b = w(obs_dim, hidden), b(hidden)
        self.prior_w, self.prior_b = w(hidden, 2 * latent), b(2 * latent)
        self.post_w, self.post_b = w(2 * hidden, 2 * latent), b(2 * latent)
        self.dec_w, self.dec_b = w(hidden + latent, hidden), b(hidden)
        self.loss_w, self.loss_b = w(hidden, 2), b(2)  # loss head: mean and log-variance
        self.coef_w, self.coef_b = w(hidden, target_dim - 1), b(target_dim - 1)  # delta-coefficient head

    @staticmethod
    def _lin(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return torch.baddbmm(b, x, w)  # x [M, N, i] @ w [M, i, o] + b [M, 1, o]

    def gru(self, h: Tensor, z: Tensor) -> Tensor:
        gx = self._lin(z, self.gru_x, self.gru_b)
        gh = torch.bmm(h, self.gru_h)
        rx, ux, nx = gx.chunk(3, dim=-1)
        rh, uh, nh = gh.chunk(3, dim=-1)
        r, u = torch.sigmoid(rx + rh), torch.sigmoid(ux + uh)
        n = torch.tanh(nx + r * nh)
        return (1 - u) * n + u * h

    def _gauss(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, raw = x.chunk(2, dim=-1)
        return mu, F.softplus(raw) + 1e-3

    def prior(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self._gauss(self._lin(h, self.prior_w, self.prior_b))

    def posterior(self, h: Tensor, obs: Tensor) -> tuple[Tensor, Tensor]:
        e = torch.tanh(self._lin(obs, self.embed_w, self.embed_b))
        return self._gauss(self._lin(torch.cat([h, e], -1), self.post_w, self.post_b))

    def decode(self, h: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> loss mean [M,N,1], loss log-variance [M,N,1], coefficients [M,N,T-1] (normalized units)."""
        d = torch.tanh(self._lin(torch.cat([h, z], -1), self.dec_w, self.dec_b))
        loss = self._lin(d, self.loss_w, self.loss_b)
        return loss[..., :1], loss[..., 1:].clamp(-10, 5), self._lin(d, self.coef_w, self.coef_b)


class RSSMLite:
    """Online-trained ensemble of recurrent state-space models over training dynamics.

    Targets are normalized (loss change by its running RMS, each coefficient by its running RMS),
    so one set of sizes works for any model. ``observe`` filters the latent state (posterior mean),
    scores the prior's one-step prediction for the cached confidence, stores the observation, and
    every ``train_every`` observations takes one Adam step of truncated BPTT over the last
    ``bptt_window`` observations: reconstruction from the posterior, prediction from the prior, and
    a KL term between them. ``rollout`` samples the prior latent (Gap 3).
    """

    def __init__(self, n_layers: int, rank: int, config: DynamicsConfig | None = None, seed: int = 0) -> None:
        self.config = c = config or DynamicsConfig()
        self.n_layers, self.rank = n_layers, rank
        self.target_dim = 1 + n_layers * rank
        self.obs_dim = FEATURE_DIM + self.target_dim
        self.generator = torch.Generator().manual_seed(seed)
        self.net = _Ensemble(c.ensemble_size, self.obs_dim, self.target_dim, c.hidden_dim, c.latent_dim,
                             self.generator)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=c.learning_rate)
        M = c.ensemble_size
        self._h = torch.zeros(M, 1, c.hidden_dim)
        self._z = torch.zeros(M, 1, c.latent_dim)
        self._scale = _RunningScale(self.target_dim)
        # ring of (state before the observation, normalized observation, normalized target)
        self._window: deque[tuple[Tensor, Tensor, Tensor, Tensor]] = deque(maxlen=c.bptt_window)
        self._err = 1.0  # EMA of one-step squared error (normalized units)
        self._var = 1.0  # EMA of the targets' mean square (normalized units)
        self._conf = 0.0
        self.observations = 0
        self.updates = 0
        self.last_train_loss = float("nan")

    # ------------------------------------------------------------------ helpers
    def _normalize(self, loss_delta: float, coeffs: Tensor) -> Tensor:
        raw = torch.cat([torch.tensor([loss_delta], dtype=torch.float32), coeffs.reshape(-1).float()])
        raw = torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
        self._scale.update(raw)
        return (raw / self._scale.scale).clamp(-20, 20)

    def _obs(self, features: Tensor, target: Tensor) -> Tensor:
        obs = torch.cat([features.float().reshape(-1), target])
        return obs.expand(self.net.M, 1, -1)

    # ------------------------------------------------------------------ protocol
    @torch.no_grad()
    def observe(self, features: Tensor, loss_delta: float, coeffs: Tensor) -> None:
        target = self._normalize(loss_delta, coeffs)
        obs = self._obs(features, target)
        h_prev, z_prev = self._h, self._z
        h = self.net.gru(h_prev, z_prev)
        if self.observations > 0:
            mu_p, _ = self.net.prior(h)
            lm, _, cm = self.net.decode(h, mu_p)
            pred = torch.cat([lm, cm], -1).mean(0).reshape(-1)
            err_loss = float((pred[0] - target[0]) ** 2)
            err_coef = float(((pred[1:] - target[1:]) ** 2).mean()) if self.target_dim > 1 else err_loss
            # skill is measured against the targets' size (predicting "no change" scores 0), so a
            # steady, perfectly predictable trajectory earns full confidence
            var_loss = float(target[0] ** 2)
            var_coef = float((target[1:] ** 2).mean()) if self.target_dim > 1 else var_loss
            d = self.config.confidence_decay
            self._err = d * self._err + (1 - d) * 0.5 * (err_loss + err_coef)
            self._var = d * self._var + (1 - d) * 0.5 * (var_loss + var_coef)
        mu_q, _ = self.net.posterior(h, obs)
        self._window.append((h_prev, z_prev, obs, target))
        self._h, self._z = h, mu_q
        self.observations += 1
        if self.observations % self.config.train_every == 0 and len(self._window) >= 2:
            with torch.enable_grad():
                self._train()
        self._refresh_confidence()

    def _refresh_confidence(self) -> None:
        warm = min(1.0, self.observations / (2.0 * self.config.bptt_window))
        skill = max(0.0, 1.0 - self._err / max(self._var, 1e-12))
        self._conf = float(min(max(warm * skill, 0.0), 1.0))

    def _train(self) -> None:
        """One truncated-BPTT update over the stored window (all GRU, latent and head weights learn)."""
        net = self.net
        h, z = self._window[0][0], self._window[0][1]
        hs, zs, mus, sds = [], [], [], []
        for _, _, obs, _ in self._window:
            h = net.gru(h, z)
            mu_p, sd_p = net.prior(h)
            mu_q, sd_q = net.posterior(h, obs)
            z = mu_q + sd_q * torch.randn(mu_q.shape, generator=self.generator)
            hs.append(h)
            zs.append(z)
            mus.append((mu_p, mu_q))
            sds.append((sd_p, sd_q))
        n = len(self._window)
        # decode every step at once, from the posterior sample (reconstruction) and the prior mean (prediction)
        h_all = torch.cat(hs + hs, dim=1)  # [M, 2n, H]
        z_all = torch.cat(zs + [m[0] for m in mus], dim=1)
        targets = torch.cat([t for *_, t in self._window]).reshape(1, n, -1).expand(net.M, n, -1)
        lm, lv, cm = net.decode(h_all, z_all)
        nll = self._nll(lm, lv, cm, torch.cat([targets, targets], dim=1))
        mu_p, mu_q = (torch.cat(x, dim=1) for x in zip(*mus))
        sd_p, sd_q = (torch.cat(x, dim=1) for x in zip(*sds))
        kl = (torch.log(sd_p / sd_q) + (sd_q**2 + (mu_q - mu_p) ** 2) / (2 * sd_p**2) - 0.5).sum(-1).mean()
        loss = 2 * nll + self.config.kl_weight * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        self.optimizer.step()
        self.updates += 1
        self.last_train_loss = float(loss.detach())

    @staticmethod
    def _nll(lm: Tensor, lv: Tensor, cm: Tensor, tgt: Tensor) -> Tensor:
        loss_nll = 0.5 * (lv + (tgt[..., :1] - lm) ** 2 / lv.exp()).mean()
        coef_mse = ((tgt[..., 1:] - cm) ** 2).mean() if cm.shape[-1] else torch.zeros(())
        return loss_nll + coef_mse

    @torch.no_grad()
    def rollout(self, intervals: int) -> Rollout:
        net, s = self.net, self.config.samples
        h = self._h.expand(net.M, s, -1).contiguous()
        z = self._z.expand(net.M, s, -1).contiguous()
        means, vars_, coefs = [], [], []
        for _ in range(intervals):
            h = net.gru(h, z)
            mu_p, sd_p = net.prior(h)
            z = mu_p + sd_p * torch.randn(mu_p.shape, generator=self.generator)
            lm, lv, cm = net.decode(h, z)
            means.append(lm.reshape(-1))
            vars_.append(lv.exp().reshape(-1))
            coefs.append(cm.reshape(net.M * s, -1))
        scale = self._scale.scale
        lm = torch.stack(means, 1) * scale[0]  # [M*S, B]
        noise = torch.stack(vars_, 1).mean(0) * scale[0] ** 2
        cm = torch.stack(coefs, 1) * scale[1:]  # [M*S, B, L*K]
        loss_var = lm.var(0, unbiased=False) + noise
        coeffs = cm.mean(0).reshape(intervals, self.n_layers, self.rank)
        return Rollout(lm.mean(0), loss_var, coeffs)

    def confidence(self) -> float:
        return self._conf

    def restart(self) -> None:
        """Observations resume after a gap: train only on windows that do not bridge it."""
        self._window.clear()

    def observe_residual(self, residual: float) -> None:
        if math.isfinite(residual):
            d = self.config.confidence_decay
            self._err = d * self._err + (1 - d) * min(residual * residual, 100.0)
            self._refresh_confidence()

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "net": {k: v.clone() for k, v in self.net.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "h": self._h.clone(),
            "z": self._z.clone(),
            "scale": self._scale.state(),
            "window": [[t.clone() for t in item] for item in self._window],
            "err": self._err,
            "var": self._var,
            "conf": self._conf,
            "observations": self.observations,
            "updates": self.updates,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.net.load_state_dict(sd["net"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self._h, self._z = sd["h"].clone(), sd["z"].clone()
        self._scale.load(sd["scale"])
        self._window = deque((tuple(t.clone() for t in item) for item in sd["window"]),
                             maxlen=self.config.bptt_window)
        self._err, self._var, self._conf = float(sd["err"]), float(sd["var"]), float(sd["conf"])
        self.observations, self.updates = int(sd["observations"]), int(sd["updates"])
        self.generator.set_state(sd["generator"])


def make_dynamics(kind: str, n_layers: int, rank: int, config: DynamicsConfig, seed: int) -> DynamicsModel:
    if kind == "rssm":
        return RSSMLite(n_layers, rank, config, seed)
    if kind == "constant_velocity":
        return ConstantVelocity(n_layers, rank)
    from hybrid_lightning.core import predictors  # research predictors build on the classes above

    research = {"null": predictors.NullPredictor, "tail_average": predictors.TailAverage,
                "dmd": predictors.DMDPredictor}
    if kind == "drift":
        return predictors.Drift(n_layers, rank, config.drift_span, config.drift_gain)
    if kind in research:
        return research[kind](n_layers, rank)
    if kind == "nowcast":
        from hybrid_lightning.core.nowcaster import NowcastPredictor  # loads the shipped weights

        return NowcastPredictor(n_layers, rank, config.nowcaster or None)
    raise ValueError(f"unknown predictor {kind!r}")
