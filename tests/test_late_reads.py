"""Late reads: while the engine only monitors, a GPU run need not sync the device every step to read the loss.

The engine takes unread values (device tensors) on the steps whose plan says ``read_late`` and reads them
``idle_read_every`` at a time. Every decision must come out exactly as if each value had been read at once.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from hybrid_lightning import HybridConfig, HybridPredictiveTraining, NumericalError
from hybrid_lightning.core import engine as engine_mod
from hybrid_lightning.core.engine import HybridEngine, StepObservation
from hybrid_lightning.lightning.callback import _identity
from lightning_helpers import StepData, trainer
from tests.test_dormancy import _NeverConfident, config, windows
from tests.test_engine import batch, loss_fn
from tests.test_reliability import Faulty, InfGradAt, all_finite, fresh


def _monitor_only(every: int) -> HybridConfig:
    cfg = HybridConfig(warmup_steps=5, predict_threshold=1.0, idle_read_every=every)
    cfg.trajectory.stride = 3
    cfg.divergence.min_history = 5
    return cfg.validate()


def _engine(cfg: HybridConfig) -> HybridEngine:
    torch.manual_seed(0)
    return HybridEngine(list(nn.Linear(4, 2).parameters()), cfg)


def _feed(engine, values, as_tensors, late):
    """One observe per (loss, grad_norm); unread tensors where the plan allows and ``as_tensors``."""
    deferred = 0
    for loss, norm in values:
        plan = engine.plan()
        norm = norm if plan.measure_grad_norm else None
        if plan.read_late and as_tensors:
            deferred += 1
            loss, norm = torch.tensor([loss]), None if norm is None else torch.tensor(norm)
        late += engine.observe(StepObservation(loss=loss, grad_norm=norm)).late_values
    return deferred


def _decisions(engine):
    """Everything the values feed: the monitor, the state's statistics, the counters, horizon and cooldown, the
    loss block. (Not the Full phase's step count, which an alarm read late does not reset: nothing uses it while
    only monitoring, and waking starts it afresh.)"""
    return repr((engine.monitor.state_dict(), engine.state.state_dict(), engine.counters, engine.horizon_cap,
                 engine._cooldown_until, engine._dormant_until, engine._block_loss, engine._block_count))


f32 = st.floats(0.125, 10.0, width=32)  # the values a device tensor holds
loss_values = st.one_of(f32, st.sampled_from([50.0, 1e4, math.nan, math.inf]))
steps = st.lists(st.tuples(loss_values, st.floats(0.125, 100.0, width=32)), min_size=1, max_size=120)


@settings(max_examples=60, deadline=None)
@given(values=steps, every=st.integers(1, 20), cut=st.integers(0, 120))
def test_reading_late_changes_no_decision_and_reads_k_steps_at_a_time(values, every, cut):
    now, later, resumed = (_engine(_monitor_only(every)) for _ in range(3))
    _feed(now, values, as_tensors=False, late=[])
    reads = []
    real_read = engine_mod._read

    def counting(vals):
        if any(isinstance(v, torch.Tensor) for v in vals):
            reads.append(len(vals))
        return real_read(vals)

    late: list = []
    with mock.patch.object(engine_mod, "_read", counting):
        deferred = _feed(later, values, as_tensors=True, late=late)
        tail, events = later.flush()
        late += tail
    assert all(str(e).startswith("step ") and ", read late: " in str(e) for e in events)
    assert _decisions(later) == _decisions(now)
    # every deferred value came back once, in order, with its step; one transfer per idle_read_every of them
    assert [s for s, _, _ in late] == [s for s in range(len(values)) if s >= len(values) - deferred]
    assert repr([v for _, v, _ in late]) == repr([loss for loss, _ in values[len(values) - deferred:]])
    assert len(reads) == (math.ceil(deferred / every) if every > 1 else 0)

    # saving with values still waiting reads them but keeps them waiting: resuming changes nothing
    cut = min(cut, len(values))
    _feed(resumed, values[:cut], as_tensors=True, late=[])
    waiting = len(resumed._late)
    sd = resumed.state_dict()
    assert len(resumed._late) == waiting and not any(isinstance(v, torch.Tensor) for x in sd["late"] for v in x)
    fresh_engine = _engine(_monitor_only(every))
    fresh_engine.load_state_dict(sd)
    _feed(fresh_engine, values[cut:], as_tensors=True, late=[])
    fresh_engine.flush()
    assert _decisions(fresh_engine) == _decisions(now)


def _dormant_run(as_tensors, steps=300):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    cfg = config(dormant_after=20)
    cfg.idle_read_every = 8
    dyn = _NeverConfident(4, cfg.trajectory.basis_rank)
    engine = HybridEngine(list(model.parameters()), cfg, dynamics=dyn)
    dyn.engine = engine
    dormant, late_steps = [], []
    for i in range(steps):
        plan = engine.plan()
        if plan.read_late:  # only inside a dormant period, never on its last step: waking reads everything
            assert engine.dormant and engine.step + 1 < engine._dormant_until
            late_steps.append(i)
        if engine.dormant:
            dormant.append(i)
        opt.zero_grad()
        loss = loss_fn(model, batch(i))
        loss.backward()
        opt.step()
        value = loss.detach().reshape(1) if plan.read_late and as_tensors else float(loss.detach())
        engine.observe(StepObservation(loss=value))
        if not plan.read_late:
            assert not engine._late
    engine.flush()
    return engine, dyn, dormant, late_steps


def test_a_dormant_engine_reads_late_and_wakes_observes_and_restarts_exactly_as_when_reading_at_once():
    now, dyn_now, dormant_now, _ = _dormant_run(as_tensors=False)
    later, dyn_later, dormant_later, late_steps = _dormant_run(as_tensors=True)
    assert windows(dormant_later) == windows(dormant_now) == [(36, 56), (82, 122), (148, 228), (254, 300)]
    assert windows(late_steps) == [(36, 55), (82, 121), (148, 227), (254, 300)]
    assert dyn_later.restarts == dyn_now.restarts and dyn_later.observed_at == dyn_now.observed_at
    assert _decisions(later) == _decisions(now)


# ---------------------------------------------------------------- with a Trainer (CPU, late reads forced)
def _fit(model, cfg, late, steps=60, **kw):
    cb = HybridPredictiveTraining(cfg, verbose=False)
    tr = trainer([cb], max_steps=steps, strategy="hybrid", **kw)
    with mock.patch("hybrid_lightning.lightning.callback._reads_late", lambda device: late):
        tr.fit(model)
    return tr, cb


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_callback_passes_unread_losses_and_the_run_and_its_report_are_unchanged(accumulate):
    cfg = HybridConfig(warmup_steps=10, predict_threshold=1.0, idle_read_every=8).validate()
    observed = []
    real_observe = HybridEngine.observe

    def spy(self, obs, probe=None):
        observed.append(isinstance(obs.loss, torch.Tensor))
        return real_observe(self, obs, probe)

    with mock.patch.object(HybridEngine, "observe", spy):
        _, late = _fit(fresh(StepData), cfg, late=True, accumulate_grad_batches=accumulate)
    _, now = _fit(fresh(StepData), cfg, late=False, accumulate_grad_batches=accumulate)
    assert sum(observed) == 50 and not any(observed[:10])  # every Full step after the warmup went unread
    assert late.report.curve == now.report.curve and len(late.report.curve) == 60
    assert late.engine.counters == now.engine.counters
    assert _decisions(late.engine) == _decisions(now.engine)


@pytest.mark.parametrize("kind", ["nan_input", "inf_loss"])
def test_a_nonfinite_loss_read_late_stops_the_run_with_a_clear_error(kind):
    cfg = HybridConfig(warmup_steps=10, predict_threshold=1.0, idle_read_every=8).validate()
    with pytest.raises(NumericalError, match="idle_read_every") as err:
        _fit(fresh(Faulty, faults={30: (kind, None)}), cfg, late=True)
    assert "step 30" in str(err.value)
    # read at once (a CPU, or idle_read_every: 1), the same step is skipped and training goes on
    for late, every in ((False, 8), (True, 1)):
        cfg.idle_read_every = every
        tr, cb = _fit(fresh(Faulty, faults={30: (kind, None)}), cfg, late=late)
        assert cb.engine.counters["skipped_steps"] == 1 and all_finite(tr.lightning_module, tr.optimizers[0])


def test_nonfinite_gradients_under_a_finite_loss_read_late_stop_the_run_at_their_step():
    cfg = HybridConfig(warmup_steps=10, predict_threshold=1.0, idle_read_every=8).validate()
    probe, measured = _engine(cfg), []
    for s in range(60):
        plan = probe.plan()
        if plan.measure_grad_norm:
            measured.append(s)
        probe.observe(StepObservation(loss=1.0, grad_norm=1.0 if plan.measure_grad_norm else None))
    at = next(s for s in measured if s > 20)  # the gradient norm is measured there (every trajectory.stride)
    with pytest.raises(NumericalError, match=f"step {at}, and the weights"):
        _fit(fresh(InfGradAt, at=at), cfg, late=True)
    tr, cb = _fit(fresh(InfGradAt, at=at), cfg, late=False)  # read at once: skipped
    assert cb.engine.counters["skipped_steps"] == 1 and all_finite(tr.lightning_module, tr.optimizers[0])


def test_on_nonfinite_raise_raises_on_a_late_nonfinite_loss_even_where_the_weights_stayed_finite():
    cfg = HybridConfig(warmup_steps=10, predict_threshold=1.0, idle_read_every=8, on_nonfinite="raise").validate()
    cb = HybridPredictiveTraining(cfg, verbose=False)
    cb._params = [torch.zeros(3)]  # finite weights
    with pytest.raises(NumericalError, match="step 12 .*on_nonfinite='raise'"):
        cb._check_late(None, [(11, 1.0, None), (12, float("nan"), None)])
    cb.config = HybridConfig(idle_read_every=8)  # on_nonfinite 'skip': the weights stayed finite, training goes on
    cb._check_late(None, [(13, float("nan"), None), (14, 1.0, math.inf)])
    assert [p[0] for p in cb._curve.points] == [11, 14]  # the losses read, finite ones only


def test_checkpoint_identity_ignores_defaults_and_settings_that_change_no_decision():
    assert _identity(HybridConfig()) == {}
    assert _identity(HybridConfig(idle_read_every=16)) == {}  # switching late reads keeps the plugin state
    cfg = HybridConfig(warmup_steps=11)
    cfg.bandit.dormant_after = 50
    assert _identity(cfg) == {"warmup_steps": 11, "bandit": {"dormant_after": 50}}
    keys = {HybridPredictiveTraining(c).state_key for c in (HybridConfig(), HybridConfig(idle_read_every=4), cfg)}
    assert len(keys) == 2


def test_a_lightning_checkpoint_with_values_still_waiting_resumes_to_the_uninterrupted_run(tmp_path):
    cfg = HybridConfig(warmup_steps=10, predict_threshold=1.0, idle_read_every=8).validate()
    ck = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    cb = HybridPredictiveTraining(cfg, verbose=False)
    with mock.patch("hybrid_lightning.lightning.callback._reads_late", lambda device: True):
        trainer([cb, ck], max_steps=60, strategy="hybrid", enable_checkpointing=True).fit(fresh(StepData))
        saved = torch.load(tmp_path / "step=23.ckpt", weights_only=True)["callbacks"]
        (state,) = [v for k, v in saved.items() if k.startswith("HybridPredictiveTraining")]
        assert len(state["engine"]["late"]) == 5  # steps 18..22 wait to be read (after the read of 10..17)
        torch.manual_seed(123)  # other weights: everything must come from the checkpoint
        resumed = HybridPredictiveTraining(cfg, verbose=False)
        trainer([resumed], max_steps=60, strategy="hybrid").fit(StepData(), ckpt_path=str(tmp_path / "step=23.ckpt"))
    assert _decisions(resumed.engine) == _decisions(cb.engine)
    assert resumed.engine.counters == cb.engine.counters
    # the resumed report has the steps from the checkpoint on, the waiting ones included
    assert [s for s, _, _ in resumed.report.curve] == list(range(18, 60))
