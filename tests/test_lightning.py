from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from hybrid_lightning import (
    ConfigError,
    HybridConfig,
    HybridPredictiveTraining,
    HybridSingleDeviceStrategy,
    IncompatibleSetupError,
    Phase,
)
from lightning_helpers import TinyRegressor, eager_config, nowcast_config, trainer


class Spy(Callback):
    """Records, per batch, the plan, backward hooks, optimizer.step calls, and exact delta application."""

    def __init__(self):
        self.rows = []
        self.backward_calls = 0
        self.opt_calls = 0
        self.apply_checks = []

    def on_fit_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        original = opt.step

        def counting_step(*a, **k):
            self.opt_calls += 1
            return original(*a, **k)

        opt.step = counting_step
        strategy = trainer.strategy
        real_apply = strategy.hybrid_apply

        def checking_apply(plan):
            params = list(pl_module.parameters())
            before = [p.detach().clone() for p in params]
            unchanged = all(torch.equal(b, s) for b, s in zip(before, self._batch_start))
            real_apply(plan)
            exact = all(torch.equal(p.detach(), b + d) for p, b, d in zip(params, before, plan.delta))
            self.apply_checks.append((unchanged, exact))

        strategy.hybrid_apply = checking_apply

    def on_before_backward(self, trainer, pl_module, loss):
        self.backward_calls += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_start = [p.detach().clone() for p in pl_module.parameters()]
        self._opt_before = self.opt_calls
        self._bwd_before = self.backward_calls

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        plan = trainer.strategy.hybrid_plan  # cleared by the hybrid callback once the step is observed
        cb = next(c for c in trainer.callbacks if isinstance(c, HybridPredictiveTraining))
        phase = cb.engine._plan.phase if cb.engine._plan is not None else None
        self.rows.append({"step": trainer.global_step, "batch_idx": batch_idx,
                          "backward": self.backward_calls - self._bwd_before,
                          "opt": self.opt_calls - self._opt_before, "plan_open": plan is not None,
                          "phase": phase, "loss": outputs["loss"].detach().clone()})


def fit(config=None, max_steps=120, model=None, extra=(), **kw):
    torch.manual_seed(0)  # the model's init: runs must not depend on which tests ran before
    cb = HybridPredictiveTraining(config or eager_config(), verbose=False)
    spy = Spy()
    model = model or TinyRegressor()
    tr = trainer([cb, spy, *extra], max_steps=max_steps, strategy="hybrid", **kw)
    tr.fit(model)
    return tr, cb, spy, model


def test_all_four_phases_and_predicted_steps_skip_backward_and_optimizer():
    tr, cb, spy, _ = fit()
    steps = cb.report.steps
    assert all(steps[p.name] > 0 for p in Phase), steps
    assert sum(steps.values()) == tr.global_step == 120
    # per optimizer step: backward and optimizer.step exactly once on real steps, never on predicted ones
    assert spy.opt_calls == steps["WARMUP"] + steps["FULL"] + steps["CORRECT"]
    assert spy.backward_calls == spy.opt_calls
    assert len(spy.apply_checks) == steps["PREDICT"]
    assert all(unchanged and exact for unchanged, exact in spy.apply_checks)
    assert cb.report.backward_skipped == steps["PREDICT"] and cb.report.backward_passes == spy.opt_calls


@pytest.mark.parametrize("max_steps", [57, 64, 71])
def test_a_fit_never_ends_inside_an_unjudged_predict_phase(max_steps):
    tr, cb, spy, _ = fit(max_steps=max_steps)
    assert cb.engine.step_limit == max_steps
    assert sum(r.steps for r in cb.results) == cb.report.steps["PREDICT"] > 0
    assert cb.engine.phase is not Phase.PREDICT


class UnsizedData(TinyRegressor):
    """A stream without a length: Lightning cannot know how many steps an epoch has."""

    def train_dataloader(self):
        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self):
                g = torch.Generator().manual_seed(0)
                for _ in range(80):
                    x = torch.randn(32, 8, generator=g)
                    yield x, torch.tanh(x[:, :2])

        return torch.utils.data.DataLoader(Stream(), batch_size=None)


def test_epoch_based_fits_get_a_step_limit_and_unsized_ones_none():
    tr, cb, _, _ = fit(max_steps=-1, max_epochs=2)
    assert cb.engine.step_limit == tr.global_step == tr.estimated_stepping_batches
    assert sum(r.steps for r in cb.results) == cb.report.steps["PREDICT"] > 0
    # unsized data: estimated_stepping_batches is max_steps (-1); no limit, and prediction still runs
    tr, cb, _, _ = fit(model=UnsizedData(), max_steps=-1, max_epochs=1)
    assert tr.global_step == 80 and cb.engine.step_limit is None and cb.report.steps["PREDICT"] > 0


def test_global_step_and_scheduler_advance_on_every_step():
    tr, cb, spy, model = fit(max_steps=90)
    sched = tr.lr_scheduler_configs[0].scheduler
    assert tr.global_step == 90 and sched.last_epoch == 90
    assert cb.report.steps["PREDICT"] > 0
    assert tr.optimizers[0].param_groups[0]["lr"] == pytest.approx(3e-3 / (1 + 0.001 * 90))


def test_gradient_accumulation_keeps_windows_whole_and_clipping_works():
    tr, cb, spy, _ = fit(max_steps=80, accumulate_grad_batches=2, gradient_clip_val=0.5)
    assert tr.global_step == 80 and cb.report.steps["PREDICT"] > 0
    rows = spy.rows
    # within a window (2 batches), the plan stays open after the first batch and the phase is the same
    for first, second in zip(rows[0::2], rows[1::2]):
        assert first["plan_open"] and not second["plan_open"]
    assert spy.opt_calls == sum(cb.report.steps[p] for p in ("WARMUP", "FULL", "CORRECT"))
    assert spy.backward_calls == 2 * spy.opt_calls  # one backward per micro-batch on real steps only
    # the engine observes each real step's loss: the sum of its micro-batches' (normalized) losses
    observed = {step: loss for step, loss, _ in cb._curve.points}
    real = [(first["step"], float(first["loss"] + second["loss"])) for first, second in zip(rows[0::2], rows[1::2])
            if first["phase"] is not Phase.PREDICT]
    assert len(real) == spy.opt_calls
    assert all(observed[step] == pytest.approx(loss, rel=1e-6) for step, loss in real)


def test_bf16_mixed_precision():
    tr, cb, spy, model = fit(max_steps=80, precision="bf16-mixed")
    assert cb.report.steps["PREDICT"] > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_mixed_with_grad_scaler_on_predicted_steps():
    plugin = MixedPrecision("16-mixed", "cpu")
    assert plugin.scaler is not None
    tr, cb, spy, model = fit(max_steps=80, plugins=[plugin])
    assert cb.report.steps["PREDICT"] > 0 and tr.global_step == 80
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_monitoring_forward_on_predicted_steps():
    cfg = eager_config(monitor_every=1)
    tr, cb, spy, _ = fit(cfg, max_steps=80)
    assert cb.engine.counters["monitor_forwards"] == cb.report.steps["PREDICT"] > 0


def test_plain_strategy_raises_the_documented_error():
    cb = HybridPredictiveTraining(eager_config(), verbose=False)
    tr = trainer([cb], strategy="auto")
    with pytest.raises(IncompatibleSetupError, match="strategy='hybrid'"):
        tr.fit(TinyRegressor())


def test_manual_optimization_and_multiple_optimizers_are_refused():
    class Manual(TinyRegressor):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    cb = HybridPredictiveTraining(eager_config(), verbose=False)
    with pytest.raises(IncompatibleSetupError, match="manual optimization"):
        trainer([cb], strategy="hybrid").fit(Manual())

    class TwoOpts(TinyRegressor):
        def configure_optimizers(self):
            first, last = self.net[0].parameters(), self.net[2].parameters()
            return [torch.optim.SGD(first, lr=0.1), torch.optim.SGD(last, lr=0.1)]

        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)

    cb = HybridPredictiveTraining(eager_config(), verbose=False)
    with pytest.raises(Exception, match="optimizer"):
        trainer([cb], strategy="hybrid").fit(TwoOpts())


def test_strategy_registry_names_and_device():
    tr = trainer([], strategy="hybrid")
    assert isinstance(tr.strategy, HybridSingleDeviceStrategy)
    assert tr.strategy.root_device == torch.device("cpu")
    with pytest.raises(IncompatibleSetupError, match="hybrid_ddp"):
        _ = L.Trainer(strategy="hybrid", accelerator="cpu", devices=2, logger=False).strategy.root_device


def test_callback_accepts_yaml_path_and_writes_report(tmp_path):
    path = tmp_path / "hybrid.yaml"
    eager_config().save_yaml(path)
    cb = HybridPredictiveTraining(str(path), report_dir=str(tmp_path / "out"), verbose=True)
    assert cb.config == eager_config()
    tr = trainer([cb], max_steps=60, strategy="hybrid")
    tr.fit(TinyRegressor())
    data = json.loads((tmp_path / "out" / "hybrid_report.json").read_text())
    assert data["total_steps"] == 60 and data["steps"]["PREDICT"] == cb.report.steps["PREDICT"]
    assert data["backward_passes"] + data["backward_skipped"] == 60
    assert data["cost_ratio"] is None or 0 < data["cost_ratio"]
    assert 0 <= data["observe_share"] < 1 and data["budget_extensions"] == cb.engine.counters["budget_extensions"]


def test_metrics_reach_the_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    cb = HybridPredictiveTraining(eager_config(), verbose=False)
    tr = trainer([cb], max_steps=60, strategy="hybrid", logger=CSVLogger(tmp_path), log_every_n_steps=1)
    tr.fit(TinyRegressor())
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    for key in ("hybrid/phase", "hybrid/confidence", "hybrid/backward_skip_ratio", "hybrid/rollbacks",
                "hybrid/residual", "hybrid/horizon", "hybrid/actual_loss", "hybrid/dormant", "hybrid/observe_share"):
        assert key in header, key


def test_default_config_never_predicts_when_threshold_is_one():
    tr, cb, spy, _ = fit(HybridConfig(warmup_steps=5, min_full_steps=5, predict_threshold=1.0), max_steps=60)
    assert cb.report.steps["PREDICT"] == 0 and spy.opt_calls == 60


@pytest.mark.parametrize("mode", ["zero_momentum", "reset"])
def test_after_jump_adjusts_the_optimizer_state_after_kept_phases_only(mode):
    seen = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            hybrid = next(c for c in trainer.callbacks if isinstance(c, HybridPredictiveTraining))
            res = hybrid.last_report.phase_result if hybrid.last_report is not None else None
            if res is not None:
                states = list(trainer.optimizers[0].state.values())
                seen.append((res.kept, [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                                        for s in states]))

    cfg = eager_config(after_jump=mode)
    cfg.divergence.rollback_tolerance = 10.0  # keep every phase whose probe is finite
    fit(cfg, extra=[Watch()])
    kept = [states for k, states in seen if k]
    assert kept, "no phase was kept"
    for states in kept:
        if mode == "reset":
            assert all(len(s) == 0 for s in states)
        else:
            assert all(float(s["exp_avg"].abs().sum()) == 0.0 and float(s["exp_avg_sq"].abs().sum()) > 0
                       for s in states)


def test_after_jump_rejects_unknown_modes():
    with pytest.raises(ConfigError, match="after_jump"):
        HybridConfig(after_jump="rescale").validate()


def test_nowcast_predictor_in_a_lightning_run():
    cfg = nowcast_config()
    tr, cb, spy, model = fit(cfg, max_steps=400)
    assert cb.report.steps["PREDICT"] >= 32 and cb.engine.counters["phases"] >= 1
    assert spy.backward_calls == tr.global_step - cb.report.steps["PREDICT"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
