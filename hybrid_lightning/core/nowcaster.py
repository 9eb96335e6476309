"""Meta-trained nowcaster: a parameter's displacement ``k`` steps ahead from a few spaced snapshots.

WNN-style (Jang et al., ICML 2023): one small MLP applied to every parameter independently, trained
offline on a corpus of recorded runs of generated tasks (``python -m hybrid_lightning.nowcast.corpus``
then ``python -m hybrid_lightning.nowcast.train``), shipped as package data. Inputs are scaled per
tensor as in NiNo (Knyazev et al., ICLR 2025), so one model serves layers and tasks of any scale.

Features of one entry of tensor ``l`` from ``context`` snapshots ``h_0 .. h_{c-1}`` spaced ``spacing``
steps apart (``h_{c-1}`` is now), with ``s_l = rms(h_{c-1} - h_0)`` over the tensor:

- ``(h_i - h_{c-1}) / s_l`` for ``i < c-1``: the entry's own recent path, relative to now;
- ``h_{c-1} / rms(h_{c-1})``: where the entry sits in its tensor (weight decay pulls large ones back);
- ``log10(s_l / rms(h_{c-1}))``: how fast the whole tensor moves relative to its size;
- whether the tensor is a vector (bias, norm gain, ...), and the horizon ``k / spacing``;
- neuron-aware models only (a reduced form of NiNo's neuron interactions): the same relative path
  of the mean weight of the entry's row (its output neuron's incoming weights) and of its column.

The output times ``s_l`` is the predicted ``h(now + k) - h(now)``.
"""

from __future__ import annotations

import math
from collections import deque
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hybrid_lightning.core.predictors import _ParameterPredictor
from hybrid_lightning.core.trajectory import Trajectory

CONTEXT = 5
_EPS = 1e-12
_CLIP = 10.0  # scaled inputs beyond this are outliers (a tensor that barely moved), not signal
_MAX_OUT = 20.0  # a predicted jump never exceeds 20x the tensor's movement over the whole context


def n_features(context: int = CONTEXT, neuron: bool = False) -> int:
    return (context - 1) * (3 if neuron else 1) + 4


def neuron_means(p: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row and per-column means of a weight seen as ``[out, in]`` (a conv kernel: ``[out, in*k*k]``).

    Row ``i`` is output neuron ``i``'s mean incoming weight; column ``j`` is the mean weight leaving
    input ``j``. A vector (bias, norm gain) is its own row; its column is its mean.
    """
    if p.dim() <= 1:
        v = p.reshape(-1).float()
        return v.clone(), v.mean().reshape(1)
    m = p.reshape(p.shape[0], -1).float()
    return m.mean(1), m.mean(0)


def entry_neurons(flat_index: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Row and column (indices into :func:`neuron_means`' outputs) of flat entries of a tensor of ``shape``."""
    if len(shape) <= 1:
        return flat_index, torch.zeros_like(flat_index)
    cols = math.prod(shape[1:])
    return flat_index // cols, flat_index % cols


def neuron_paths(history: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """For every entry, the history ``[c, n]`` of its row's and its column's mean (see :func:`neuron_means`).

    Built from the same :func:`neuron_means` and :func:`entry_neurons` the corpus and the training
    samples use, so run-time features match training features exactly.
    """
    row, col = entry_neurons(torch.arange(history.shape[1], device=history.device), shape)
    means = [neuron_means(h.view(shape)) for h in history]
    return torch.stack([r[row] for r, _ in means]), torch.stack([c[col] for _, c in means])


def featurize(history: Tensor, horizon_ratio: float, is_vector: bool,
              neuron: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Features ``[n, F]`` of one tensor's entries from its snapshots ``[c, n]``, and the tensor's scale ``s``.

    ``neuron``: the entries' row and column mean paths (:func:`neuron_paths`), scaled like the entry's own.
    """
    history = history.float()
    cur = history[-1]
    # tensor statistics in float64: squares of float32 weights can overflow
    scale = (cur.double() - history[0].double()).pow(2).mean().sqrt().float()
    size = cur.double().pow(2).mean().sqrt().float()
    s = scale.clamp_min(_EPS)
    rel = ((history[:-1] - cur) / s).clamp(-_CLIP, _CLIP).T  # [n, c-1]
    mag = (cur / size.clamp_min(_EPS)).clamp(-_CLIP, _CLIP)[:, None]
    ratio = torch.log10(s / size.clamp_min(_EPS)).nan_to_num(0.0).clamp(-8.0, 2.0) / 4.0
    const = torch.stack([ratio, ratio.new_tensor(float(is_vector)), ratio.new_tensor(float(horizon_ratio))])
    parts = [rel, mag, const.to(cur).expand(cur.numel(), 3)]
    if neuron is not None:
        parts += [((h[:-1].float() - h[-1].float()) / s).clamp(-_CLIP, _CLIP).T for h in neuron]
    return torch.cat(parts, dim=1), scale


class NowcasterNet(nn.Module):
    """Per-entry MLP: features -> displacement in units of the tensor's scale."""

    def __init__(self, context: int = CONTEXT, hidden: int = 32, neuron: bool = False) -> None:
        super().__init__()
        self.context, self.hidden, self.neuron = context, hidden, neuron
        self.net = nn.Sequential(nn.Linear(n_features(context, neuron), hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, feats: Tensor) -> Tensor:
        return self.net(feats).squeeze(-1).clamp(-_MAX_OUT, _MAX_OUT)

    @torch.no_grad()
    def displacement(self, history: Tensor, horizon_ratio: float, shape: tuple[int, ...],
                     chunk: int = 1 << 16) -> Tensor:
        """Predicted ``h(now + k) - h(now)`` for each entry of a tensor of ``shape``, from its ``[c, n]`` snapshots."""
        neuron = neuron_paths(history.float(), shape) if self.neuron else None
        feats, scale = featurize(history, horizon_ratio, len(shape) <= 1, neuron)
        if float(scale) <= _EPS:  # a frozen tensor stays frozen
            return torch.zeros_like(history[-1])
        out = torch.cat([self(f) for f in feats.split(chunk)]) if feats.numel() else feats.new_zeros(0)
        return (out * scale).to(history.dtype)


DEFAULT_WEIGHTS = "nowcaster.pt"


def load_nowcaster(path: str | Path | None = None) -> tuple[NowcasterNet, dict[str, Any]]:
    """The shipped nowcaster (package data, no network), or one saved by ``nowcast.train`` at ``path``."""
    if path is None:
        with resources.as_file(resources.files("hybrid_lightning.nowcast") / DEFAULT_WEIGHTS) as p:
            blob = torch.load(p, map_location="cpu", weights_only=True)
    else:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    net = NowcasterNet(blob["context"], blob["hidden"], blob.get("neuron", False))
    net.load_state_dict(blob["state_dict"])
    net.eval()
    return net, {k: v for k, v in blob.items() if k != "state_dict"}


class NowcastPredictor(_ParameterPredictor):
    """Keeps ``context`` snapshots ``spacing`` steps apart; a Predict phase jumps to the nowcast.

    The history restarts after every phase (kept or rolled back), so the next jump needs
    ``(context - 1) * spacing`` real steps first: set ``min_full_steps`` to at least that. Reports
    confidence 0 until the history is full, so the bandit never asks for a jump it cannot make.
    Snapshots are taken on observed steps, so the spacing is the multiple of ``trajectory.stride``
    nearest to the trained one (the shipped model: 32 steps, i.e. every 4th observation at the
    default stride 8); the horizon is scaled to the spacing actually used.
    """

    def __init__(self, n_layers: int, rank: int, path: str | Path | None = None) -> None:
        super().__init__(n_layers, rank)
        self.net, self.meta = load_nowcaster(path)
        self.context, self.spacing = self.net.context, int(self.meta["spacing"])
        self._snaps: deque[Tensor] = deque(maxlen=self.context)
        self._calls = 0
        self._since = 0  # observations since the last snapshot
        self._restart = False

    def observe_params(self, trajectory: Trajectory) -> None:
        if self._restart:
            self._snaps.clear()
            self._calls, self._restart = 0, False
        every = self._observations_per_snapshot(trajectory.config.stride)
        if self._calls % every == 0:
            self._snaps.append(trajectory.current.clone())
            self._since = 0
        else:
            self._since += 1
        self._calls += 1

    def restart(self) -> None:
        """After unobserved steps: drop the context now (it needs equally spaced snapshots)."""
        self._snaps.clear()
        self._calls = self._since = 0
        self._restart = False

    def history_steps(self, stride: int) -> int:
        """Real steps after a restart before a full context makes the nowcaster confident again."""
        return ((self.context - 1) * self._observations_per_snapshot(stride) + 1) * stride

    def _observations_per_snapshot(self, stride: int) -> int:
        return max(1, round(self.spacing / stride))

    def confidence(self) -> float:
        return 1.0 if len(self._snaps) == self.context else 0.0

    def predict_displacement(self, trajectory: Trajectory, steps: int) -> Tensor | None:
        if len(self._snaps) < self.context:
            return None
        self._restart = True
        if self.net.net[0].weight.device != trajectory.device:
            self.net.to(trajectory.device)
        hist = torch.stack(list(self._snaps))  # [c, numel]
        # the nowcast starts at the last snapshot, which may be a few observations old: predict that much further
        disp = hist[-1] - trajectory.current
        stride = trajectory.config.stride
        # horizon in units of the spacing actually used (a stride that does not divide the trained spacing)
        ratio = (steps + self._since * stride) / (self._observations_per_snapshot(stride) * stride)
        for h, shape, view in zip(hist.split(trajectory.numels, dim=1), trajectory.shapes, trajectory._views(disp)):
            view.add_(self.net.displacement(h, ratio, shape).view_as(view))
        return disp

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd.update(snaps=[s.clone() for s in self._snaps], calls=self._calls, since=self._since, restart=self._restart)
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self._snaps = deque((s.clone() for s in sd["snaps"]), maxlen=self.context)
        self._calls, self._since, self._restart = int(sd["calls"]), int(sd["since"]), bool(sd["restart"])

