"""The shipped meta-trained nowcaster: loads offline, predicts finite parameter-shaped jumps, rolls back exactly."""

from __future__ import annotations

import io
import itertools
import math
import socket
from importlib import resources

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hybrid_lightning import HybridConfig
from hybrid_lightning.config import TrajectoryConfig
from hybrid_lightning.core.dynamics import make_dynamics
from hybrid_lightning.core.engine import HybridEngine, StepObservation
from hybrid_lightning.core.nowcaster import (
    NowcasterNet,
    NowcastPredictor,
    entry_neurons,
    featurize,
    load_nowcaster,
    neuron_means,
    neuron_paths,
)
from hybrid_lightning.core.trajectory import Trajectory
from hybrid_lightning.nowcast.corpus import build, draw_task, record_task


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the nowcaster tried to open a network connection")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_shipped_nowcaster_loads_offline_and_is_small(no_network):
    net, meta = load_nowcaster()
    assert isinstance(net, NowcasterNet) and not net.training
    assert meta["spacing"] > 0 and meta["context"] >= 3
    path = resources.files("hybrid_lightning.nowcast") / "nowcaster.pt"
    assert path.is_file() and len(path.read_bytes()) < 3 * 2**20
    assert all(torch.isfinite(p).all() for p in net.parameters())


def _observe(pred, model, traj, steps, stride, lr=0.05):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * lr + 0.01)  # drift + noise
        if traj.step_taken():
            traj.record_real()
            pred.observe_params(traj)


def test_predictions_are_finite_and_shaped_like_the_parameters(no_network):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.LayerNorm(3))
    params = list(model.parameters())
    traj = Trajectory(params, TrajectoryConfig(stride=8))
    pred = make_dynamics("nowcast", len(params), 1, HybridConfig().dynamics, 0)
    assert isinstance(pred, NowcastPredictor)
    need = (pred.context - 1) * pred.spacing + 8  # the first snapshot is the first observation, 8 steps in
    _observe(pred, model, traj, need - 8, 8)
    assert pred.confidence() == 0.0 and pred.predict_displacement(traj, 32) is None
    _observe(pred, model, traj, 8, 8)
    assert pred.confidence() == 1.0
    disp = pred.predict_displacement(traj, 64)
    assert disp.shape == traj.current.shape and torch.isfinite(disp).all() and disp.abs().sum() > 0
    delta = traj.delta_from_flat(disp, 0.25)
    assert [d.shape for d in delta] == [p.shape for p in params]
    # the history restarts after a jump: no second jump from stale snapshots
    _observe(pred, model, traj, 8, 8)
    assert pred.confidence() == 0.0


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(1e-4, 1e3), seed=st.integers(0, 2**16), ratio=st.floats(0.25, 4.0))
def test_nowcast_is_equivariant_to_the_tensors_scale(scale, seed, ratio):
    """Per-tensor scaling: scaling a tensor's whole history scales its predicted displacement alike."""
    net, _ = load_nowcaster()
    g = torch.Generator().manual_seed(seed)
    hist = torch.randn(1, 50, generator=g, dtype=torch.float64) + torch.cumsum(
        torch.randn(net.context, 50, generator=g, dtype=torch.float64) * 0.1, 0)
    base = net.displacement(hist.float(), ratio, (5, 10))
    scaled = net.displacement((hist * scale).float(), ratio, (5, 10))
    torch.testing.assert_close(scaled, base * scale, rtol=2e-3, atol=1e-6 * scale)


def test_frozen_tensor_is_not_moved_and_features_are_bounded():
    net, _ = load_nowcaster()
    frozen = torch.ones(net.context, 7)
    assert torch.equal(net.displacement(frozen, 2.0, (7,)), torch.zeros(7))
    wild = torch.zeros(net.context, 4)
    wild[-1] = torch.tensor([1e-30, 1e30, -1e30, 0.0])
    feats, _ = featurize(wild, 1.0, False)
    assert torch.isfinite(feats).all() and feats.abs().max() <= 10.0


def test_engine_jump_then_rollback_restores_the_parameters_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    net_meta = load_nowcaster()[1]
    need = (net_meta["context"] - 1) * net_meta["spacing"]
    cfg = HybridConfig(warmup_steps=need, min_full_steps=need + 8, max_predict_steps=32, predict_threshold=0.0,
                       predictor="nowcast")
    cfg.bandit.arms = [0, 32]
    cfg.bandit.alpha = 100.0
    cfg.bandit.cooldown_steps = 0
    engine = HybridEngine(list(model.parameters()), cfg)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 4), torch.randn(64, 2)

    calls = itertools.count(1)

    def probe():  # the engine probes after, then before: a falling sequence says every phase made things worse
        return 1.0 / next(calls)

    rolled, jumped = 0, 0.0
    start: list[torch.Tensor] | None = None
    for _ in range(2 * need + 120):
        plan = engine.plan()
        if plan.runs_backward:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            report = engine.observe(StepObservation(loss=loss.item()), probe)
        else:
            if start is None:
                start = [p.detach().clone() for p in model.parameters()]
            engine.apply(plan)
            jumped = max(jumped, sum(float((p.detach() - s).abs().sum()) for p, s in zip(model.parameters(), start)))
            if engine.phase_state.steps_in_phase == 2:  # round trip mid-phase keeps the displacement
                buf = io.BytesIO()
                torch.save(engine.state_dict(), buf)
                buf.seek(0)
                other = HybridEngine(list(model.parameters()), cfg)
                other.load_state_dict(torch.load(buf, weights_only=True))
                assert torch.equal(other._displacement, engine._displacement)
            report = engine.observe(StepObservation(), probe)
        res = report.phase_result
        if res is not None:
            assert not res.kept and start is not None
            # bit-exact: the snapshot is restored
            moved = sum(float((p.detach() - s).abs().sum()) for p, s in zip(model.parameters(), start))
            assert res.reason == "probe" and math.isfinite(res.loss_before) and moved == 0.0
            rolled += 1
            start = None
    assert rolled >= 1 and engine.counters["predicted_steps"] >= 32 and jumped > 0


def test_corpus_tasks_are_deterministic_and_train():
    spec = draw_task(2)
    assert spec == draw_task(2) and spec["family"] == "tf_markov"
    spec = {**draw_task(0), "steps": 48}
    a, b = record_task(spec, max_entries=16), record_task(spec, max_entries=16)
    assert all(torch.equal(x, y) for x, y in zip(a["snaps"], b["snaps"]))
    assert a["snaps"][0].shape == (48 // a["record_every"] + 1, 16)
    model, _ = build(spec)
    assert [tuple(p.shape) for p in model.parameters()] == a["shapes"]


def test_config_names_a_missing_nowcaster_file(tmp_path):
    from hybrid_lightning import ConfigError

    with pytest.raises(ConfigError, match="dynamics.nowcaster"):
        HybridConfig.from_dict({"predictor": "nowcast", "dynamics": {"nowcaster": str(tmp_path / "nope.pt")}})


def test_state_dict_round_trip_gives_the_same_next_jump():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    traj = Trajectory(list(model.parameters()), TrajectoryConfig(stride=8))
    pred = NowcastPredictor(3 + 1, 1)
    _observe(pred, model, traj, 100, 8)  # history half full: the round trip must carry it and the counters
    buf = io.BytesIO()
    torch.save(pred.state_dict(), buf)
    buf.seek(0)
    other = NowcastPredictor(3 + 1, 1)
    other.load_state_dict(torch.load(buf, weights_only=True))
    clone = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    clone.load_state_dict(model.state_dict())
    traj2 = Trajectory(list(clone.parameters()), TrajectoryConfig(stride=8))
    traj2.load_state_dict(traj.state_dict())
    _observe(pred, model, traj, 48, 8)
    _observe(other, clone, traj2, 48, 8)
    assert pred.confidence() == other.confidence() == 1.0
    torch.testing.assert_close(pred.predict_displacement(traj, 64), other.predict_displacement(traj2, 64),
                               rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 6), k=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_neuron_paths_are_the_row_and_column_means_of_every_entry(rows, cols, k, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, cols, k)  # a conv-like kernel: columns are everything after the first dimension
    hist = torch.randn(3, rows * cols * k, generator=g)
    r_path, c_path = neuron_paths(hist, shape)
    for t in range(3):
        r, c = neuron_means(hist[t].view(shape))
        flat = torch.arange(rows * cols * k)
        torch.testing.assert_close(r_path[t], r[flat // (cols * k)])
        torch.testing.assert_close(c_path[t], c[flat % (cols * k)])
        # the training samples index the recorded means the same way (train/run-time consistency)
        row, col = entry_neurons(flat, shape)
        torch.testing.assert_close(r_path[t], r[row])
        torch.testing.assert_close(c_path[t], c[col])


def test_neuron_paths_of_a_vector_are_itself_and_its_mean():
    hist = torch.randn(3, 7)
    r_path, c_path = neuron_paths(hist, (7,))
    row, col = entry_neurons(torch.arange(7), (7,))
    for t in range(3):
        r, c = neuron_means(hist[t])
        torch.testing.assert_close(r_path[t], r[row])
        torch.testing.assert_close(c_path[t], c[col])


def test_a_stride_that_does_not_divide_the_spacing_scales_the_horizon():
    """Stride 24: snapshots every observation, 24 steps apart (trained: 32). A 24-step jump is then one
    spacing, like a 32-step jump at stride 8; without the scaling it would be 0.75 of one."""
    torch.manual_seed(0)
    hist = torch.cumsum(torch.randn(5, 36), 0)  # nn.Linear(5, 6): 30 weights + 6 biases
    model = nn.Linear(5, 6)
    params = list(model.parameters())

    def jump(stride, steps):
        traj = Trajectory(params, TrajectoryConfig(stride=stride))
        pred = NowcastPredictor(2, 1)
        for h in hist:
            with torch.no_grad():
                for p, v in zip(params, traj._views(h.clone())):
                    p.copy_(v)
            traj.sync()
            pred._snaps.append(traj.current.clone())
        return pred.predict_displacement(traj, steps)

    torch.testing.assert_close(jump(24, 24), jump(8, 32))
    assert not torch.allclose(jump(24, 32), jump(8, 32))
