from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hybrid_lightning.config import DynamicsConfig
from hybrid_lightning.core.dynamics import ConstantVelocity, DynamicsModel, RSSMLite, predict_y_steps
from hybrid_lightning.core.state import FEATURE_DIM

L, K = 3, 2
SMALL = DynamicsConfig(hidden_dim=8, latent_dim=3, ensemble_size=2, samples=2, bptt_window=4)


def feed(model, n, seed=0, slope=-0.01):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        feats = torch.rand(FEATURE_DIM, generator=g) * 2 - 1
        coeffs = 1.0 + 0.1 * torch.randn(L, K, generator=g)
        model.observe(feats, slope + 0.001 * float(torch.randn(1, generator=g)), coeffs)


@pytest.mark.parametrize("make", [lambda: ConstantVelocity(L, K), lambda: RSSMLite(L, K, SMALL)])
def test_protocol_and_prediction_shapes(make):
    m = make()
    assert isinstance(m, DynamicsModel)
    feed(m, 12)
    p = predict_y_steps(m, 10, stride=3, loss0=2.0)
    assert p.loss.shape == (10,) and p.loss_std.shape == (10,) and p.coeffs.shape == (10, L, K)
    assert 0.0 <= p.confidence <= 1.0


@given(y=st.integers(1, 60), loss=st.floats(0.001, 100.0), stride=st.integers(1, 5), n=st.integers(0, 12))
def test_predictions_finite_nonnegative_and_uncertainty_grows(y, loss, stride, n):
    for m in (ConstantVelocity(L, K), RSSMLite(L, K, SMALL, seed=n)):
        feed(m, n, slope=-loss)  # steep enough to cross zero: the floor must hold
        p = predict_y_steps(m, y, stride, loss)
        assert torch.isfinite(p.loss).all() and (p.loss >= 0).all()
        assert torch.isfinite(p.loss_std).all() and torch.isfinite(p.coeffs).all()
        assert (p.loss_std[1:] >= p.loss_std[:-1]).all()
        assert 0.0 <= p.confidence <= 1.0


@given(st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(-1e3, 1e3)), max_size=30))
def test_confidence_stays_in_unit_interval(obs):
    m = RSSMLite(L, K, SMALL)
    cv = ConstantVelocity(L, K)
    for loss_delta, c in obs:
        for model in (m, cv):
            model.observe(torch.zeros(FEATURE_DIM), loss_delta, torch.full((L, K), c))
            assert 0.0 <= model.confidence() <= 1.0
        m.observe_residual(loss_delta)
        assert 0.0 <= m.confidence() <= 1.0


def test_rssm_online_training_moves_every_weight():
    m = RSSMLite(L, K, SMALL)
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    feed(m, 10)
    assert m.updates > 0
    for name, value in m.net.state_dict().items():
        assert not torch.equal(value, before[name]), f"{name} was never trained"


def test_rssm_learns_a_predictable_trajectory():
    """Coefficients follow a fixed per-layer pattern: the one-step skill (and confidence) must rise."""
    cfg = DynamicsConfig(hidden_dim=16, latent_dim=4, ensemble_size=2, samples=2, bptt_window=6,
                         learning_rate=1e-2)
    m = RSSMLite(L, K, cfg)
    pattern = torch.tensor([[1.0, 0.2], [0.5, -0.3], [2.0, 0.0]])
    for _ in range(300):
        m.observe(torch.zeros(FEATURE_DIM), -0.01, pattern)
    assert m.confidence() > 0.5
    p = predict_y_steps(m, 4, 1, 1.0)
    torch.testing.assert_close(p.coeffs[0], pattern, atol=0.25, rtol=0.2)


def test_confidence_is_cached_until_the_next_observation(monkeypatch):
    m = RSSMLite(L, K, SMALL)
    feed(m, 8)
    calls = {"n": 0}
    real = m.net.gru

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(m.net, "gru", counting)
    values = {m.confidence() for _ in range(1000)}
    assert len(values) == 1 and calls["n"] == 0
    feed(m, 1, seed=9)
    assert calls["n"] > 0


def test_rollout_samples_the_latent_and_is_reproducible_from_state():
    m = RSSMLite(L, K, SMALL)
    feed(m, 10)
    clone = RSSMLite(L, K, SMALL, seed=123)
    clone.load_state_dict(copy.deepcopy(m.state_dict()))
    a, b = m.rollout(5), clone.rollout(5)
    assert torch.equal(a.coeffs, b.coeffs) and torch.equal(a.loss_var, b.loss_var)
    assert (a.loss_var > 0).all()
    c = m.rollout(5)  # generator advanced: new latent samples
    assert not torch.equal(a.loss_delta, c.loss_delta)


def test_constant_velocity_repeats_the_mean_update():
    m = ConstantVelocity(L, K)
    for _ in range(5):
        m.observe(torch.zeros(FEATURE_DIM), -0.1, torch.ones(L, K))
    r = m.rollout(3)
    assert torch.equal(r.coeffs[:, :, 0], torch.ones(3, L)) and torch.equal(r.coeffs[:, :, 1], torch.zeros(3, L))
    torch.testing.assert_close(r.loss_delta, torch.full((3,), -0.1))
    assert m.confidence() == pytest.approx(1.0)
