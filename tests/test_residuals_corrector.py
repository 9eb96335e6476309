from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from hybrid_lightning.config import CorrectorConfig
from hybrid_lightning.core.corrector import ResidualCorrector
from hybrid_lightning.core.residuals import Residual, ResidualStore
from hybrid_lightning.core.state import FEATURE_DIM

finite = st.floats(-1e3, 1e3)


def residual(i, pred, actual, feats=None):
    return Residual(i, 5, pred, actual, torch.zeros(FEATURE_DIM) if feats is None else feats)


@given(st.integers(1, 50), st.lists(st.tuples(finite, finite), max_size=300))
def test_residual_store_bounded_and_keeps_the_newest(capacity, items):
    store = ResidualStore(capacity)
    for i, (p, a) in enumerate(items):
        store.add(residual(i, p, a))
        assert len(store) <= capacity
    assert len(store) == min(capacity, len(items))
    if items:
        newest = [a - p for p, a in items[-capacity:]]
        assert store.residuals().tolist() == torch.tensor(newest, dtype=torch.float64).tolist()
        assert store.latest().step == len(items) - 1


def test_empty_store_gives_zero_correction():
    c = ResidualCorrector(3, 1)
    corr = c.compute_correction(torch.zeros(FEATURE_DIM), ResidualStore(4), residual=1.0, loss_scale=1.0,
                                progress_rate=0.1, direction_norms=torch.ones(3), max_layer_norms=torch.ones(3))
    assert corr.loss_correction == 0.0 and corr.coeffs is None and corr.confidence == 0.0


@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=40),
       st.lists(st.floats(-1, 1), min_size=FEATURE_DIM, max_size=FEATURE_DIM),
       st.floats(0.0, 1e3), st.floats(1e-6, 10.0),
       st.lists(st.floats(0, 10), min_size=3, max_size=3), st.lists(st.floats(0, 10), min_size=3, max_size=3))
def test_corrections_bounded_by_observed_residuals_and_updates(items, feats, res, rate, dnorm, maxn):
    store = ResidualStore(64)
    c = ResidualCorrector(3, 2, CorrectorConfig(initial_gain=2.0, max_gain=2.0))
    x = torch.tensor(feats)
    for i, (p, a) in enumerate(items):
        r = residual(i, p, a, x)
        store.add(r)
        c.update_from_residual(r, loss_scale=0.5)
    corr = c.compute_correction(x, store, res, 0.5, rate, torch.tensor(dnorm), torch.tensor(maxn))
    assert abs(corr.loss_correction) <= store.max_abs_residual() + 1e-9
    assert 0.0 <= corr.confidence <= 1.0
    if corr.coeffs is not None:
        assert corr.coeffs.shape == (3, 2) and torch.isfinite(corr.coeffs).all()
        layer_norm = corr.coeffs[:, 0].abs() * torch.tensor(dnorm)
        assert (layer_norm <= torch.tensor(maxn) * (1 + 1e-5) + 1e-6).all()
        assert (corr.coeffs[:, 1] == 0).all()


def test_no_weight_correction_when_better_than_predicted_or_disabled():
    store = ResidualStore(4)
    store.add(residual(0, -1.0, -0.5))
    args = dict(loss_scale=1.0, progress_rate=0.1, direction_norms=torch.ones(2), max_layer_norms=torch.ones(2))
    c = ResidualCorrector(2, 1)
    assert c.compute_correction(torch.zeros(FEATURE_DIM), store, residual=-0.2, **args).coeffs is None
    off = ResidualCorrector(2, 1, CorrectorConfig(weight_correction=False))
    assert off.compute_correction(torch.zeros(FEATURE_DIM), store, residual=0.2, **args).coeffs is None
    assert c.compute_correction(torch.zeros(FEATURE_DIM), store, residual=0.2, **args).coeffs is not None


def test_loss_model_learns_a_consistent_residual_and_gain_adapts():
    store = ResidualStore(32)
    c = ResidualCorrector(1, 1, CorrectorConfig(learning_rate=0.5))
    feats = torch.zeros(FEATURE_DIM)
    for i in range(50):
        r = residual(i, -1.0, -0.7, feats)  # always 0.3 worse than predicted
        store.add(r)
        c.update_from_residual(r, loss_scale=0.1)
    assert abs(c.loss_correction(feats, store, 0.1) - 0.3) < 0.02
    g0 = c.gain
    c.record_outcome(False)
    assert c.gain == g0 / 2
    c.record_outcome(True)
    assert c.gain == min(g0 / 2 * 1.25, c.config.max_gain)
