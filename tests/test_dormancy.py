"""Dormancy: an engine that has not predicted for a long time stops paying for its dynamics model."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hybrid_lightning import HybridConfig
from hybrid_lightning.config import TrajectoryConfig
from hybrid_lightning.core.dynamics import ConstantVelocity, make_dynamics
from hybrid_lightning.core.engine import HybridEngine, StepObservation
from hybrid_lightning.core.loop import train_steps
from hybrid_lightning.core.nowcaster import NowcastPredictor
from hybrid_lightning.core.phases import Phase
from hybrid_lightning.core.predictors import DMDPredictor, TailAverage
from hybrid_lightning.core.state import FEATURE_DIM
from hybrid_lightning.core.trajectory import Trajectory
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


def train(model, opt, engine, start, stop, smooth=False):
    """Plain real steps through the engine; returns the steps at which the engine was dormant.

    ``smooth``: report a steadily falling loss instead of the batch loss, so no monitor alarm fires."""
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
        value = 1.0 / (1 + i) if smooth else float(loss.detach())
        engine.observe(StepObservation(loss=value, grad_norm=1.0 if smooth and norm is not None else norm))
        if engine.dormant:  # asleep: the trajectory holds no previous parameters (nothing reads them)
            assert not engine.trajectory.tracking
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


class _ConfidentAt(ConstantVelocity):
    """Constant velocity that is confident only on the steps ``when(step)`` allows."""

    def __init__(self, n_layers, rank, when):
        super().__init__(n_layers, rank)
        self.engine, self.when = None, when

    def confidence(self):
        return 1.0 if self.when(self.engine.step) else 0.0


def test_a_predicting_engine_sleeps_through_idle_stretches_and_predicts_again_after_waking():
    cfg = config(dormant_after=20)
    cfg.predict_threshold = 0.5
    cfg.bandit.arms, cfg.bandit.alpha, cfg.bandit.cooldown_steps = [0, 6], 100.0, 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    dyn = _ConfidentAt(4, cfg.trajectory.basis_rank, lambda step: step < 60 or step >= 280)
    engine = HybridEngine(list(model.parameters()), cfg, dynamics=dyn)
    dyn.engine = engine
    res = train_steps(model, loss_fn, opt, (batch(i) for i in range(450)), engine, clock=None)  # count-only
    starts = [i for i, p in enumerate(res.phases) if p == "PREDICT" and res.phases[i - 1] != "PREDICT"]
    asleep = windows([i for i, r in enumerate(res.reports) if r.dormant])
    assert any(s < 60 for s in starts) and any(s >= 280 for s in starts)
    assert asleep and all(60 <= a and b <= 450 for a, b in asleep)
    for a, b in asleep:  # nothing predicted while asleep, nor before min_full_steps of fresh observations
        assert not [s for s in starts if a <= s < b + cfg.min_full_steps]
    assert all(res.phases[i] != "PREDICT" for a, b in asleep for i in range(a, b))


def test_predictors_forget_their_history_on_restart():
    params = [torch.zeros(6, 5), torch.zeros(7)]
    traj = Trajectory(params, TrajectoryConfig(stride=1))
    steps = [torch.randn(traj.numel) for _ in range(6)]
    tail, dmd = TailAverage(2, 1), DMDPredictor(2, 1)
    now = NowcastPredictor(2, 1)
    rssm = make_dynamics("rssm", 2, 1, HybridConfig().dynamics, 0)
    for d in steps:
        with torch.no_grad():
            for p, x in zip(params, traj._views(d)):
                p.add_(x)
        traj.step_taken()
        upd = traj.record_real()
        for pred in (tail, dmd, now):
            pred.observe_params(traj)
        rssm.observe(torch.zeros(FEATURE_DIM), 0.0, upd.coeffs)
    assert tail.predict_displacement(traj, 4) is not None and dmd.predict_displacement(traj, 4) is not None
    assert len(now._snaps) > 0 and len(rssm._window) > 0
    for pred in (tail, dmd, now, rssm):
        pred.restart()
    assert tail.predict_displacement(traj, 4) is None and dmd.predict_displacement(traj, 4) is None
    assert len(now._snaps) == 0 and now.confidence() == 0.0 and len(rssm._window) == 0
    # the nowcaster needs its whole context again: the engine keeps it awake that long
    assert now.history_steps(8) == (now.context - 1) * 4 * 8 + 8


@settings(max_examples=15, deadline=None)
@given(base=st.integers(1, 24), min_full=st.integers(1, 8), warmup=st.integers(0, 12))
def test_dormant_schedule_property(base, min_full, warmup):
    """Asleep first after warmup + min_full + base steps; periods base * 2^k (capped at 32 * base), each
    followed by min_full + base awake steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = HybridConfig(warmup_steps=warmup, min_full_steps=min_full, max_predict_steps=4, predict_threshold=0.5,
                       predictor="constant_velocity")
    cfg.trajectory.stride = 2
    cfg.bandit.dormant_after = base
    dyn = _NeverConfident(2, cfg.trajectory.basis_rank)
    engine = HybridEngine(list(model.parameters()), cfg.validate(), dynamics=dyn)
    dyn.engine = engine
    n = 250
    got = windows(train(model, opt, engine, 0, n, smooth=True))  # no alarm: no cooldown to sleep through
    start, length, expected = warmup + min_full + base, base, []
    while start < n:
        expected.append((start, min(start + length, n)))
        start += length + min_full + base
        length = min(2 * length, 32 * base)
    assert got == expected


@pytest.mark.parametrize("stop", [40, 55, 56, 57, 60])  # asleep, last dormant step, waking, just awake
def test_resume_inside_and_after_a_dormant_period(stop):
    model, opt, engine, dyn = make(dormant_after=20)
    ref = train(model, opt, engine, 0, 200)
    m1, o1, e1, _ = make(dormant_after=20)
    train(m1, o1, e1, 0, stop)
    buf = io.BytesIO()
    torch.save({"m": m1.state_dict(), "o": o1.state_dict(), "e": e1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    m2, o2, e2, d2 = make(dormant_after=20, seed=5)
    m2.load_state_dict(saved["m"])
    o2.load_state_dict(saved["o"])
    e2.load_state_dict(saved["e"])
    assert train(m2, o2, e2, stop, 200) == [s for s in ref if s >= stop]
    assert e2.counters == engine.counters and e2.state_dict()["dormancy"] == engine.state_dict()["dormancy"]
    assert d2.observed_at == [s for s in dyn.observed_at if s >= stop]
    assert d2.restarts == [s for s in dyn.restarts if s > stop]
    torch.testing.assert_close(e2.trajectory.state_dict()["prev"], engine.trajectory.state_dict()["prev"])


def test_resuming_with_dormancy_switched_off_wakes_at_once():
    model, opt, engine, dyn = make(dormant_after=20)
    train(model, opt, engine, 0, 40)
    assert engine.dormant
    sd = engine.state_dict()
    m2, o2, e2, d2 = make(dormant_after=0)
    m2.load_state_dict(model.state_dict())
    o2.load_state_dict(opt.state_dict())
    e2.load_state_dict(sd)
    assert train(m2, o2, e2, 40, 41) == [40]  # the step it resumes on was planned asleep
    assert d2.restarts == [41] and not e2.dormant
    assert train(m2, o2, e2, 41, 200) == []


def test_state_without_dormancy_loads_awake_from_its_step():
    model, opt, engine, _ = make(dormant_after=20)
    train(model, opt, engine, 0, 40)
    assert engine.dormant
    sd = engine.state_dict()
    del sd["dormancy"]  # written by a version before dormancy existed
    m2, o2, fresh, _ = make(dormant_after=20)
    m2.load_state_dict(model.state_dict())
    o2.load_state_dict(opt.state_dict())
    fresh.load_state_dict(sd)
    assert not fresh.dormant
    # awake for min_full + dormant_after steps from the step it resumed at, then asleep
    assert windows(train(m2, o2, fresh, 40, 100))[0][0] == 40 + 6 + 20


def _param_sized(sd, numel):
    """Tensors in a (nested) state dict with at least ``numel`` elements."""
    if isinstance(sd, torch.Tensor):
        return [sd] if sd.numel() >= numel else []
    if isinstance(sd, dict):
        return [t for v in sd.values() for t in _param_sized(v, numel)]
    if isinstance(sd, (list, tuple)):
        return [t for v in sd for t in _param_sized(v, numel)]
    return []


def test_a_dormant_engine_frees_the_trajectory_buffers_and_a_parameter_predictors_history():
    class _IdleDMD(DMDPredictor):
        def confidence(self):
            return 0.0

    model, opt, engine, _ = make(dormant_after=20)
    dmd = _IdleDMD(4, 1)
    engine.dynamics = dmd
    train(model, opt, engine, 0, 35)
    assert engine.trajectory.tracking and len(dmd._snaps) > 0
    train(model, opt, engine, 35, 40)  # asleep from 36 to 56
    assert engine.dormant and not engine.trajectory.tracking and len(dmd._snaps) == 0
    assert engine.trajectory._scratch is None and engine.state_dict()["trajectory"]["prev"] is None
    train(model, opt, engine, 40, 70)  # awake again: tracks and snapshots from the wake-up on
    assert not engine.dormant and engine.trajectory.tracking and len(dmd._snaps) > 0
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(engine.trajectory.current, flat)  # 70 is a stride boundary: read just now


def test_monitor_only_holds_no_parameter_sized_buffers_and_resumes_into_prediction():
    def wide(threshold):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 512), nn.Tanh(), nn.Linear(512, 2))  # larger than any other state
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        cfg = config(dormant_after=0)
        cfg.predict_threshold = threshold
        dyn = _NeverConfident(4, cfg.trajectory.basis_rank)
        engine = HybridEngine(list(model.parameters()), cfg, dynamics=dyn)
        dyn.engine = engine
        return model, opt, engine, dyn

    model, opt, engine, _ = wide(1.0)  # monitor only
    numel = sum(p.numel() for p in model.parameters())
    assert not engine.prediction_enabled
    train(model, opt, engine, 0, 100)
    assert not engine.trajectory.tracking and _param_sized(engine.state_dict(), numel) == []
    # the same state resumed with prediction on: it tracks from the first stride and observes after that
    m2, o2, e2, d2 = wide(0.5)
    m2.load_state_dict(model.state_dict())
    o2.load_state_dict(opt.state_dict())
    e2.load_state_dict(engine.state_dict())
    assert not e2.trajectory.tracking and e2.plan().runs_backward
    train(m2, o2, e2, 100, 102)  # stride 2: the first boundary starts tracking, reads nothing
    assert e2.trajectory.tracking and d2.observed_at == []
    train(m2, o2, e2, 102, 140)
    assert d2.observed_at and d2.observed_at[0] >= 104
    # an awake engine's state holds its previous parameters and mean update, each one number per parameter
    assert len(_param_sized(e2.state_dict(), numel)) == 2


class _BareParameterPredictor:
    """A user's parameter predictor with the required methods only (``restart()`` is optional)."""

    def __init__(self, n_layers, rank):
        self._cv = ConstantVelocity(n_layers, rank)
        self.seen = 0

    def observe(self, features, loss_delta, coeffs):
        self._cv.observe(features, loss_delta, coeffs)

    def rollout(self, intervals):
        return self._cv.rollout(intervals)

    def confidence(self):
        return 0.0

    def observe_residual(self, residual):
        pass

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, sd):
        self.seen = sd["seen"]

    def observe_params(self, trajectory):
        self.seen += 1

    def predict_displacement(self, trajectory, steps):
        return None


def test_a_parameter_predictor_without_restart_sleeps_and_wakes():
    model, opt, engine, _ = make(dormant_after=20)
    engine.dynamics = _BareParameterPredictor(4, 1)
    assert not hasattr(engine.dynamics, "restart")
    assert windows(train(model, opt, engine, 0, 130)) == [(36, 56), (82, 122)]
    sd = engine.state_dict()
    m2, o2, e2, _ = make(dormant_after=20)
    e2.dynamics = _BareParameterPredictor(4, 1)
    e2.load_state_dict(sd)  # loads awake; the same with a dormant state below
    train(model, opt, engine, 130, 150)
    assert engine.dormant
    e2.load_state_dict(engine.state_dict())
    assert e2.dormant and not e2.trajectory.tracking


def test_a_tracked_state_loaded_into_a_monitor_only_engine_drops_its_buffers():
    model, opt, engine, _ = make(dormant_after=0)
    train(model, opt, engine, 0, 30)
    sd = engine.state_dict()
    assert sd["trajectory"]["prev"] is not None
    cfg = config(dormant_after=0)
    cfg.predict_threshold = 1.0
    e2 = HybridEngine(list(model.parameters()), cfg)
    e2.load_state_dict(sd)
    assert not e2.trajectory.tracking and e2.state_dict()["trajectory"]["prev"] is None
    assert train(model, opt, e2, 30, 60) == [] and not e2.trajectory.tracking


def test_no_predict_phase_starts_before_a_resumed_untracked_engine_has_observed():
    """A state saved while monitor-only, resumed with a predictor that is always confident: the first
    phase waits for fresh observations (tracking starts at the first stride boundary after resuming)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    cfg = config(dormant_after=0)
    cfg.predict_threshold = 1.0
    cfg.bandit.arms = [0, 6]
    idle = HybridEngine(list(model.parameters()), cfg)
    train(model, opt, idle, 0, 60)
    cfg = config(dormant_after=0)
    cfg.bandit.arms, cfg.bandit.alpha, cfg.bandit.cooldown_steps = [0, 6], 100.0, 0
    dyn = _ConfidentAt(4, cfg.trajectory.basis_rank, lambda step: True)
    engine = HybridEngine(list(model.parameters()), cfg, dynamics=dyn)
    dyn.engine = engine
    engine.load_state_dict(idle.state_dict())
    assert engine.phase is Phase.FULL and not engine.trajectory.tracking
    res = train_steps(model, loss_fn, opt, (batch(i) for i in range(60, 100)), engine)
    first = res.phases.index("PREDICT")
    assert first >= 2  # not on the steps before the first stride boundary (60, 61): nothing was tracked
    assert engine.counters["phases"] > 0


def test_a_pending_predict_phase_resumed_into_a_released_engine_tracks_again_before_it_starts():
    """Saved right after the phase was chosen (before its first step), loaded where the trajectory is
    released on load (monitor-only): the phase still starts, from freshly read parameters."""
    def cfg(threshold):
        c = config(dormant_after=0)
        c.predictor, c.predict_threshold = "null", threshold
        c.bandit.arms, c.bandit.alpha, c.bandit.cooldown_steps = [0, 6], 100.0, 0
        return c.validate()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    engine = HybridEngine(list(model.parameters()), cfg(0.0))
    for i in range(200):
        if engine.phase is Phase.PREDICT:
            break
        train(model, opt, engine, i, i + 1)
    assert engine.phase is Phase.PREDICT and engine._prediction is None
    idle = HybridEngine(list(model.parameters()), cfg(1.0))
    idle.load_state_dict(engine.state_dict())
    assert not idle.trajectory.tracking
    plan = idle.plan()
    assert plan.phase is Phase.PREDICT and idle.trajectory.tracking and idle.trajectory.has_snapshot
