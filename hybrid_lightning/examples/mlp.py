"""Teacher-student regression: a ReLU MLP learns a fixed random tanh MLP from noisy samples."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from hybrid_lightning.examples.common import BatchedTensorDataset, collate_batched, configure_adamw


class TeacherStudentDataModule(L.LightningDataModule):
    """Gaussian inputs ``x`` (``in_dim``), targets ``teacher(x) / std + noise * N(0, 1)`` (``out_dim``).

    The teacher is a seeded random ``in_dim -> teacher_width -> teacher_width -> out_dim`` tanh MLP; its
    outputs are scaled to unit std on the training set, so ``noise`` is relative to the signal. All data
    is generated in ``setup`` from ``seed``; the training order comes from a ``torch.Generator`` seeded with
    ``seed`` (reshuffled each epoch, reproducibly).
    """

    def __init__(
        self,
        in_dim: int = 32,
        out_dim: int = 8,
        teacher_width: int = 64,
        n_train: int = 20_000,
        n_val: int = 2_000,
        noise: float = 0.05,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_dataset: BatchedTensorDataset | None = None
        self.val_dataset: BatchedTensorDataset | None = None

    @torch.no_grad()
    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        hp = self.hparams
        gen = torch.Generator().manual_seed(int(hp.seed))
        dims = [hp.in_dim, hp.teacher_width, hp.teacher_width, hp.out_dim]
        pairs = list(zip(dims[:-1], dims[1:], strict=True))
        weights = [torch.randn(a, b, generator=gen) / a**0.5 for a, b in pairs]
        biases = [0.1 * torch.randn(b, generator=gen) for b in dims[1:]]

        def teacher(x: torch.Tensor) -> torch.Tensor:
            for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
                x = x @ w + b
                if i < len(weights) - 1:
                    x = torch.tanh(x)
            return x

        x_train = torch.randn(hp.n_train, hp.in_dim, generator=gen)
        x_val = torch.randn(hp.n_val, hp.in_dim, generator=gen)
        y_train, y_val = teacher(x_train), teacher(x_val)
        scale = y_train.std()
        y_train = y_train / scale + hp.noise * torch.randn(y_train.shape, generator=gen)
        y_val = y_val / scale + hp.noise * torch.randn(y_val.shape, generator=gen)
        self.train_dataset = BatchedTensorDataset(x_train, y_train)
        self.val_dataset = BatchedTensorDataset(x_val, y_val)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return DataLoader(
            self.train_dataset,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(int(self.hparams.seed)),
            collate_fn=collate_batched,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return DataLoader(
            self.val_dataset, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=collate_batched
        )


class MLPRegressor(L.LightningModule):
    """ReLU MLP with ``depth`` hidden layers of ``width`` units, MSE loss."""

    def __init__(
        self,
        in_dim: int = 32,
        out_dim: int = 8,
        width: int = 512,
        depth: int = 3,
        lr: float = 6e-3,
        weight_decay: float = 0.0,
        warmup_frac: float = 0.05,
        final_lr_frac: float = 0.1,
        total_steps: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        prev = in_dim
        for _ in range(depth):
            layers += [nn.Linear(prev, width), nn.ReLU()]
            prev = width
        layers.append(nn.Linear(prev, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=x.size(0))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("val_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=x.size(0))
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return configure_adamw(self, hp.lr, hp.weight_decay, hp.warmup_frac, hp.final_lr_frac, hp.total_steps)
