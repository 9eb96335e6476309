from __future__ import annotations

import io

import torch
from torch import nn

from hybrid_lightning import HybridConfig
from hybrid_lightning.config import TrajectoryConfig
from hybrid_lightning.core.dynamics import ParameterDynamics, make_dynamics
from hybrid_lightning.core.engine import HybridEngine, StepObservation
from hybrid_lightning.core.predictors import DMDPredictor, NullPredictor, TailAverage
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


def test_tail_average_jumps_to_the_average_plus_its_drift():
    params = [torch.zeros(4)]
    traj = Trajectory(params, TrajectoryConfig(stride=1))
    ta = TailAverage(1, 1, decay=0.5, drift=False)
    observe_sequence(ta, params, traj, [torch.ones(4)] * 3)  # theta: 1, 2, 3; avg: 1, 1.5, 2.25
    torch.testing.assert_close(ta.predict_displacement(traj, 5), torch.full((4,), 2.25 - 3.0))
    null = NullPredictor(1, 1)
    assert float(null.predict_displacement(traj, 5).abs().sum()) == 0.0
    assert isinstance(ta, ParameterDynamics) and isinstance(null, ParameterDynamics)


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
    for name, cls in (("null", NullPredictor), ("tail_average", TailAverage), ("dmd", DMDPredictor)):
        assert isinstance(make_dynamics(name, 3, 1, HybridConfig().dynamics, 0), cls)
