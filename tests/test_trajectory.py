from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hybrid_lightning.config import TrajectoryConfig
from hybrid_lightning.core.trajectory import Trajectory


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def step(params, seed, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale + scale)


def test_delta_has_parameter_structure_and_is_basis_times_coefficients():
    params = make_params()
    traj = Trajectory(params, TrajectoryConfig(stride=1))
    step(params, 1)
    assert traj.step_taken()
    traj.record_real()
    coeffs = torch.tensor([[2.0], [0.5], [-1.0]])
    delta = traj.compose(coeffs)
    basis = traj.basis()[0].split(traj.numels)
    for d, p, b, c in zip(delta, params, basis, coeffs[:, 0]):
        assert d.shape == p.shape and d.dtype == p.dtype
        torch.testing.assert_close(d.reshape(-1), c * b)


def test_apply_adds_exactly_the_delta():
    params = make_params()
    before = [p.detach().clone() for p in params]
    traj = Trajectory(params)
    delta = [torch.full_like(p, 0.25) for p in params]
    traj.apply(delta)
    for p, b, d in zip(params, before, delta):
        assert torch.equal(p.detach(), b + d)


def test_apply_rejects_wrong_structure():
    params = make_params()
    traj = Trajectory(params)
    with pytest.raises(ValueError, match="tensors"):
        traj.apply([torch.zeros(4, 3)])
    with pytest.raises(ValueError, match="param1"):
        traj.apply([torch.zeros(4, 3), torch.zeros(4), torch.zeros(2, 2, 2)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_snapshot_rollback_is_bit_exact_with_buffers(dtype):
    params = make_params(dtype)
    buf = torch.arange(5.0)
    traj = Trajectory(params, buffers=[buf])
    before = [p.detach().clone() for p in params]
    traj.snapshot()
    step(params, 3, scale=1.0)
    buf.add_(7)
    traj.rollback()
    for p, b in zip(params, before):
        assert p.dtype == dtype and torch.equal(p.detach(), b)
    assert torch.equal(buf, torch.arange(5.0)) and not traj.has_snapshot


def test_swap_snapshot_twice_is_identity():
    params = make_params()
    traj = Trajectory(params)
    traj.snapshot()
    snap = [p.detach().clone() for p in params]
    step(params, 4, scale=0.5)
    live = [p.detach().clone() for p in params]
    traj.swap_snapshot()
    assert all(torch.equal(p.detach(), s) for p, s in zip(params, snap))
    traj.swap_snapshot()
    assert all(torch.equal(p.detach(), v) for p, v in zip(params, live))


def test_stride_averages_the_update_per_step():
    params = make_params()
    traj = Trajectory(params, TrajectoryConfig(stride=3))
    with torch.no_grad():
        for _ in range(3):
            for p in params:
                p.add_(0.1)
            done = traj.step_taken()
    assert done
    upd = traj.record_real()
    n = sum(p.numel() for p in params)
    assert upd.norm == pytest.approx(0.1 * n**0.5, rel=1e-5)


@given(st.lists(st.floats(-3, 3), min_size=2, max_size=2))
def test_coefficients_recover_a_combination_of_the_basis(cs):
    params = make_params()
    traj = Trajectory(params, TrajectoryConfig(stride=1, basis_rank=2, window=4, basis_refresh=1))
    for s in range(5):
        step(params, 10 + s, scale=0.05)
        traj.step_taken()
        traj.record_real()
    coeffs = torch.tensor([cs] * 3, dtype=torch.float32)
    flat = torch.cat([d.reshape(-1) for d in traj.compose(coeffs)])
    got = traj.coefficients(flat)
    torch.testing.assert_close(got, coeffs, atol=2e-3, rtol=2e-3)


def test_memory_is_fixed_regardless_of_steps():
    params = make_params()
    traj = Trajectory(params, TrajectoryConfig(stride=1, basis_rank=3, window=4))

    def nbytes():
        sd = traj.state_dict()
        return sum(v.numel() * v.element_size() for v in sd.values() if isinstance(v, torch.Tensor))

    step(params, 0)
    traj.step_taken()
    traj.record_real()
    first = nbytes()
    for s in range(200):
        step(params, s)
        traj.step_taken()
        traj.record_real()
    assert nbytes() == first


def test_nonfinite_delta_detected():
    params = make_params()
    traj = Trajectory(params)
    ok = [torch.zeros_like(p) for p in params]
    bad = [torch.zeros_like(p) for p in params]
    bad[1][0] = float("nan")
    assert traj.is_finite(ok) and not traj.is_finite(bad)


def test_state_dict_round_trip_and_shape_check():
    params = make_params()
    traj = Trajectory(params, TrajectoryConfig(stride=1))
    step(params, 1)
    traj.step_taken()
    traj.record_real()
    traj.snapshot()
    other = Trajectory(make_params(seed=5), TrajectoryConfig(stride=1))
    other.load_state_dict(traj.state_dict())
    assert torch.equal(other.basis()[0], traj.basis()[0]) and other.has_snapshot
    wrong = Trajectory([torch.zeros(2, 2)])
    with pytest.raises(ValueError, match="other shapes"):
        wrong.load_state_dict(traj.state_dict())


@pytest.mark.parametrize("rank", [1, 3])
def test_release_frees_the_tracking_buffers_and_sync_tracks_again(rank):
    params = make_params()
    cfg = TrajectoryConfig(stride=1, basis_rank=rank, window=4 if rank > 1 else 0)
    idle = Trajectory(params, cfg, track=False)
    assert not idle.tracking and idle._ema is None and idle._window is None and idle.state_dict()["prev"] is None
    traj = Trajectory(params, cfg)
    for s in range(3):
        step(params, s)
        traj.step_taken()
        traj.record_real()
    ema = traj.basis()[0].clone()
    traj.release()
    assert not traj.tracking and traj._scratch is None
    with pytest.raises(RuntimeError, match="sync"):
        traj.record_real()
    with pytest.raises(RuntimeError, match="sync"):
        _ = traj.current
    step(params, 7, scale=10.0)  # a change nobody observed is not read as an update after the next sync
    sd = traj.state_dict()
    back = Trajectory(params, cfg, track=False)
    back.load_state_dict(sd)
    for t in (traj, back):
        assert not t.tracking and torch.equal(t.basis()[0], ema)  # the mean update survives
        t.sync()
        assert t.tracking and torch.equal(t.current, torch.cat([p.detach().reshape(-1) for p in params]))
        step(params, 8)
        t.step_taken()
        upd = t.record_real()
        assert upd.norm < 1.0  # one step's update (about 0.07 here), not the unobserved jump as well
    traj.snapshot()
    with pytest.raises(RuntimeError, match="snapshot"):
        traj.release()


@given(st.lists(st.floats(-3.0, 3.0), min_size=3, max_size=3), st.integers(0, 2**16), st.sampled_from([None, 1]))
def test_tangential_removes_each_tensors_part_along_itself_and_keeps_the_rest(along, seed, zero):
    params = make_params(seed=seed)
    if zero is not None:
        with torch.no_grad():
            params[zero].zero_()  # a zero tensor has no direction of its own: its part is kept whole
    traj = Trajectory(params, TrajectoryConfig(stride=1))
    g = torch.Generator().manual_seed(seed + 1)
    across = []
    for p in params:  # a random direction less its part along p: orthogonal to p
        w, r = p.detach().reshape(-1), torch.randn(p.numel(), generator=g)
        across.append(r - (r @ w) / (w @ w) * w if float(w @ w) > 0 else r)
    flat = torch.cat([a * p.detach().reshape(-1) + t for a, p, t in zip(along, params, across)])
    out = traj.tangential(flat)
    assert out.data_ptr() != flat.data_ptr()  # a new tensor: the predictor's own stays as it was
    for o, t, p in zip(out.split(traj.numels), across, params):
        torch.testing.assert_close(o, t, atol=1e-5, rtol=1e-5)
        assert abs(float(o @ p.detach().reshape(-1))) < 1e-4


def test_tangential_measures_along_the_snapshot_when_one_is_held():
    params = make_params()
    traj = Trajectory(params, TrajectoryConfig(stride=1))
    traj.snapshot()
    w0 = torch.cat([p.detach().reshape(-1).clone() for p in params])
    step(params, 3, scale=0.5)  # the parameters move on (a predicted step applied since the snapshot)
    out = traj.tangential(w0 * 2.0)  # all of it along the snapshot's values
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-6, rtol=0)
