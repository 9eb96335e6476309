"""Dormancy: an engine that has not predicted for a long time stops paying for its dynamics model."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from hybrid_lightning import HybridConfig
from hybrid_lightning.core.dynamics import ConstantVelocity
from hybrid_lightning.core.engine import HybridEngine, StepObservation
from tests.test_engine import batch, loss_fn


class _NeverConfident(ConstantVelocity):
    """Counts observations and restarts; never confident enough to predict."""

    def __init__(self, n_layers, rank):
        super().__init__(n_layers, rank)
        self.engine = None
        self.observed_at: list[int] = []
        self.restarts: list[int] = []

    def observe(self, features, loss_delta, coeffs):
        super().observe(features, loss_delta, coeffs)
        self.observed_at.append(self.engine.step)

    def restart(self):
        self.restarts.append(self.engine.step)

    def confidence(self):
        return 0.0


def config(dormant_after):
    cfg = HybridConfig(warmup_steps=10, min_full_steps=6, max_predict_steps=6, predict_threshold=0.5,
                       predictor="constant_velocity")
    cfg.trajectory.stride = 2
    cfg.bandit.dormant_after = dormant_after
    return cfg.validate()


def make(dormant_after, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    dyn = _NeverConfident(4, config(dormant_after).trajectory.basis_rank)
    engine = HybridEngine(list(model.parameters()), config(dormant_after), dynamics=dyn)
    dyn.engine = engine
    return model, opt, engine, dyn


def train(model, opt, engine, start, stop):
    """Plain real steps through the engine; returns the steps at which the engine was dormant."""
    dormant = []
    for i in range(start, stop):
        plan = engine.plan()
        assert plan.runs_backward
        opt.zero_grad()
        loss = loss_fn(model, batch(i))
        loss.backward()
        grads = torch.stack([p.grad.norm() for p in model.parameters()]).norm()
        opt.step()
        if engine.dormant:
            dormant.append(i)
        norm = float(grads) if plan.measure_grad_norm else None
        engine.observe(StepObservation(loss=float(loss.detach()), grad_norm=norm))
    return dormant


def windows(steps):
    """[start, stop) runs of consecutive steps."""
    out = []
    for s in steps:
        if out and out[-1][1] == s:
            out[-1][1] = s + 1
        else:
            out.append([s, s + 1])
    return [tuple(w) for w in out]


def test_sleeps_after_idle_steps_wakes_on_schedule_and_doubles():
    model, opt, engine, dyn = make(dormant_after=20)
    dormant = train(model, opt, engine, 0, 400)
    # warmup ends at 10; idle for min_full (6) + 20 steps -> asleep at 36 for 20 steps, awake 26 steps,
    # asleep for 40, and so on (the last period runs past the end)
    assert windows(dormant) == [(36, 56), (82, 122), (148, 228), (254, 400)]
    assert engine.counters["dormant_steps"] == len(dormant) and engine.counters["dormant_periods"] == 4
    assert dyn.restarts == [56, 122, 228]
    # the dynamics model sees nothing while dormant, and observes again right after waking
    assert dyn.observed_at and not set(dyn.observed_at) & set(dormant)
    assert any(56 < s <= 82 for s in dyn.observed_at)


def test_dormant_periods_stop_doubling_at_32x():
    model, opt, engine, _ = make(dormant_after=1)
    dormant = train(model, opt, engine, 0, 200)
    lengths = [b - a for a, b in windows(dormant)]
    assert lengths[:8] == [1, 2, 4, 8, 16, 32, 32, 32][: len(lengths)] and len(lengths) >= 7


def test_dormant_after_zero_never_sleeps_and_every_stride_is_observed():
    model, opt, engine, dyn = make(dormant_after=0)
    assert train(model, opt, engine, 0, 200) == []
    # warmup 10 steps, stride 2: every second step from the first stride on feeds the model
    assert len(dyn.observed_at) == 200 // 2 - 1  # the first read only starts the loss-block bookkeeping


def test_dormancy_does_not_change_training():
    sleepy, opt_s, engine_s, _ = make(dormant_after=5)
    awake, opt_a, engine_a, _ = make(dormant_after=0)
    assert train(sleepy, opt_s, engine_s, 0, 150)
    train(awake, opt_a, engine_a, 0, 150)
    for a, b in zip(sleepy.parameters(), awake.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stop", [40, 60])  # asleep, just awake
def test_resume_inside_and_after_a_dormant_period(stop):
    model, opt, engine, dyn = make(dormant_after=20)
    ref = train(model, opt, engine, 0, 200)
    m1, o1, e1, _ = make(dormant_after=20)
    train(m1, o1, e1, 0, stop)
    buf = io.BytesIO()
    torch.save({"m": m1.state_dict(), "o": o1.state_dict(), "e": e1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    m2, o2, e2, _ = make(dormant_after=20, seed=5)
    m2.load_state_dict(saved["m"])
    o2.load_state_dict(saved["o"])
    e2.load_state_dict(saved["e"])
    assert train(m2, o2, e2, stop, 200) == [s for s in ref if s >= stop]
    assert e2.counters == engine.counters


def test_state_without_dormancy_loads_awake():
    _, _, engine, _ = make(dormant_after=20)
    sd = engine.state_dict()
    del sd["dormancy"]  # written by a version before dormancy existed
    _, _, fresh, _ = make(dormant_after=20)
    fresh.load_state_dict(sd)
    assert not fresh.dormant
