"""Small, fast LightningModules and data for the integration tests."""

from __future__ import annotations

import tempfile

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hybrid_lightning import HybridConfig


def data(n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 2, generator=g)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(n, 2, generator=g)
    return TensorDataset(x, y)


class TinyRegressor(L.LightningModule):
    def __init__(self, lr: float = 3e-3, batchnorm: bool = False, scheduler: bool = True, n: int = 2048):
        super().__init__()
        self.save_hyperparameters()
        layers = [nn.Linear(8, 32)] + ([nn.BatchNorm1d(32)] if batchnorm else []) + [nn.Tanh(), nn.Linear(32, 2)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        if not self.hparams.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.001 * s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(data(self.hparams.n), batch_size=32, shuffle=True, generator=g)

    def val_dataloader(self):
        return DataLoader(data(256, seed=1), batch_size=128)


def eager_config(**kw) -> HybridConfig:
    """Predicts early and often: for tests that need every phase."""
    cfg = HybridConfig(warmup_steps=10, min_full_steps=6, max_predict_steps=6, predict_threshold=0.0,
                       predictor="constant_velocity", **kw)
    cfg.trajectory.stride = 2
    cfg.bandit.cooldown_steps = 10
    cfg.bandit.alpha = 5.0  # keep exploring: tests want Predict phases throughout
    return cfg.validate()


def nowcast_config() -> HybridConfig:
    """The shipped nowcaster, forced to jump 32 steps as soon as its 5 snapshots are in (every 136 real steps)."""
    cfg = eager_config(after_jump="zero_momentum")
    cfg.predictor = "nowcast"
    cfg.trajectory.stride = 8
    cfg.min_full_steps = 136
    cfg.max_predict_steps = 32
    cfg.bandit.arms = [0, 32]
    cfg.bandit.cooldown_steps = 0
    return cfg.validate()


def trainer(callbacks, max_steps=120, **kw):
    defaults = dict(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                    default_root_dir=tempfile.mkdtemp(prefix="hybrid-test-"),
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                    num_sanity_val_steps=0)
    defaults.update(kw)
    return L.Trainer(callbacks=callbacks, **defaults)


class StepData(TinyRegressor):
    """Each batch is a pure function of (epoch, batch_idx): resuming mid-epoch sees exactly the same data,
    whatever the loader does. The loader only supplies indices."""

    def train_dataloader(self):
        return DataLoader(range(64), batch_size=None)

    def make_batch(self, batch_idx):
        g = torch.Generator().manual_seed(10_000 * self.current_epoch + batch_idx)
        x = torch.randn(32, 8, generator=g)
        y = torch.tanh(x @ torch.linspace(-1, 1, 16).reshape(8, 2)) + 0.05 * torch.randn(32, 2, generator=g)
        return x, y

    def training_step(self, batch, batch_idx):
        x, y = self.make_batch(batch_idx)
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss
