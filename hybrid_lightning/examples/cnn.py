"""Synthetic image classification: noisy, randomly shifted copies of smooth random prototype images."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from hybrid_lightning.examples.common import BatchedTensorDataset, collate_batched, configure_adamw


class SyntheticImagesDataModule(L.LightningDataModule):
    """``n_classes`` smooth random prototypes (1 x ``size`` x ``size``, zero mean, unit std); a sample is its
    class prototype rolled by up to ``max_shift`` pixels per axis plus ``noise * N(0, 1)``.

    Batches are ``(images float32 (B, 1, size, size), labels int64 (B,))``. Everything is generated once
    in ``setup`` from ``seed``; the training order comes from a ``torch.Generator`` seeded with ``seed``.
    """

    def __init__(
        self,
        n_classes: int = 10,
        size: int = 16,
        n_train: int = 20_000,
        n_val: int = 2_000,
        noise: float = 2.5,
        max_shift: int = 4,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.prototypes: torch.Tensor | None = None
        self.train_dataset: BatchedTensorDataset | None = None
        self.val_dataset: BatchedTensorDataset | None = None

    def _samples(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        hp = self.hparams
        labels = torch.randint(0, hp.n_classes, (n,), generator=gen)
        shifts = torch.randint(-hp.max_shift, hp.max_shift + 1, (n, 2), generator=gen)
        images = self.prototypes[labels].clone()
        for dy in range(-hp.max_shift, hp.max_shift + 1):
            for dx in range(-hp.max_shift, hp.max_shift + 1):
                mask = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
                if mask.any():
                    images[mask] = torch.roll(images[mask], shifts=(dy, dx), dims=(-2, -1))
        images += hp.noise * torch.randn(images.shape, generator=gen)
        return images, labels

    @torch.no_grad()
    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        hp = self.hparams
        gen = torch.Generator().manual_seed(int(hp.seed))
        coarse = torch.randn(hp.n_classes, 1, max(2, hp.size // 4), max(2, hp.size // 4), generator=gen)
        protos = F.interpolate(coarse, size=(hp.size, hp.size), mode="bicubic", align_corners=False)
        protos = protos - protos.mean(dim=(-2, -1), keepdim=True)
        self.prototypes = protos / protos.std(dim=(-2, -1), keepdim=True)
        self.train_dataset = BatchedTensorDataset(*self._samples(hp.n_train, gen))
        self.val_dataset = BatchedTensorDataset(*self._samples(hp.n_val, gen))

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


class SmallCNN(L.LightningModule):
    """(conv3x3-ReLU-maxpool2) x len(channels), adaptive avg-pool to 4x4, then a ``hidden``-unit MLP head.

    Input: 1-channel images of side >= 2**len(channels); with the defaults the model has 151,306 parameters
    (the head dominates and does not depend on the image size).
    """

    def __init__(
        self,
        n_classes: int = 10,
        channels: tuple[int, ...] = (32, 64),
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        warmup_frac: float = 0.05,
        final_lr_frac: float = 0.1,
        total_steps: int = 0,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        prev = 1
        for ch in channels:
            layers += [nn.Conv2d(prev, ch, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            prev = ch
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(prev * 16, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
        self.val_acc = MulticlassAccuracy(num_classes=n_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=x.size(0))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.val_acc(logits, y)
        self.log("val_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=x.size(0))
        self.log("val_acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=x.size(0))
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return configure_adamw(self, hp.lr, hp.weight_decay, hp.warmup_frac, hp.final_lr_frac, hp.total_steps)
