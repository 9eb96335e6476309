from __future__ import annotations

import io
from functools import partial

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from hybrid_lightning import HybridConfig
from hybrid_lightning.config import TrajectoryConfig
from hybrid_lightning.core.dynamics import ParameterDynamics, make_dynamics
from hybrid_lightning.core.engine import HybridEngine, StepObservation, StepReport
from hybrid_lightning.core.phases import Phase
from hybrid_lightning.core.predictors import DMDPredictor, Drift, NullPredictor, TailAverage
from hybrid_lightning.core.trajectory import Trajectory


def observe_sequence(pred, params, traj, displacements):
    for d in displacements:
        with torch.no_grad():
            for p, x in zip(params, traj._views(d)):
                p.add_(x.to(p.dtype))
        traj.step_taken()
        traj.record_real()
        pred.observe_params(traj)


def test_dmd_extrapolates_linear_dynamics_and_cancels_oscillation():
    torch.manual_seed(0)
    params = [torch.zeros(6, 5), torch.zeros(7)]
    traj = Trajectory(params, TrajectoryConfig(stride=1))
    n = traj.numel
    # geometric decay along one direction: x_k = 0.8^k * v  ->  the next 3 displacements sum to a known value
    v = torch.randn(n)
    dmd = DMDPredictor(2, 1, window=5)
    observe_sequence(dmd, params, traj, [0.8**k * v for k in range(7)])
    got = dmd.predict_displacement(traj, steps=3)
    want = sum(0.8**k for k in range(7, 10)) * v
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # pure oscillation: +v, -v, +v, ... -> the spectral-radius clamp keeps it bounded and the sum cancels
    params2 = [torch.zeros(6, 5), torch.zeros(7)]
    traj2 = Trajectory(params2, TrajectoryConfig(stride=1))
    osc = DMDPredictor(2, 1, window=5)
    observe_sequence(osc, params2, traj2, [(-1) ** k * v for k in range(8)])
    assert float(osc.predict_displacement(traj2, steps=2).norm()) < 1e-3 * float(v.norm())


@given(st.lists(st.integers(1, 7), min_size=1, max_size=4), st.integers(1, 5), st.integers(0, 2**16))
def test_layer_grams_and_combinations_match_per_layer_dot_products(sizes, n, seed):
    g = torch.Generator().manual_seed(seed)
    traj = Trajectory([torch.zeros(k) for k in sizes], TrajectoryConfig())
    rows = torch.randn(n, traj.numel, generator=g)
    grams = traj._layer_grams(rows)
    for i in range(n):
        for j in range(n):
            # float32 sums in another order: equal up to rounding
            torch.testing.assert_close(grams[:, i, j], traj._layer_dots(rows[i], rows[j]), rtol=1e-5, atol=1e-5)
    weights = torch.randn(len(sizes), n, generator=g, dtype=torch.float64)
    want = torch.zeros(traj.numel)
    for j in range(n):
        torch._foreach_add_(traj._views(want), traj._scale_layers(rows[j], weights[:, j].float()))
    torch.testing.assert_close(traj._layer_combine(rows, weights), want)


def test_tail_average_jumps_to_the_average_plus_its_drift():
    params = [torch.zeros(4)]
    traj = Trajectory(params, TrajectoryConfig(stride=1))
    ta = TailAverage(1, 1, decay=0.5, drift=False)
    observe_sequence(ta, params, traj, [torch.ones(4)] * 3)  # theta: 1, 2, 3; avg: 1, 1.5, 2.25
    torch.testing.assert_close(ta.predict_displacement(traj, 5), torch.full((4,), 2.25 - 3.0))
    null = NullPredictor(1, 1)
    assert float(null.predict_displacement(traj, 5).abs().sum()) == 0.0
    assert isinstance(ta, ParameterDynamics) and isinstance(null, ParameterDynamics)


@given(st.lists(st.tuples(st.floats(-2, 2), st.booleans()), min_size=1, max_size=12), st.integers(1, 5),
       st.integers(1, 3), st.integers(1, 20), st.integers(0, 2**16), st.sampled_from([1.0, 0.5, 16.0]))
def test_drift_is_the_mean_real_velocity_over_its_span_and_ignores_predicted_motion(obs, span, stride, steps,
                                                                                     seed, gain):
    """Each observation is ``stride`` real steps moving by a random displacement; a flagged one is first preceded
    by a jump the trajectory resyncs over (as the engine does after a Predict phase). The prediction is the mean
    real displacement per step over the last ``span`` observations, times ``steps`` and ``gain``; jumps never
    count."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.zeros(3, 2, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]  # jumps: no rounding
    traj = Trajectory(params, TrajectoryConfig(stride=stride))
    drift = Drift(2, 1, span=span, gain=gain)
    assert drift.predict_displacement(traj, steps) is None  # no history yet
    real = []
    for scale, jump_first in obs:
        if jump_first:
            with torch.no_grad():
                torch._foreach_add_(params, [torch.randn(p.shape, generator=g, dtype=p.dtype) * 100 for p in params])
            traj.sync()
        d = torch.randn(traj.numel, generator=g, dtype=torch.float64) * scale
        with torch.no_grad():
            torch._foreach_add_(params, traj._views(d))
        for _ in range(stride):
            traj.step_taken()
        traj.record_real()
        drift.observe_params(traj)
        real.append(d)
    last = real[-span:]
    want = torch.stack(last).sum(0) * gain * steps / (len(last) * stride)
    torch.testing.assert_close(drift.predict_displacement(traj, steps), want)


def test_drift_cancels_oscillation_restarts_and_round_trips():
    params = [torch.zeros(4)]
    traj = Trajectory(params, TrajectoryConfig(stride=1))
    v, w = torch.full((4,), 0.1), torch.tensor([1.0, -1.0, 2.0, 0.0])
    drift = Drift(1, 1, span=10)
    observe_sequence(drift, params, traj, [v + (-1) ** k * w for k in range(9)])
    assert drift.confidence() == 0.0  # 9 of 10 observations: no phase may extrapolate a partial span
    observe_sequence(drift, params, traj, [v + (-1) ** k * w for k in range(9, 15)])  # even span: w cancels
    assert drift.confidence() == 1.0 and drift.history_steps(8) == 80
    torch.testing.assert_close(drift.predict_displacement(traj, 16), 16 * v)
    other = Drift(1, 1, span=10)
    buf = io.BytesIO()
    torch.save(drift.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    observe_sequence(drift, params, traj, [v])
    other.observe_params(traj)  # the same observation as drift's last
    torch.testing.assert_close(other.predict_displacement(traj, 3), drift.predict_displacement(traj, 3))
    drift.restart()  # a gap (the engine slept): the velocity starts afresh
    assert drift.predict_displacement(traj, 3) is None and drift.confidence() == 0.0
    with pytest.raises(ValueError, match="span"):
        Drift(1, 1, span=0)
    with pytest.raises(ValueError, match="gain"):
        Drift(1, 1, gain=0.0)


def test_last_update_is_readable_only_until_its_buffer_is_reused():
    params = [torch.zeros(3)]
    traj = Trajectory(params, TrajectoryConfig(stride=2))
    with pytest.raises(RuntimeError, match="record_real"):
        _ = traj.last_update
    with torch.no_grad():
        params[0].add_(1.0)
    traj.step_taken()
    traj.step_taken()
    traj.record_real()
    torch.testing.assert_close(traj.last_update, torch.full((3,), 0.5))  # per step, over the 2 steps
    assert traj.last_update_steps == 2
    traj.snapshot()
    traj.swap_snapshot()  # the probe pair: the scratch buffer now holds parameters
    with pytest.raises(RuntimeError, match="record_real"):
        _ = traj.last_update
    traj.swap_snapshot()
    traj.drop_snapshot()
    traj.step_taken()
    traj.record_real()
    traj.sync()
    assert traj.last_update_steps == 0


def test_engine_applies_a_displacement_in_equal_parts_and_resumes_exactly():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    cfg = HybridConfig(warmup_steps=4, min_full_steps=2, max_predict_steps=4, predict_threshold=0.0, predictor="dmd")
    cfg.trajectory.stride = 1
    cfg.bandit.arms = [0, 4]
    cfg.bandit.alpha = 10.0
    engine = HybridEngine(list(model.parameters()), cfg)
    assert isinstance(engine.dynamics, DMDPredictor)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 4), torch.randn(64, 2)

    def probe():
        with torch.no_grad():
            return float(nn.functional.mse_loss(model(x), y))

    for _ in range(40):
        plan = engine.plan()
        if plan.runs_backward:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            engine.observe(StepObservation(loss=float(loss)), probe)
            continue
        before = [p.detach().clone() for p in model.parameters()]
        engine.apply(plan)
        step_delta = [p.detach() - b for p, b in zip(model.parameters(), before)]
        expected = engine.trajectory.delta_from_flat(engine._displacement, 1 / 4)
        for d, e in zip(step_delta, expected):
            torch.testing.assert_close(d, e)
        if engine.phase_state.steps_in_phase == 1:  # round trip mid-phase
            buf = io.BytesIO()
            torch.save(engine.state_dict(), buf)
            buf.seek(0)
            other = HybridEngine(list(model.parameters()), cfg)
            other.load_state_dict(torch.load(buf, weights_only=True))
            assert torch.equal(other._displacement, engine._displacement)
        engine.observe(StepObservation(), probe)
    assert engine.counters["predicted_steps"] > 0


def test_make_dynamics_knows_the_research_predictors():
    for name, cls in (("null", NullPredictor), ("tail_average", TailAverage), ("dmd", DMDPredictor),
                      ("drift", Drift)):
        assert isinstance(make_dynamics(name, 3, 1, HybridConfig().dynamics, 0), cls)
    cfg = HybridConfig(predictor="drift")
    cfg.dynamics.drift_span = 7
    cfg.dynamics.drift_gain = 16.0
    made = make_dynamics("drift", 3, 1, cfg.dynamics, 0)
    assert (made.span, made.gain) == (7, 16.0)
    cfg.dynamics.drift_gain = 0.0
    with pytest.raises(ValueError, match="drift_gain"):
        cfg.validate()
    cfg.dynamics.drift_gain = 1.0
    cfg.dynamics.drift_span = 0
    with pytest.raises(ValueError, match="drift_span"):
        cfg.validate()


class _TowardTarget(NullPredictor):
    """Predicts ``fraction`` of the way from the current parameters to ``target`` (negative: away from it)."""

    def __init__(self, target: torch.Tensor, fraction: float) -> None:
        super().__init__(1, 1)
        self.target, self.fraction = target, fraction

    def predict_displacement(self, trajectory, steps):
        return self.fraction * (self.target - trajectory.current)


def _quadratic_run(fraction: float, line_search: list[float], steps: int = 12):
    """SGD on ||w - target||^2 with one forced Predict phase; -> (engine, results, w before the phase)."""
    w = nn.Parameter(torch.zeros(5))
    target = torch.linspace(1.0, 2.0, 5)
    cfg = HybridConfig(warmup_steps=3, min_full_steps=2, max_predict_steps=4, predict_threshold=0.0,
                       predictor="null", line_search=line_search)
    cfg.trajectory.stride = 1
    cfg.bandit.arms = [0, 4]
    cfg.bandit.alpha = 100.0
    cfg.corrector.weight_correction = False
    engine = HybridEngine([w], cfg, dynamics=_TowardTarget(target, fraction))
    opt = torch.optim.SGD([w], lr=0.05)
    before = None
    for _ in range(steps):
        if before is None and engine.trajectory.has_snapshot:
            before = engine.trajectory._snapshot.clone()  # the phase started (line search) on the last step
        report = _step(engine, w, target, opt)
        if report.phase_result is not None:
            before = w.detach().clone() if before is None else before  # refused: the weights never moved
            return engine, [(report.phase_result, w.detach().clone(), report.next_phase)], before, target
    return engine, [], before, target


def _step(engine, w, target, opt):
    """One optimizer step of SGD on ||w - target||^2, as the engine plans it -> the engine's report."""
    probe = partial(_sq_dist, w, target)
    plan = engine.plan()
    if not plan.runs_backward:
        engine.apply(plan)
        return engine.observe(StepObservation(), probe)
    opt.zero_grad()
    loss = ((w - target) ** 2).sum()
    loss.backward()
    opt.step()
    return engine.observe(StepObservation(loss=float(loss.detach())), probe)


def test_line_search_scales_the_displacement_to_the_best_step_length():
    # the predictor goes half way to the minimum of a quadratic: twice its displacement lands on it
    engine, results, before, target = _quadratic_run(0.5, [0.5, 1.0, 2.0, 4.0])
    [(result, after, _)] = results
    assert result.kept and result.reason == "probe" and result.step_length == 2.0
    assert result.steps == 4 and engine.counters["predicted_steps"] == 4
    torch.testing.assert_close(after, target)
    assert not torch.equal(before, target)


def test_line_search_refuses_a_phase_no_step_length_improves_and_leaves_the_weights_exact():
    engine, results, before, _ = _quadratic_run(-0.5, [0.5, 1.0, 2.0])  # every step length moves away
    [(result, after, next_phase)] = results
    assert not result.kept and result.reason == "line_search" and result.step_length == 0.0
    assert result.steps == 0 and engine.counters["predicted_steps"] == 0
    assert next_phase is Phase.FULL and engine.counters["refused"] == 1 and engine.counters["rollbacks"] == 0
    assert engine.counters["probe_forwards"] == 4  # not moving, then each step length
    assert torch.equal(after, before)  # the trial steps were undone bit for bit


@given(fraction=st.floats(-1.5, 2.5, allow_nan=False),
       lengths=st.lists(st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0, 4.0]), min_size=1, max_size=4, unique=True))
def test_line_search_picks_the_first_strict_minimum_and_a_refusal_changes_nothing(fraction, lengths):
    engine, results, before, target = _quadratic_run(fraction, lengths)
    [(result, after, _)] = results
    disp = fraction * (target - before)
    best_len, best = 0.0, float(((before - target) ** 2).sum())
    for a in lengths:
        loss = float(((before + a * disp - target) ** 2).sum())
        if loss < best:
            best_len, best = a, loss
    assert result.step_length == best_len
    if best_len == 0.0:
        assert result.reason == "line_search" and torch.equal(after, before)
    else:
        assert result.reason == "probe" and result.kept
        torch.testing.assert_close(after, before + best_len * disp)


def test_with_a_line_search_the_first_phase_uses_the_longest_horizon():
    # a refused phase costs forwards, not steps: the line search replaces the cautious short first phase
    for line_search, first in ((None, 1), ([1.0], 16)):
        w = nn.Parameter(torch.zeros(5))
        cfg = HybridConfig(warmup_steps=3, min_full_steps=2, max_predict_steps=16, predict_threshold=0.0,
                           predictor="null", line_search=line_search)  # arms 0, 1, 4, 8, 16
        engine = HybridEngine([w], cfg, dynamics=_TowardTarget(torch.ones(5), 0.5))
        assert engine.horizon_cap == first
        opt = torch.optim.SGD([w], lr=0.05)
        while engine.plan().runs_backward:
            _step(engine, w, torch.ones(5), opt)
        assert engine.phase_state.horizon == first


class _Nothing(NullPredictor):
    def predict_displacement(self, trajectory, steps):
        return None  # e.g. DMD before it has enough snapshots


def _drive(engine, w, target, steps):
    opt = torch.optim.SGD([w], lr=0.05)
    results, caps = [], []
    for _ in range(steps):
        report = _step(engine, w, target, opt)
        if report.phase_result is not None:
            results.append(report.phase_result)
            caps.append(engine.horizon_cap)
    return results, caps


def _sq_dist(w, target):
    return float(((w.detach() - target) ** 2).sum())


def test_refusals_cost_forwards_not_steps_and_enough_in_a_row_start_a_cooldown():
    target = torch.linspace(1.0, 2.0, 5)
    cfg = HybridConfig(warmup_steps=3, min_full_steps=2, max_predict_steps=8, predict_threshold=0.0,
                       predictor="null", line_search=[1.0, 2.0])  # arms 0, 2, 4, 8: three positive
    cfg.trajectory.stride = 4
    cfg.bandit.cooldown_steps = 50
    w = nn.Parameter(torch.zeros(5))
    engine = HybridEngine([w], cfg, dynamics=_TowardTarget(target, -0.5))  # always away: always refused
    results, caps = _drive(engine, w, target, 30)
    assert len(results) == 3 and all(r.reason == "line_search" and r.steps == 0 for r in results)
    assert results[0].horizon == 8 and caps == [8, 8, 8]  # a refusal does not shrink the horizon cap
    # each refusal is charged its 3 trial forwards over its horizon, nothing for lost steps
    assert all(r.reward == pytest.approx(-3 * cfg.bandit.forward_cost / r.horizon) for r in results)
    assert engine.counters["predicted_steps"] == 0 and engine.counters["rollbacks"] == 0
    assert engine._cooldown_until == results[-1].start_step + 50 and engine.horizon_cap == 8
    # nothing moved, so observation goes on: the stride was not restarted by the refusals
    assert engine.trajectory.real_updates == (engine.counters["real_steps"] - 0) // 4
    # and nothing was rolled back: neither the report nor the rollback-rate feature counts a refusal
    assert not StepReport(results[0].start_step, Phase.FULL, Phase.FULL, phase_result=results[0]).rolled_back
    assert engine.state._rollback_rate.weight == 0.0  # not even as a "kept" 0: the rate has no data yet


def test_cooldown_steps_zero_means_no_cooldown():
    """Forced research schedules (cooldown_steps 0) start a phase every cycle, however many are refused."""
    target = torch.linspace(1.0, 2.0, 5)
    cfg = HybridConfig(warmup_steps=3, min_full_steps=2, max_predict_steps=8, predict_threshold=0.0,
                       predictor="null", line_search=[1.0, 2.0])
    cfg.bandit.cooldown_steps = 0
    w = nn.Parameter(torch.zeros(5))
    engine = HybridEngine([w], cfg, dynamics=_TowardTarget(target, -0.5))  # always refused
    results, _ = _drive(engine, w, target, 60)
    gaps = {b.start_step - a.start_step for a, b in zip(results, results[1:])}
    assert len(results) >= 10 and len(gaps) == 1
    # a state saved while 0 still grew from 1 (before be6a088) resumes without a cooldown
    sd = engine.state_dict()
    sd["cooldown"] = [engine.step + 64, 128]
    fresh = HybridEngine([w], cfg, dynamics=_TowardTarget(target, -0.5))
    fresh.load_state_dict(sd)
    assert (fresh._cooldown_until, fresh._cooldown_len) == (0, 0)


def test_a_line_search_refuses_a_phase_with_nothing_predicted_without_probing():
    target = torch.ones(5)
    cfg = HybridConfig(warmup_steps=3, min_full_steps=2, max_predict_steps=4, predict_threshold=0.0,
                       predictor="null", line_search=[1.0])
    w = nn.Parameter(torch.zeros(5))
    engine = HybridEngine([w], cfg, dynamics=_Nothing(1, 1))
    results, _ = _drive(engine, w, target, 8)
    assert results and results[0].reason == "line_search" and results[0].step_length == 0.0
    assert engine.counters["probe_forwards"] == 0 and engine.counters["predicted_steps"] == 0
