"""Faults with a real Trainer: spikes, NaN/Inf, LR blow-up, a predictor that is always wrong, kill mid-Predict,
bad setups; and no leaks across repeated fits."""

from __future__ import annotations

import gc
import logging
import math
import os
import threading

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from hybrid_lightning import (
    HybridConfig,
    HybridPredictiveTraining,
    IncompatibleSetupError,
    NumericalError,
    Phase,
    PredictionDivergence,
    TrainingInstability,
)
from hybrid_lightning.core.dynamics import ConstantVelocity, Rollout
from hybrid_lightning.core.engine import HybridEngine, StepObservation
from lightning_helpers import StepData, TinyRegressor, eager_config, trainer

pytestmark = pytest.mark.filterwarnings(
    "ignore:Be aware that when using `ckpt_path`", "ignore:You're resuming from a checkpoint that ended before")


class Harmful(ConstantVelocity):
    """Always confident, always wrong: every predicted step moves 40 mean updates backwards."""

    def __init__(self, n_layers, rank, coeff=-40.0):
        super().__init__(n_layers, rank)
        self.coeff = coeff

    def rollout(self, intervals):
        r = super().rollout(intervals)
        return Rollout(r.loss_delta, r.loss_var, torch.full_like(r.coeffs, self.coeff))

    def confidence(self):
        return 1.0


class Faulty(StepData):
    """StepData with faults at chosen optimizer steps: ("scale", k) multiplies the loss, ("nan_input", _)
    puts NaN into the inputs, ("inf_loss", _) makes the loss Inf."""

    def __init__(self, faults=None, **kw):
        super().__init__(**kw)
        self.faults = faults or {}

    def _fault(self):
        return self.faults.get(self.trainer.global_step, (None, None))

    def make_batch(self, batch_idx):
        x, y = super().make_batch(batch_idx)
        if self._fault()[0] == "nan_input":
            x = x.clone()
            x[0, 0] = float("nan")
        return x, y

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        kind, value = self._fault()
        if kind == "scale":
            return loss * value
        if kind == "inf_loss":
            return loss * float("inf")
        return loss


class InfGradAt(StepData):
    """The loss stays finite; its gradients become Inf at step ``at``."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step == self.at:
            loss.register_hook(lambda g: g * float("inf"))
        return loss


def all_finite(model, optimizer):
    tensors = [p.detach() for p in model.parameters()]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return all(torch.isfinite(t).all() for t in tensors)


class EventLog(L.Callback):
    """Keeps every event the engine reported (HybridPredictiveTraining logs them; tests want objects)."""

    def __init__(self, cb):
        self.cb, self.events, self.phases = cb, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.phases.append(self.cb.engine.plan().phase)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        report = self.cb.last_report
        if report is not None:
            self.events.extend(report.events)


def fresh(cls=StepData, **kw):
    """A model with the same initial weights every time (seeded before construction)."""
    torch.manual_seed(0)
    return cls(**kw)


def run(model, config=None, steps=150, factory=None, **kw):
    cb = HybridPredictiveTraining(config or eager_config(), verbose=False, dynamics_factory=factory)
    log = EventLog(cb)
    tr = trainer([cb, log], max_steps=steps, strategy="hybrid", **kw)
    tr.fit(model)
    return tr, cb, log


def plain(model, steps=150):
    """Plain Lightning training of ``model``; returns the model."""
    trainer([], max_steps=steps, strategy="auto").fit(model)
    return model


def val_loss(model):
    g = torch.Generator().manual_seed(4242)
    x = torch.randn(2048, 8, generator=g)
    y = torch.tanh(x @ torch.linspace(-1, 1, 16).reshape(8, 2))
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))


# ---------------------------------------------------------------- spikes
@pytest.mark.parametrize("factor", [1e3, 1e6])
def test_spike_on_a_predicted_step_rolls_back_and_forces_full(factor):
    cfg = eager_config(monitor_every=1)
    # find a predicted step in an undisturbed run, then spike exactly there
    _, _, ref = run(fresh(), cfg, steps=100)
    step = next(i for i, p in enumerate(ref.phases) if p is Phase.PREDICT and i > 40)
    model = fresh(Faulty, faults={step: ("scale", factor)})
    tr, cb, log = run(model, cfg, steps=100)
    [err] = [e for e in log.events if isinstance(e, PredictionDivergence) and "spike" in str(e)]
    assert err.recovery.can_continue()
    # rolled back to the pre-Predict snapshot, then Full for at least min_full_steps
    after = log.phases[step + 1:]
    assert after[0] is Phase.CORRECT
    assert all(p is not Phase.PREDICT for p in after[1:1 + cfg.min_full_steps])
    undisturbed = fresh()
    run(undisturbed, cfg, steps=100)
    assert val_loss(model) < 1.10 * val_loss(undisturbed)


def test_spike_on_a_real_step_forces_full_and_training_recovers():
    cfg = eager_config()
    _, _, ref = run(fresh(), cfg, steps=150)
    step = next(i for i, p in enumerate(ref.phases) if p is Phase.FULL and i > 60)
    model = fresh(Faulty, faults={step: ("scale", 1e6)})
    tr, cb, log = run(model, cfg, steps=150)
    assert any(isinstance(e, TrainingInstability) for e in log.events)
    assert cb.engine.horizon_cap < cfg.max_predict_steps
    reference = plain(fresh(Faulty, faults={step: ("scale", 1e6)}), steps=150)  # plain, through the same spike
    # the eager config (Predict every few steps) costs some steps anyway; the spike must not add more harm
    assert val_loss(model) < 1.10 * val_loss(reference)
    after = log.phases[step + 1: step + 1 + cfg.min_full_steps]
    assert all(p is Phase.FULL for p in after)


# ---------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("kind", ["nan_input", "inf_loss"])
def test_nonfinite_real_step_is_skipped_and_nothing_nonfinite_lands(kind, caplog):
    model = fresh(Faulty, faults={30: (kind, None), 31: (kind, None)})
    with caplog.at_level(logging.WARNING, logger="hybrid_lightning"):
        tr, cb, log = run(model, steps=80)
    assert all_finite(model, tr.optimizers[0])
    assert cb.engine.counters["skipped_steps"] == 2
    assert sum(isinstance(e, NumericalError) for e in log.events) >= 2
    assert "non-finite gradients" in caplog.text
    assert tr.global_step == 80


def test_nonfinite_can_be_configured_to_stop_with_a_clear_error():
    cfg = eager_config(on_nonfinite="raise")
    model = fresh(Faulty, faults={30: ("nan_input", None)})
    with pytest.raises(NumericalError, match="on_nonfinite='raise'"):
        run(model, cfg, steps=80)


def test_inf_gradients_on_an_unchecked_step_stop_the_run_at_the_next_skip_instead_of_skipping_forever():
    cfg = HybridConfig(warmup_steps=10, predict_threshold=1.0).validate()
    probe, unchecked = HybridEngine(list(torch.nn.Linear(4, 2).parameters()), cfg), []
    for s in range(60):
        plan = probe.plan()
        if not plan.measure_grad_norm:
            unchecked.append(s)
        probe.observe(StepObservation(loss=1.0, grad_norm=1.0 if plan.measure_grad_norm else None))
    at = next(s for s in unchecked if s > 20)
    with pytest.raises(NumericalError, match=f"non-finite at step {at + 1}"):
        run(fresh(InfGradAt, at=at), cfg, steps=60)


class StopInsidePredict(L.Callback):
    """Stops training (as early stopping or a time limit would) after the second step of the first Predict
    phase; remembers the weights when that phase started."""

    def __init__(self, cb):
        self.cb, self.start_weights, self.stopped_at = cb, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ps = self.cb.engine.phase_state
        if self.stopped_at is None and ps.phase is Phase.PREDICT and ps.steps_in_phase == 2 < ps.horizon:
            self.start_weights = self.cb.engine.trajectory._snapshot.clone()
            self.stopped_at = trainer.global_step
            trainer.should_stop = True


@pytest.mark.parametrize("harmful", [True, False])
def test_training_that_stops_inside_a_predict_phase_judges_it_and_never_ends_on_unchecked_weights(harmful):
    cfg = eager_config()
    cfg.bandit.arms = [0, 6]  # phases of 6 steps: the stop lands inside one
    cb = HybridPredictiveTraining(cfg.validate(), verbose=False,
                                  dynamics_factory=(lambda n, k: Harmful(n, k)) if harmful else None)
    stop = StopInsidePredict(cb)
    model = fresh()
    trainer([cb, stop], max_steps=150, strategy="hybrid").fit(model)
    assert stop.stopped_at is not None and cb.engine.phase is not Phase.PREDICT
    last = cb.results[-1]
    assert last.steps == 2 and last.reason == "probe"  # judged on the last batch, as at a phase's end
    assert cb.report.predict_phases == len(cb.results) and math.isfinite(cb.report.mean_value)
    if harmful:  # always wrong: rolled back to the weights the phase started from, bit for bit
        assert not last.kept
        assert torch.equal(cb.engine.trajectory._flatten(), stop.start_weights)


def test_delta_that_would_create_nan_is_refused():
    tr, cb, log = run(fresh(), steps=80, factory=lambda n, k: Harmful(n, k, coeff=float("nan")))
    assert all_finite(tr.lightning_module, tr.optimizers[0])
    assert any(isinstance(e, NumericalError) and "refused" in str(e) for e in log.events)
    assert cb.report.steps["PREDICT"] == 0 and cb.engine.counters["rollbacks"] > 0


# ---------------------------------------------------------------- LR blow-up
class BlowUp(StepData):
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        # misconfigured schedule: the LR jumps 100x at step 90
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 90 else 100.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_lr_blow_up_is_detected_and_the_horizon_shrinks():
    cfg = eager_config()
    tr, cb, log = run(fresh(BlowUp), cfg, steps=200)
    late = [r for r in cb.results if r.start_step >= 90]
    assert sum(isinstance(e, TrainingInstability) for e in log.events) >= 3
    shortest = min(a for a in cb.engine.bandit.arms if a > 0)
    assert cb.engine.horizon_cap <= 2 * shortest
    # after the blow-up, no phase longer than the shortest horizon survives the guard
    assert not [r for r in late if r.kept and r.horizon > shortest]
    assert all_finite(tr.lightning_module, tr.optimizers[0])


# ---------------------------------------------------------------- always-wrong predictor
class Dropping(StepData):
    """Plain training that loses the given steps' updates, as a rolled-back Predict phase does."""

    lost: frozenset[int] = frozenset()

    def training_step(self, batch, batch_idx):
        if self.global_step in self.lost:
            return None  # Lightning then skips backward and the update; the step still counts
        return super().training_step(batch, batch_idx)


def assert_plain_training_minus_the_rolled_back_steps(model, cb, monkeypatch):
    """Nothing else differs: ``model`` is plain training that lost those steps, to the bit."""
    lost = frozenset(r.start_step + i for r in cb.results if not r.kept for i in range(r.steps))
    monkeypatch.setattr(Dropping, "lost", lost)
    same = plain(fresh(Dropping), steps=1500)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    return lost


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
def test_always_wrong_predictor_costs_only_the_steps_it_rolled_back(monkeypatch):
    # the overhead budget's clock moves where a dormant engine wakes (a third phase at 1473-1481, or none):
    # with it fixed, the run is the same every time; the next test pins such a late phase
    monkeypatch.setattr(HybridEngine, "_steps_owed", lambda self: 0)
    model = fresh()
    tr, cb, log = run(model, HybridConfig(), steps=1500, factory=Harmful)  # default settings
    assert cb.engine.counters["kept"] == 0 and cb.engine.counters["rollbacks"] > 0
    lost = assert_plain_training_minus_the_rolled_back_steps(model, cb, monkeypatch)
    assert len(lost) == cb.report.steps["PREDICT"] <= 8  # it backs off: at most 0.5% of the run
    # What lost steps cost depends on where they fall, not on the plugin: these 4 at 120-224 cost 0.8% of final
    # val; 2 more at 1479-1480 (the budget's clock can put a phase there) cost another 1.7%, as plain training
    # that drops them shows: this model's final iterate is that sensitive. So the bound is loose; the equality
    # above is the test.
    assert val_loss(model) <= 1.05 * val_loss(plain(fresh(), steps=1500))


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
def test_a_late_harmful_phase_that_one_batch_would_keep_is_confirmed_and_rolled_back(monkeypatch):
    # the budget's clock decides when a dormant engine wakes; fixing it puts the last phase at step 1479, where
    # the always-wrong move lowers that batch's loss by chance (0.003379 -> 0.003319). Kept, it cost 15% of val.
    monkeypatch.setattr(HybridEngine, "_steps_owed", lambda self: max(0, 1360 - self.step) if self.step > 1000 else 0)
    model = fresh()
    tr, cb, log = run(model, HybridConfig(), steps=1500, factory=Harmful)
    last = cb.results[-1]
    assert (last.start_step, last.kept, last.reason) == (1479, False, "confirm")
    assert last.loss_after < last.loss_before  # the phase's own batch would have kept it
    assert cb.engine.counters["kept"] == 0 and cb.engine.counters["confirm_rollbacks"] == 1
    assert_plain_training_minus_the_rolled_back_steps(model, cb, monkeypatch)


# ---------------------------------------------------------------- killed mid-Predict
def test_checkpoint_written_mid_predict_restores_the_snapshot(tmp_path):
    """With an always-wrong predictor every phase is rolled back; resume from a checkpoint taken mid-phase
    and the rollback after resume restores exactly the parameters from before the phase."""
    cfg = eager_config()
    cfg.bandit.arms = [0, 3, 6]  # every phase at least 3 steps: a checkpoint can fall inside one
    torch.manual_seed(0)
    cb = HybridPredictiveTraining(cfg, verbose=False, dynamics_factory=Harmful)
    log = EventLog(cb)
    starts = {}

    class AtPhaseStart(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            e = cb.engine
            if e.phase is Phase.PREDICT and e.phase_state.steps_in_phase == 0:
                starts[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    ck = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer([cb, AtPhaseStart(), log, ck], max_steps=60, strategy="hybrid", enable_checkpointing=True).fit(StepData())
    start = min(s for s in starts if log.phases[s + 1] is Phase.PREDICT)  # a phase of at least 2 steps
    torch.manual_seed(1)
    model = StepData()
    cb2 = HybridPredictiveTraining(cfg, verbose=False, dynamics_factory=Harmful)
    seen = {}

    class AfterPhase(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if "params" not in seen and cb2.engine.phase is Phase.CORRECT:
                seen["params"] = [p.detach().clone() for p in pl_module.parameters()]

    ckpt = tmp_path / f"step={start + 1}.ckpt"
    trainer([cb2, AfterPhase()], max_steps=60, strategy="hybrid").fit(model, ckpt_path=str(ckpt))
    assert all(torch.equal(a, b) for a, b in zip(seen["params"], starts[start]))


# ---------------------------------------------------------------- bad setups: one clear error, before any step
@pytest.mark.parametrize("make_trainer, needle", [
    (lambda cbs: trainer(cbs, strategy="auto"), "strategy='hybrid'"),
    (lambda cbs: trainer(cbs, strategy=DDPStrategy(process_group_backend="gloo")), "strategy='hybrid'"),
])
def test_incompatible_strategy_fails_before_any_step(make_trainer, needle):
    model = TinyRegressor()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(IncompatibleSetupError, match=needle) as info:
        make_trainer([HybridPredictiveTraining(eager_config(), verbose=False)]).fit(model)
    assert "FSDP" in str(info.value)
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


# ---------------------------------------------------------------- leaks
def _fds():
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def test_no_file_handle_thread_or_process_leak_across_fits():
    import multiprocessing

    cb = HybridPredictiveTraining(eager_config(), verbose=False)
    counts = []
    for _ in range(4):
        trainer([cb], max_steps=40, strategy="hybrid").fit(TinyRegressor())
        gc.collect()
        counts.append((_fds(), threading.active_count(), len(multiprocessing.active_children())))
    assert counts[-1] == counts[1], counts
