"""Parameter-space bookkeeping: real updates, a per-layer direction basis, deltas, snapshot/rollback.

A *layer* is one parameter tensor. Everything is kept in flat buffers (one number per parameter,
in the widest parameter dtype, at least float32) with per-layer views, so each operation is a few
passes over memory. A predicted delta is a list with exactly the parameters' shapes and dtypes,
built as ``delta_l = sum_k c[l, k] * D[k]_l`` over the basis D; it is never a per-layer scalar.

Basis direction 0 is the bias-corrected EMA of real per-step updates (it carries the optimizer's
preconditioning); directions 1..K-1, when ``basis_rank > 1``, are the top principal directions of
a window of recent real updates, per layer, scaled to the typical update size.

Reading a real update costs about six passes over the parameters (flatten, subtract, two per-layer
dot products, the EMA update), every ``stride`` real steps; the per-layer norms of direction 0 are
kept up to date algebraically instead of recomputed.

Memory: the previous parameters, a scratch buffer and the mean update, each one number per parameter,
exist only while something observes. ``track=False`` allocates none of them (monitor-only), and
``release()`` frees the first two while the engine is dormant; ``sync()`` allocates what is missing.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hybrid_lightning.config import TrajectoryConfig

_TINY = 1e-30


@dataclass
class RealUpdate:
    """Summary of one observed real update (per step, averaged over the observation stride)."""

    coeffs: Tensor  # [L, K] least-squares coefficients of the update in the basis *before* it was added
    layer_norms: Tensor  # [L] norm of the per-step update of each layer
    norm: float  # global norm of the per-step update
    cosine: float  # cosine between the update and basis direction 0 (0 before the first update)
    param_norm: float  # global parameter norm


@contextlib.contextmanager
def _full_precision_matmul() -> Iterator[None]:
    """float32 matmuls in full precision: with Lightning's suggested "high" setting a GPU would use TF32
    (10-bit mantissa), an error as large as the DMD fit's rank cutoff (1e-3)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class Trajectory:
    """Tracks the parameters' real trajectory and applies predicted deltas to them."""

    def __init__(self, params: Sequence[Tensor], config: TrajectoryConfig | None = None,
                 names: Sequence[str] | None = None, buffers: Sequence[Tensor] = (), track: bool = True) -> None:
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("Trajectory needs at least one parameter tensor")
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise ValueError(f"all parameters must live on one device, got {sorted(map(str, devices))}")
        if any(not p.is_floating_point() for p in self.params):
            raise ValueError("all parameters must be floating point")
        self.config = config or TrajectoryConfig()
        self.names = list(names) if names is not None else [f"param{i}" for i in range(len(self.params))]
        if len(self.names) != len(self.params):
            raise ValueError("names and params differ in length")
        self.buffers = [b for b in buffers]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.dtypes = [p.dtype for p in self.params]
        self.device = self.params[0].device
        self.flat_dtype = functools.reduce(torch.promote_types, self.dtypes, torch.float32)
        self.numel = sum(self.numels)
        self.n_layers = len(self.params)
        self.rank = self.config.basis_rank
        # parameter-sized buffers, allocated by sync() (None: not allocated, or released)
        self._prev: Tensor | None = None  # the parameters at the last sync
        self._scratch: Tensor | None = None
        self._update_steps = 0  # steps the update in _scratch covers; 0: _scratch holds no readable update
        self._ema: Tensor | None = None  # bias-corrected: the mean real per-step update
        self._ema_weight = 0.0
        self._ema_sq = torch.zeros(self.n_layers, dtype=torch.float64)  # per-layer ||ema||^2
        self._window: Tensor | None = None  # [window, numel] recent updates (basis_rank > 1)
        self._window_count = 0
        self._pcs: Tensor | None = None  # [rank - 1, numel] principal directions (basis_rank > 1)
        self._max_norms = torch.zeros(self.n_layers, dtype=torch.float64)
        self.real_updates = 0
        self._since_sync = 0
        self._snapshot: Tensor | None = None
        self._snapshot_buffers: list[Tensor] | None = None
        if track:
            self.sync()

    # ------------------------------------------------------------------ flat helpers
    def _flatten(self, out: Tensor | None = None) -> Tensor:
        parts = [p.detach().reshape(-1).to(self.flat_dtype) for p in self.params]
        if out is None:
            return torch.cat(parts)
        return torch.cat(parts, out=out)

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [v.view(s) for v, s in zip(flat.split(self.numels), self.shapes)]

    def _layer_dots(self, a: Tensor, b: Tensor) -> Tensor:
        """[L] float64 per-layer dot products of two flat vectors (one read pass each)."""
        return self._layer_dots_many([(a, b)])[0][0]

    def _layer_dots_many(self, pairs: list[tuple[Tensor, Tensor]],
                         scalars: tuple[Tensor, ...] = ()) -> tuple[Tensor, list[float]]:
        """[n, L] float64 per-layer dot products of n pairs of flat vectors, and the values of ``scalars``
        (0-d tensors), read to the host in one transfer: on a GPU each read waits for the device."""
        dots = [torch.stack([x.dot(y) for x, y in zip(a.split(self.numels), b.split(self.numels))]) for a, b in pairs]
        flat = torch.cat([torch.stack(dots).reshape(-1), *(t.reshape(1).to(dots[0].dtype) for t in scalars)])
        host = flat.double().cpu()
        n = len(pairs) * self.n_layers
        return host[:n].view(len(pairs), self.n_layers), host[n:].tolist()

    def _layer_grams(self, rows: Tensor) -> Tensor:
        """[L, n, n] float64 per-layer Gram matrices of the n flat vectors in ``rows`` [n, numel]: one pass."""
        with _full_precision_matmul():
            return torch.stack([blk @ blk.T for blk in rows.split(self.numels, dim=1)]).double().cpu()

    def _layer_combine(self, rows: Tensor, weights: Tensor) -> Tensor:
        """Flat vector whose layer l is sum_j weights[l, j] * rows[j]_l (rows [n, numel], weights [L, n])."""
        w = weights.to(device=rows.device, dtype=rows.dtype)
        with _full_precision_matmul():
            return torch.cat([w[i] @ blk for i, blk in enumerate(rows.split(self.numels, dim=1))])

    def _scale_layers(self, flat: Tensor, coeffs: Tensor) -> list[Tensor]:
        """Per layer: coeffs[l] * flat_l, as new tensors with the layer's shape (flat dtype)."""
        return torch._foreach_mul(self._views(flat), coeffs.tolist())

    # ------------------------------------------------------------------ basis
    @property
    def has_basis(self) -> bool:
        return self._ema_weight > 0

    def _allocate_basis(self) -> None:
        kw = {"device": self.device, "dtype": self.flat_dtype}
        if self._ema is None:
            self._ema = torch.zeros(self.numel, **kw)
        if self.rank > 1:
            if self._pcs is None:
                self._pcs = torch.zeros(self.rank - 1, self.numel, **kw)
            if self._window is None and self.config.window:
                self._window = torch.zeros(self.config.window, self.numel, **kw)

    def basis(self) -> list[Tensor]:
        """The K flat basis directions (direction 0 = mean real per-step update). Views, not copies."""
        self._allocate_basis()
        assert self._ema is not None
        return [self._ema] + ([*self._pcs] if self._pcs is not None else [])

    def _gram(self, basis: list[Tensor]) -> Tensor:
        """[L, K, K] per-layer Gram matrices of the basis."""
        k = len(basis)
        pairs = [(i, j) for i in range(k) for j in range(i, k)]
        dots, _ = self._layer_dots_many([(basis[i], basis[j]) for i, j in pairs])
        g = torch.zeros(self.n_layers, k, k, dtype=torch.float64)
        for (i, j), d in zip(pairs, dots):
            g[:, i, j] = d
            g[:, j, i] = d
        return g

    def coefficients(self, update: Tensor, dot0: Tensor | None = None) -> Tensor:
        """[L, K] least-squares coefficients of a flat update in the current basis (zeros if none).

        ``dot0``: the per-layer dot products of ``update`` with direction 0, if already computed.
        """
        if not self.has_basis:
            return torch.zeros(self.n_layers, self.rank)
        if self.rank == 1:
            d0 = self._layer_dots(update, self._ema) if dot0 is None else dot0
            live = self._ema_sq > _TINY
            return torch.where(live, d0 / self._ema_sq.clamp_min(_TINY), torch.zeros_like(d0)).float()[:, None]
        basis = self.basis()
        g = self._gram(basis)
        rhs = self._layer_dots_many([(d, update) for d in basis])[0].T  # [L, K]
        scale = g.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(_TINY)  # [L]
        ridge = 1e-6 * scale[:, None, None] * torch.eye(len(basis), dtype=torch.float64)
        coeffs = torch.linalg.solve(g + ridge, rhs.unsqueeze(-1)).squeeze(-1)
        live = g.diagonal(dim1=1, dim2=2) > _TINY  # directions that are exactly zero get coefficient 0
        return torch.where(live, coeffs, torch.zeros_like(coeffs)).float()

    def _refresh_principal_directions(self) -> None:
        assert self._window is not None and self._pcs is not None
        n = min(self._window_count, self._window.shape[0])
        if n < 2:
            return
        rows = [self._window[i] for i in range(n)]
        gram = self._gram(rows)  # [L, n, n]
        evals, evecs = torch.linalg.eigh(gram)  # ascending
        for k in range(self.rank - 1):
            idx = n - 1 - k
            if idx < 0:
                self._pcs[k].zero_()
                continue
            v = evecs[:, :, idx]  # [L, n]
            lam = evals[:, idx].clamp_min(0)
            # direction_l = U_l^T v_l / sqrt(lam_l): unit norm; rescale to the RMS update norm of the layer
            rms = (gram.diagonal(dim1=1, dim2=2).sum(dim=1) / n).sqrt()
            scale = torch.where(lam > _TINY, rms / lam.sqrt().clamp_min(_TINY), torch.zeros_like(lam))
            self._pcs[k].zero_()
            for i in range(n):
                acc = self._scale_layers(rows[i], (v[:, i] * scale).float())
                torch._foreach_add_(self._views(self._pcs[k]), acc)

    # ------------------------------------------------------------------ observing real steps
    def step_taken(self) -> bool:
        """Count one real optimizer step; True when a stride is complete and the update should be read."""
        self._since_sync += 1
        return self._since_sync >= self.config.stride

    def skip_observation(self) -> None:
        """Close a stride without reading the update (when nothing will use it)."""
        self._since_sync = 0

    def record_real(self) -> RealUpdate:
        """Read the real update since the last sync (per step), add it to the basis, resync."""
        if self._prev is None:
            raise RuntimeError("record_real() after release(): sync() first, then observe from there")
        assert self._ema is not None
        steps = max(self._since_sync, 1)
        cur = self._flatten(out=self._scratch)
        update = torch.sub(cur, self._prev, out=self._prev)  # the old theta is not needed any more
        if steps > 1:
            update.div_(steps)
        self._prev, self._scratch = cur, update  # prev := current parameters (the sync)
        self._update_steps = steps
        self._since_sync = 0
        (dot0, sq), (param_norm,) = self._layer_dots_many([(update, self._ema), (update, update)],
                                                           (torch.linalg.vector_norm(cur),))
        coeffs = self.coefficients(update, dot0)
        den = math.sqrt(float(sq.sum()) * float(self._ema_sq.sum()))
        cos = float(dot0.sum()) / den if self.has_basis and den > 0 else 0.0
        decay = self.config.ema_decay
        self._ema_weight = decay * self._ema_weight + (1.0 - decay)
        a = (1.0 - decay) / self._ema_weight  # bias-corrected EMA: mean += a * (update - mean)
        self._ema.lerp_(update, a)
        self._ema_sq = (1 - a) ** 2 * self._ema_sq + 2 * a * (1 - a) * dot0 + a**2 * sq
        layer_norms = sq.clamp_min(0).sqrt()
        self._max_norms = torch.maximum(self._max_norms * 0.99, layer_norms)
        if self._window is not None:
            self._window[self._window_count % self._window.shape[0]].copy_(update)
            self._window_count += 1
        self.real_updates += 1
        if self.real_updates % self.config.basis_refresh == 0:
            self._ema_sq = self._layer_dots(self._ema, self._ema)  # drop the recursion's rounding drift
            if self._pcs is not None:
                self._refresh_principal_directions()
        return RealUpdate(coeffs, layer_norms.float(), float(sq.sum()) ** 0.5, cos, param_norm)

    def sync(self) -> None:
        """Forget the parameter change since the last sync (after predicted steps, rollback, corrections).

        After ``release()`` (or ``track=False``) this allocates the buffers again and tracks from here."""
        if self._prev is None:
            self._prev = self._flatten()
            self._allocate_basis()
        else:
            self._flatten(out=self._prev)
        self._since_sync = 0
        self._update_steps = 0

    @property
    def tracking(self) -> bool:
        """True when the previous parameters are held, so the next real update can be read."""
        return self._prev is not None

    def release(self) -> None:
        """Free the previous-parameters and scratch buffers while nothing is observed (2 numbers per
        parameter); the mean update and the window stay. ``sync()`` starts tracking again."""
        if self._snapshot is not None:
            raise RuntimeError("release() while a snapshot is held: finish or roll back the phase first")
        self._prev = self._scratch = None
        self._update_steps = 0

    @property
    def max_layer_norms(self) -> Tensor:
        """[L] decayed maximum of observed per-step real update norms, per layer."""
        return self._max_norms.float()

    def basis_norms(self) -> Tensor:
        """[L, K] norm of each basis direction per layer."""
        rest = self.basis()[1:]
        norms = [self._ema_sq] + (list(self._layer_dots_many([(d, d) for d in rest])[0]) if rest else [])
        return torch.stack(norms, dim=1).clamp_min(0).sqrt().float()

    # ------------------------------------------------------------------ deltas
    def compose(self, coeffs: Tensor) -> list[Tensor]:
        """Delta with the parameters' shapes and dtypes: per layer, sum_k coeffs[l, k] * basis[k]_l."""
        coeffs = coeffs.reshape(self.n_layers, self.rank)
        basis = self.basis()
        delta = self._scale_layers(basis[0], coeffs[:, 0])
        for k in range(1, self.rank):
            torch._foreach_add_(delta, self._scale_layers(basis[k], coeffs[:, k]))
        return [d if d.dtype == dt else d.to(dt) for d, dt in zip(delta, self.dtypes)]

    def delta_from_flat(self, flat: Tensor, scale: float = 1.0) -> list[Tensor]:
        """``scale * flat`` as a delta with the parameters' shapes and dtypes."""
        delta = torch._foreach_mul(self._views(flat), scale)
        return [d if d.dtype == dt else d.to(dt) for d, dt in zip(delta, self.dtypes)]

    def tangential(self, flat: Tensor) -> Tensor:
        """``flat`` less, in each parameter tensor, its component along that tensor's values (at the snapshot if
        one is held, else now), as a new tensor: a displacement that turns each tensor instead of growing or
        shrinking it (its norm changes only by the second-order ``|d|^2``). A zero tensor keeps its part."""
        w = self._snapshot if self._snapshot is not None else self._flatten()
        dots = self._layer_dots_many([(flat, w), (w, w)])[0]
        coeffs = torch.where(dots[1] > 0, dots[0] / dots[1].clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        out = flat.clone()
        torch._foreach_sub_(self._views(out), self._scale_layers(w, coeffs))  # per tensor: d - c w
        return out

    @property
    def current(self) -> Tensor:
        """The parameters at the last sync or observation, flat (a view of an internal buffer: do not modify)."""
        if self._prev is None:
            raise RuntimeError("the trajectory is not tracking (released): sync() first")
        return self._prev

    @property
    def last_update(self) -> Tensor:
        """The real update read by the last :meth:`record_real`, per step, over :attr:`last_update_steps` steps
        (do not modify). Readable until anything else uses the buffer: a sync, a probe swap, a release."""
        if not self._update_steps:
            raise RuntimeError("no real update to read: record_real() first (a sync, swap or release since "
                               "then reused its buffer)")
        assert self._scratch is not None
        return self._scratch

    @property
    def last_update_steps(self) -> int:
        """Real steps the :attr:`last_update` covers (0: none readable)."""
        return self._update_steps

    @staticmethod
    def is_finite(delta: Sequence[Tensor]) -> bool:
        norms = torch._foreach_norm(list(delta))
        return bool(torch.stack([n.float() for n in norms]).isfinite().all())

    def apply(self, delta: Sequence[Tensor]) -> None:
        """theta += delta, in place, one fused pass (shapes/dtypes must match the parameters)."""
        if len(delta) != self.n_layers:
            raise ValueError(f"delta has {len(delta)} tensors, the model has {self.n_layers} parameters")
        for d, s, dt, name in zip(delta, self.shapes, self.dtypes, self.names):
            if tuple(d.shape) != s or d.dtype != dt:
                raise ValueError(f"delta for {name} is {tuple(d.shape)}/{d.dtype}, parameter is {s}/{dt}")
        with torch.no_grad():
            torch._foreach_add_(self.params, list(delta))

    def params_finite(self) -> bool:
        return self.is_finite([p.detach() for p in self.params])

    # ------------------------------------------------------------------ snapshot / rollback
    @property
    def has_snapshot(self) -> bool:
        return self._snapshot is not None

    def snapshot(self) -> None:
        """Remember the current parameters and buffers exactly."""
        self._snapshot = self._flatten()
        self._snapshot_buffers = [b.detach().clone() for b in self.buffers]

    def rollback(self) -> None:
        """Restore the snapshot bit for bit (parameters and buffers) and drop it."""
        if self._snapshot is None:
            raise RuntimeError("rollback without a snapshot")
        with torch.no_grad():
            torch._foreach_copy_(self.params, self._views(self._snapshot))
            for b, s in zip(self.buffers, self._snapshot_buffers or []):
                b.copy_(s)
        self.drop_snapshot()
        self.sync()

    def restore_snapshot(self) -> None:
        """Copy the snapshot back into the parameters, bit for bit, and keep it. Buffers stay."""
        if self._snapshot is None:
            raise RuntimeError("restore without a snapshot")
        with torch.no_grad():
            torch._foreach_copy_(self.params, self._views(self._snapshot))

    def swap_snapshot(self) -> None:
        """Exchange the live parameters with the snapshot (call twice to undo). Buffers stay."""
        if self._snapshot is None:
            raise RuntimeError("swap without a snapshot")
        live = self._flatten(out=self._scratch)
        self._update_steps = 0  # the scratch buffer now holds parameters
        with torch.no_grad():
            torch._foreach_copy_(self.params, self._views(self._snapshot))
        self._snapshot, self._scratch = live, self._snapshot

    def drop_snapshot(self) -> None:
        self._snapshot = None
        self._snapshot_buffers = None

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "prev": None if self._prev is None else self._prev.clone(),
            "ema": None if self._ema is None else self._ema.clone(),
            "ema_weight": self._ema_weight,
            "ema_sq": self._ema_sq.clone(),
            "window": None if self._window is None else self._window.clone(),
            "window_count": self._window_count,
            "pcs": None if self._pcs is None else self._pcs.clone(),
            "max_norms": self._max_norms.clone(),
            "real_updates": self.real_updates,
            "since_sync": self._since_sync,
            "snapshot": None if self._snapshot is None else self._snapshot.clone(),
            "snapshot_buffers": None if self._snapshot_buffers is None else [b.clone() for b in
                                                                              self._snapshot_buffers],
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        shapes = [tuple(s) for s in sd["shapes"]]
        if shapes != self.shapes:
            raise ValueError(
                f"trajectory state is for {len(shapes)} parameters with other shapes; "
                f"this model has {len(self.shapes)} (first mismatch: "
                f"{next((a, b) for a, b in zip(shapes + [None], self.shapes + [None]) if a != b)})"
            )
        to = {"device": self.device, "dtype": self.flat_dtype}
        self._prev = None if sd["prev"] is None else sd["prev"].to(**to).clone()
        self._scratch = None
        self._update_steps = 0
        self._ema = None if sd["ema"] is None else sd["ema"].to(**to).clone()
        self._ema_weight = float(sd["ema_weight"])
        self._ema_sq = sd["ema_sq"].double().clone()
        self._window = None if sd["window"] is None else sd["window"].to(**to).clone()
        self._window_count = int(sd["window_count"])
        self._pcs = None if sd["pcs"] is None else sd["pcs"].to(**to).clone()
        self._max_norms = sd["max_norms"].double().clone()
        self.real_updates = int(sd["real_updates"])
        self._since_sync = int(sd["since_sync"])
        self._snapshot = None if sd["snapshot"] is None else sd["snapshot"].to(**to).clone()
        sb = sd["snapshot_buffers"]
        self._snapshot_buffers = None if sb is None else [b.to(self.device).clone() for b in sb]
