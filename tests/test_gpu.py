"""The plugin on a CUDA device: every phase, mixed precision, exact rollback, resume. Skipped without a GPU.

Run on a GPU machine with ``pytest -q tests/test_gpu.py``.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from hybrid_lightning import HybridPredictiveTraining
from lightning_helpers import StepData, TinyRegressor, eager_config, nowcast_config, trainer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


class StepDataOnDevice(StepData):
    def make_batch(self, batch_idx):
        return tuple(t.to(self.device) for t in super().make_batch(batch_idx))


def _states_finite(model, trainer_):
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for opt in trainer_.optimizers:
        for st in opt.state.values():
            assert all(torch.isfinite(v).all() for v in st.values() if torch.is_tensor(v))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_all_phases_on_cuda(precision):
    cb = HybridPredictiveTraining(eager_config(), verbose=False)
    model = TinyRegressor()
    tr = trainer([cb], max_steps=120, accelerator="cuda", devices=1, strategy="hybrid", precision=precision)
    tr.fit(model)
    steps = cb.report.steps
    assert tr.global_step == 120 and steps["PREDICT"] > 0 and steps["CORRECT"] > 0
    assert cb.engine.counters["phases"] > 0
    _states_finite(model, tr)


def test_rollback_and_resume_mid_predict_are_exact_on_cuda(tmp_path):
    """Rolled-back phases restore the snapshot bit for bit; resuming inside a Predict phase reproduces the
    uninterrupted run exactly (snapshot, dynamics and optimizer state on the GPU included)."""

    class Record(L.Callback):
        def __init__(self, cb):
            self.cb, self.phases, self.exact = cb, [], []

        def on_train_start(self, trainer_, pl_module):
            traj = self.cb.engine.trajectory
            original = traj.rollback

            def rollback():
                saved = traj._snapshot.clone()
                original()
                self.exact.append(torch.equal(traj._flatten(), saved))

            traj.rollback = rollback

        def on_train_batch_start(self, trainer_, pl_module, batch, batch_idx):
            self.phases.append(self.cb.engine.plan().phase.name)

    steps = 90
    torch.manual_seed(0)
    model = StepDataOnDevice()
    cb = HybridPredictiveTraining(eager_config(), verbose=False)
    rec = Record(cb)
    ck = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer([cb, rec, ck], max_steps=steps, accelerator="cuda", devices=1, strategy="hybrid",
            enable_checkpointing=True).fit(model)
    assert rec.exact and all(rec.exact)
    final = [p.detach().clone() for p in model.parameters()]
    k = next(k for k in range(1, steps) if rec.phases[k] == "PREDICT" and rec.phases[k - 1] == "PREDICT")

    torch.manual_seed(123)
    resumed = StepDataOnDevice()
    cb2 = HybridPredictiveTraining(eager_config(), verbose=False)
    trainer([cb2], max_steps=steps, accelerator="cuda", devices=1, strategy="hybrid").fit(
        resumed, ckpt_path=str(tmp_path / f"step={k}.ckpt"))
    for a, b in zip(resumed.parameters(), final):
        assert torch.equal(a.detach(), b)


def test_a_run_that_never_predicts_is_identical_to_plain_training_on_cuda(monkeypatch):
    """With deterministic kernels, the plugin in monitor-only mode changes nothing a training step computes.
    Needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before CUDA starts (set by the command)."""
    import os

    from hybrid_lightning import HybridConfig

    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") is None:
        pytest.skip("set CUBLAS_WORKSPACE_CONFIG=:4096:8 for deterministic cuBLAS")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    torch.use_deterministic_algorithms(True)
    try:
        finals = []
        for hybrid in (False, True):
            L.seed_everything(0, verbose=False)
            model = TinyRegressor(batchnorm=True)  # (the CNN example's adaptive pooling has no deterministic backward)
            cbs = [HybridPredictiveTraining(HybridConfig(), verbose=False)] if hybrid else []
            trainer(cbs, max_steps=200, accelerator="cuda", devices=1,
                    strategy="hybrid" if hybrid else "auto").fit(model)
            finals.append([p.detach().clone() for p in model.parameters()])
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*finals):
        assert torch.equal(a, b)


def test_nowcast_predictor_jumps_on_cuda():
    """The shipped nowcaster runs where the parameters live; its jumps and the optimizer reset stay finite."""
    cfg = nowcast_config()
    cb = HybridPredictiveTraining(cfg, verbose=False)
    model = TinyRegressor()
    tr = trainer([cb], max_steps=400, accelerator="cuda", devices=1, strategy="hybrid")
    tr.fit(model)
    assert cb.report.steps["PREDICT"] >= 32 and cb.engine.counters["phases"] >= 1
    _states_finite(model, tr)


def test_line_search_trials_are_undone_exactly_on_cuda():
    """Each trial step of the line search is undone bit for bit on the GPU; phases are kept, rolled back or
    refused, and nothing non-finite reaches the weights or the optimizer state."""

    class Record(L.Callback):
        def __init__(self, cb):
            self.cb, self.exact = cb, []

        def on_train_start(self, trainer_, pl_module):
            traj = self.cb.engine.trajectory
            original = traj.restore_snapshot

            def restore_snapshot():
                original()
                self.exact.append(torch.equal(traj._flatten(), traj._snapshot))

            traj.restore_snapshot = restore_snapshot

    cfg = eager_config()
    cfg.predictor, cfg.line_search = "tail_average", [0.5, 1.0, 2.0]
    cb = HybridPredictiveTraining(cfg.validate(), verbose=False)
    rec = Record(cb)
    model = StepDataOnDevice()
    tr = trainer([cb, rec], max_steps=150, accelerator="cuda", devices=1, strategy="hybrid")
    tr.fit(model)
    c = cb.engine.counters
    assert rec.exact and all(rec.exact)
    assert c["phases"] > 0 and c["phases"] - (c["kept"] + c["rollbacks"] + c["refused"]) in (0, 1)  # 1: still open
    _states_finite(model, tr)


def test_monitoring_on_cuda_reads_losses_late_and_a_nonfinite_one_stops_the_run():
    """Only monitoring on a GPU, the callback hands the engine device tensors and the engine reads them
    idle_read_every at a time: the report still has every step's loss, and a NaN stops the run clearly."""
    from hybrid_lightning import HybridConfig, NumericalError
    from hybrid_lightning.core.engine import HybridEngine

    cfg = HybridConfig(warmup_steps=10, predict_threshold=1.0, idle_read_every=8).validate()
    unread = []
    original = HybridEngine.observe

    def spy(self, obs, probe=None):
        unread.append(torch.is_tensor(obs.loss))
        return original(self, obs, probe)

    cb = HybridPredictiveTraining(cfg, verbose=False)
    torch.manual_seed(0)
    model = StepDataOnDevice()
    HybridEngine.observe = spy
    try:
        trainer([cb], max_steps=60, accelerator="cuda", devices=1, strategy="hybrid").fit(model)
    finally:
        HybridEngine.observe = original
    assert sum(unread) == 50 and [s for s, _, _ in cb.report.curve] == list(range(60))

    # with a GradScaler (fp16) the scaler reads its overflow flag every step: the plugin reads at once too
    unread.clear()
    HybridEngine.observe = spy
    try:
        trainer([HybridPredictiveTraining(cfg, verbose=False)], max_steps=30, accelerator="cuda", devices=1,
                strategy="hybrid", precision="16-mixed").fit(StepDataOnDevice())
    finally:
        HybridEngine.observe = original
    assert len(unread) == 30 and not any(unread)

    class NaNAt30(StepDataOnDevice):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.trainer.global_step == 30 else loss

    with pytest.raises(NumericalError, match="step 30"):
        trainer([HybridPredictiveTraining(cfg, verbose=False)], max_steps=60, accelerator="cuda", devices=1,
                strategy="hybrid").fit(NaNAt30())
