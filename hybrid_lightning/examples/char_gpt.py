"""Byte-level nanoGPT-style language model trained on the CPython standard library's own source."""

from __future__ import annotations

import functools
import math
import os
import sysconfig
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hybrid_lightning.examples.common import collate_batched, configure_adamw

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}


@functools.lru_cache(maxsize=4)
def _read_stdlib_corpus(stdlib_dir: str, max_bytes: int) -> bytes:
    """Concatenated bytes of the stdlib ``.py`` files (sorted relative paths), truncated to ``max_bytes``."""
    paths: list[str] = []
    for root, dirs, files in os.walk(stdlib_dir):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        paths.extend(os.path.join(root, f) for f in files if f.endswith(".py"))
    paths.sort(key=lambda p: os.path.relpath(p, stdlib_dir))
    chunks: list[bytes] = []
    size = 0
    for path in paths:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def load_stdlib_bytes(max_bytes: int = 6_000_000) -> torch.Tensor:
    """The corpus as a 1-D ``uint8`` tensor."""
    raw = _read_stdlib_corpus(sysconfig.get_paths()["stdlib"], int(max_bytes))
    if not raw:
        raise RuntimeError("found no .py files under the stdlib directory")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


class ByteWindowDataset(Dataset):
    """Item ``i`` is ``(x, y)`` with ``x = data[s:s+block]``, ``y = data[s+1:s+block+1]``, ``s = starts[i]``.

    Both are ``int64`` of shape ``(block_size,)``; ``__getitems__`` fetches a whole batch at once.
    """

    def __init__(self, data: torch.Tensor, starts: torch.Tensor, block_size: int) -> None:
        if data.numel() < block_size + 1:
            raise ValueError(f"need at least block_size + 1 = {block_size + 1} bytes, got {data.numel()}")
        self.data = data
        self.starts = starts.to(torch.long)
        self.block_size = block_size
        self._offsets = torch.arange(block_size + 1)

    def __len__(self) -> int:
        return self.starts.numel()

    def _windows(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.data[starts.unsqueeze(-1) + self._offsets].long()
        return chunk[..., :-1], chunk[..., 1:]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(self.starts[index])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(self.starts[torch.as_tensor(indices, dtype=torch.long)])


class StdlibTextDataModule(L.LightningDataModule):
    """Byte-level (vocab 256) text from the CPython stdlib ``.py`` files; no downloads, no tokenizer.

    The last ``val_fraction`` of the byte stream is validation. Training uses ``samples_per_epoch`` random
    windows whose starts are drawn once from a generator seeded with ``seed`` and read in order
    (``shuffle=False``): the batch at index ``k`` depends only on ``seed`` and ``k`` (every epoch repeats
    the same windows). Validation uses non-overlapping windows, at most ``val_batches`` batches.
    """

    def __init__(
        self,
        block_size: int = 64,
        batch_size: int = 16,
        max_bytes: int = 6_000_000,
        val_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
        samples_per_epoch: int = 100_000,
        val_batches: int = 64,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_data: torch.Tensor | None = None
        self.val_data: torch.Tensor | None = None
        self.train_dataset: ByteWindowDataset | None = None
        self.val_dataset: ByteWindowDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        hp = self.hparams
        data = load_stdlib_bytes(hp.max_bytes)
        n_val = max(hp.block_size + 1, int(math.ceil(data.numel() * hp.val_fraction)))
        self.train_data, self.val_data = data[:-n_val], data[-n_val:]
        n_starts = self.train_data.numel() - hp.block_size  # valid starts: 0 .. n - block - 1
        if n_starts <= 0:
            raise ValueError(f"train split ({self.train_data.numel()} bytes) shorter than a window")
        gen = torch.Generator().manual_seed(int(hp.seed))
        starts = torch.randint(0, n_starts, (int(hp.samples_per_epoch),), generator=gen)
        self.train_dataset = ByteWindowDataset(self.train_data, starts, hp.block_size)
        val_starts = torch.arange(0, self.val_data.numel() - hp.block_size, hp.block_size)
        val_starts = val_starts[: int(hp.val_batches) * int(hp.batch_size)]
        self.val_dataset = ByteWindowDataset(self.val_data, val_starts, hp.block_size)

    def _loader(self, dataset: Dataset) -> DataLoader:
        workers = int(self.hparams.num_workers)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=False,
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=collate_batched,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_dataset)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_dataset)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CharGPT(L.LightningModule):
    """nanoGPT-style pre-LN decoder over bytes; the output head is tied to the token embedding.

    ``forward(idx)`` maps ``(B, T)`` int64 tokens to ``(B, T, vocab_size)`` logits. Batches are
    ``(x, y)`` with ``y`` the next-byte targets.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        warmup_frac: float = 0.05,
        final_lr_frac: float = 0.1,
        total_steps: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        if t > self.hparams.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.hparams.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch[0].size(0))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch[0].size(0))
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return configure_adamw(
            self, hp.lr, hp.weight_decay, hp.warmup_frac, hp.final_lr_frac, hp.total_steps, betas=(0.9, 0.95)
        )
