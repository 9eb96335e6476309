"""The overhead budget: observing while nothing is predicted costs at most ``bandit.overhead_budget``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hybrid_lightning.core.budget import OverheadBudget
from hybrid_lightning.core.engine import HybridEngine
from hybrid_lightning.core.loop import train_steps
from tests.test_dormancy import _NeverConfident, config, windows
from tests.test_engine import batch, loss_fn

times = st.floats(0.001, 10.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(plain=st.lists(times, min_size=8, max_size=80), observed=st.lists(times, max_size=40),
       fraction=st.floats(0.01, 1.0))
def test_sleeping_the_owed_steps_brings_the_share_back_within_the_budget_and_no_fewer_would(plain, observed,
                                                                                             fraction):
    b = OverheadBudget(fraction)
    for s in plain:
        b.record(s, "plain")
    for s in observed:
        b.record(s, "observe")
    base, owed = b.plain_step(), b.steps_owed()
    assert base is not None and owed >= 0
    share = lambda n: b.observe_seconds / (b.run_seconds + n * base)  # noqa: E731  # after n plain steps
    assert share(owed) <= fraction * (1 + 1e-9)
    if owed > 0:
        assert share(owed - 1) > fraction * (1 - 1e-9)
    assert b.observe_seconds <= sum(observed)  # only the time above a plain step counts


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(["plain", "observe", "other"]), times), max_size=120))
def test_in_any_order_only_time_above_a_plain_step_is_charged_and_nothing_is_lost(steps):
    b = OverheadBudget(0.05)
    for kind, s in steps:
        b.record(s, kind)
    observed = [s for kind, s in steps if kind == "observe"]
    assert b.run_seconds == pytest.approx(sum(s for _, s in steps))
    assert 0.0 <= b.observe_seconds <= sum(observed) + 1e-9
    if sum(kind == "plain" for kind, _ in steps) >= 8:  # a baseline exists: every observation was charged
        assert not b._pending
        assert b.share <= 1.0
    else:
        assert b.observe_seconds == 0.0 and len(b._pending) == len(observed) and b.steps_owed() == 0


def test_observation_cost_is_the_time_above_the_median_plain_step():
    b = OverheadBudget(0.1)
    b.record(2.0, "observe")  # before 8 plain steps are timed: kept until a baseline exists
    assert b.observe_seconds == 0.0 and b.steps_owed() == 0
    for s in [1.0] * 7:
        b.record(s, "plain")
    assert b.observe_seconds == 0.0
    b.record(50.0, "plain")  # the 8th: the pending observation costs 1 s; one slow plain step (a validation
    assert b.observe_seconds == 1.0  # run, say) does not move the median
    b.record(4.0, "observe")
    b.record(0.5, "observe")  # faster than a plain step: costs nothing, not a negative cost
    b.record(30.0, "other")  # prediction's own cost: run time, not observation time
    b.record(float("nan"), "plain")
    b.record(-1.0, "observe")
    assert b.plain_step() == 1.0 and b.observe_seconds == 4.0 and b.run_seconds == 2.0 + 57.0 + 4.5 + 30.0
    assert b.share == pytest.approx(4.0 / 93.5)
    assert b.steps_owed() == 0  # 4 s of observing may take 40 s of run; 93.5 s ran
    b.record(20.0, "observe")  # 19 s more: 23 s may take 230 s; 113.5 s ran, 116.5 plain steps to go
    assert b.steps_owed() == math.ceil(23.0 / 0.1 - 113.5) == 117
    b.forgive()  # a Predict phase paid: the observing so far is not owed any more
    assert b.observe_seconds == 0.0 and b.steps_owed() == 0 and b.run_seconds == 113.5
    with pytest.raises(ValueError, match="kind"):
        b.record(1.0, "real")
    assert OverheadBudget(None).steps_owed() == 0


def test_state_round_trip_and_bad_state_rejected_untouched():
    early = OverheadBudget(0.05)
    early.record(3.0, "observe")  # pending: no plain step timed yet
    later = OverheadBudget(0.05)
    later.load_state_dict(early.state_dict())
    for s in [1.0] * 8:
        later.record(s, "plain")
    assert later.observe_seconds == 2.0
    b = OverheadBudget(0.05)
    for s in [1.0] * 9:
        b.record(s, "plain")
    b.record(5.0, "observe")
    c = OverheadBudget(0.05)
    c.load_state_dict(b.state_dict())
    assert c.state_dict() == b.state_dict() and c.steps_owed() == b.steps_owed() > 0
    with pytest.raises(ValueError):
        c.load_state_dict({"plain": [1.0], "run_seconds": -1.0, "observe_seconds": 0.0})
    assert c.state_dict() == b.state_dict()


class _Clock:
    """Fake time: 1 s per step, and ``extra`` s whenever the dynamics model observes (the costly part)."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _run(budget, extra, steps=600):
    cfg = config(dormant_after=20)
    cfg.bandit.overhead_budget = budget
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    dyn = _NeverConfident(4, cfg.trajectory.basis_rank)
    engine = HybridEngine(list(model.parameters()), cfg.validate(), dynamics=dyn)
    dyn.engine = engine
    clock = _Clock()
    observe = dyn.observe

    def costly_observe(*args):
        clock.t += extra
        observe(*args)

    def timed_loss(model, b):
        clock.t += 1.0
        return loss_fn(model, b)

    dyn.observe = costly_observe
    shares_at_wake = []
    owed = engine.budget.steps_owed

    def steps_owed():  # asked only when a dormant period ends; 0 means the engine wakes
        n = owed()
        if n == 0:
            shares_at_wake.append(engine.budget.share)
        return n

    engine.budget.steps_owed = steps_owed
    res = train_steps(model, timed_loss, opt, (batch(i) for i in range(steps)), engine, clock=clock)
    asleep = windows([i for i, r in enumerate(res.reports) if r.dormant])
    return engine, asleep, shares_at_wake


def test_costly_observations_lengthen_the_sleep_until_the_share_is_back_within_the_budget():
    free, asleep_free, free_shares = _run(None, extra=0.5)
    engine, asleep, shares = _run(0.05, extra=0.5)
    assert free.counters["budget_extensions"] == 0 and engine.counters["budget_extensions"] > 0
    assert max(free_shares) > 0.08  # without a budget it wakes with observing at over 8% of the time here
    assert asleep[0][0] == asleep_free[0][0] and asleep[0][1] > asleep_free[0][1]  # same sleep, later wake
    assert shares and all(x <= 0.05 + 1e-9 for x in shares)  # the engine wakes only within its budget
    assert max(shares) > 0.03  # ... and as soon as it is (the sleep is not longer than it must be)
    # cheap observations: the same schedule as counting steps alone
    cheap, asleep_cheap, _ = _run(0.05, extra=0.0)
    assert asleep_cheap == asleep_free and cheap.counters["budget_extensions"] == 0


def test_every_process_wakes_at_the_same_step_from_the_mean_of_their_debts():
    seen = []

    other = [100]

    def mean(x):  # stands in for an all-reduce: at the first wake the other process owes 100 steps
        seen.append(x)
        return (x + (other.pop() if other else 0)) / 2

    cfg = config(dormant_after=20)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    dyn = _NeverConfident(4, cfg.trajectory.basis_rank)
    engine = HybridEngine(list(model.parameters()), cfg, dynamics=dyn)
    dyn.engine = engine
    engine.mean_across_processes = mean
    res = train_steps(model, loss_fn, opt, (batch(i) for i in range(200)), engine, clock=None)
    asleep = windows([i for i, r in enumerate(res.reports) if r.dormant])
    # no times were reported, so this process owes nothing; the other's 100 extra steps (mean 50) count
    assert len(seen) >= 2 and all(x == 0 for x in seen)
    assert asleep[0] == (36, 36 + 20 + 50) and engine.counters["budget_extensions"] == 1


def test_the_engine_saves_and_restores_its_timings_and_reads_states_written_before_them():
    engine, _, _ = _run(0.05, extra=0.5, steps=120)
    sd = engine.state_dict()
    cfg = config(dormant_after=20)
    cfg.bandit.overhead_budget = 0.05
    fresh = HybridEngine(list(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2)).parameters()), cfg,
                         dynamics=_NeverConfident(4, cfg.trajectory.basis_rank))
    fresh.load_state_dict(sd)
    assert fresh.budget.state_dict() == engine.budget.state_dict() and fresh.budget.steps_owed() > 0
    old = {k: v for k, v in sd.items() if k != "budget"}
    fresh.load_state_dict(old)
    assert fresh.budget.run_seconds == 0.0 and fresh.budget.steps_owed() == 0
