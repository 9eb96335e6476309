from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from hybrid_lightning.core.state import FEATURE_DIM, TrainingState

any_float = st.floats(allow_nan=True, allow_infinity=True, width=32)
maybe = st.one_of(st.none(), any_float)


@given(st.lists(st.tuples(any_float, maybe, maybe, maybe, maybe, st.booleans()), max_size=80))
def test_features_fixed_size_finite_and_normalized(events):
    s = TrainingState(history=16)
    for loss, g, u, c, p, predicted in events:
        if predicted:
            s.record_predicted(loss)
        else:
            s.record_real(loss, g, u, c, p)
        f = s.features()
        assert f.shape == (FEATURE_DIM,) and f.dtype == torch.float32
        assert torch.isfinite(f).all() and f.abs().max() <= 1.0
    assert len(s.losses) <= 16 and len(s.grad_norms) <= 16 and len(s.update_norms) <= 16


def test_histories_bounded_regardless_of_step_count():
    s = TrainingState(history=8)
    for i in range(10_000):
        s.record_real(1.0 / (i + 1), 1.0, 0.1, 0.5, 10.0)
    assert len(s.losses) == 8 and s.step == 10_000


def test_progress_rate_estimates_linear_slope():
    s = TrainingState()
    for i in range(600):
        s.record_real(10.0 - 0.01 * i)
    assert math.isclose(s.progress_rate(), 0.01, rel_tol=0.05)


def test_progress_rate_positive_floor_when_loss_rises():
    s = TrainingState()
    for i in range(300):
        s.record_real(1.0 + 0.01 * i)
    assert 0 < s.progress_rate() < 1e-3


def test_state_dict_round_trip_is_exact():
    s = TrainingState(history=10)
    for i in range(25):
        s.record_real(1.0 / (i + 1), 0.5 + i, 0.1, 0.3, 4.0)
        if i % 5 == 0:
            s.record_predicted(0.2)
    s.record_phase_outcome(True, 0.3, -0.2)
    t = TrainingState(history=10)
    t.load_state_dict(s.state_dict())
    assert torch.equal(s.features(), t.features())
    assert t.state_dict() == s.state_dict()
    s.record_real(0.01, 1.0, 0.1, 0.2, 4.0)
    t.record_real(0.01, 1.0, 0.1, 0.2, 4.0)
    assert torch.equal(s.features(), t.features())


def test_a_refused_phase_leaves_the_rollback_rate_alone():
    s = TrainingState()
    s.record_phase_outcome(True, 0.3, -0.2)
    s.record_phase_outcome(None, 0.0, -0.05)  # refused by the line search: the weights never moved
    assert s._rollback_rate.value == 1.0 and s.last_value == -0.05
    s.record_phase_outcome(False, 0.1, 0.4)
    assert 0.0 < s._rollback_rate.value < 1.0
