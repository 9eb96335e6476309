"""Fast tests for the example workloads (plain Lightning, no plugin)."""

from __future__ import annotations

import math
import pickle

import lightning as L
import pytest
import torch

from hybrid_lightning.examples import (
    CharGPT,
    MLPRegressor,
    SmallCNN,
    StdlibTextDataModule,
    SyntheticImagesDataModule,
    TeacherStudentDataModule,
    configure_adamw,
    warmup_cosine,
)
from hybrid_lightning.examples.common import BatchedTensorDataset, WarmupCosine

# lightning 2.6 + torch 2.13: lightning's pytree helper instantiates torch's deprecated LeafSpec
pytestmark = pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.* is deprecated:FutureWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _first_batches(dm: L.LightningDataModule, n: int = 3) -> list[tuple[torch.Tensor, ...]]:
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def _same(a: list[tuple[torch.Tensor, ...]], b: list[tuple[torch.Tensor, ...]]) -> bool:
    return all(torch.equal(x, y) for ba, bb in zip(a, b, strict=True) for x, y in zip(ba, bb, strict=True))


# --------------------------------------------------------------------------- schedule / optimizer


def test_warmup_cosine_shape():
    total = 100
    vals = [warmup_cosine(s, total, warmup_frac=0.1, final_frac=0.1) for s in range(total + 5)]
    assert vals[0] == pytest.approx(0.1)  # (0 + 1) / 10
    assert vals[9] == pytest.approx(1.0)  # end of warmup
    assert all(b > a for a, b in zip(vals[:9], vals[1:10], strict=True))  # linear increase
    decay = vals[10:total + 1]
    assert all(b <= a + 1e-12 for a, b in zip(decay, decay[1:], strict=False))  # monotone decay
    assert vals[total] == pytest.approx(0.1)
    assert vals[-1] == pytest.approx(0.1)  # clamped past the end
    mid = warmup_cosine(10 + 45, total, warmup_frac=0.1, final_frac=0.1)
    assert mid == pytest.approx(0.55)  # halfway through the cosine
    assert warmup_cosine(0, 10, warmup_frac=0.0, final_frac=0.0) == pytest.approx(1.0)


def test_configure_adamw_groups_and_schedule():
    model = CharGPT(n_layer=1, n_embd=32, block_size=16, total_steps=40, warmup_frac=0.1)
    cfg = model.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert cfg["lr_scheduler"]["interval"] == "step"
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(p.dim() >= 2 for p in opt.param_groups[0]["params"])
    assert all(p.dim() < 2 for p in opt.param_groups[1]["params"])
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == _n_params(model)  # tied head counted once
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-3 * 0.25)  # warmup step 0 of 4
    # the schedule callable is picklable and round-trips through the scheduler state
    state = sched.state_dict()
    assert pickle.loads(pickle.dumps(sched.lr_lambdas[0])).total == 40
    assert state["lr_lambdas"][0]["total"] == 40

    mlp_cfg = configure_adamw(MLPRegressor(width=16, depth=1), lr=1e-3, total_steps=10)
    assert len(mlp_cfg["optimizer"].param_groups) == 1
    with pytest.raises(ValueError, match="total_steps"):
        MLPRegressor(width=16, depth=1).configure_optimizers()  # no trainer, no total_steps
    assert isinstance(sched.lr_lambdas[0], WarmupCosine)


def test_batched_tensor_dataset_matches_per_item():
    ds = BatchedTensorDataset(torch.arange(10.0).view(5, 2), torch.arange(5))
    xb, yb = ds.__getitems__([3, 1])
    assert torch.equal(xb, torch.stack([ds[3][0], ds[1][0]]))
    assert torch.equal(yb, torch.tensor([3, 1]))
    with pytest.raises(ValueError):
        BatchedTensorDataset(torch.zeros(3), torch.zeros(4))


# --------------------------------------------------------------------------- datamodules


def test_stdlib_text_datamodule():
    kw = dict(block_size=32, batch_size=8, max_bytes=200_000, samples_per_epoch=512, val_batches=4)
    dm = StdlibTextDataModule(**kw)
    a = _first_batches(dm)
    x, y = a[0]
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert int(x.min()) >= 0 and int(x.max()) < 256
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one byte
    assert dm.train_data.numel() + dm.val_data.numel() == 200_000
    assert dm.val_data.numel() == 10_000
    # corpus is Python source: printable ASCII dominates
    assert bytes(dm.train_data[:4096].tolist()).decode("utf-8", errors="ignore").count("def ") > 0

    assert _same(a, _first_batches(StdlibTextDataModule(**kw)))  # same seed -> same batches
    assert not _same(a, _first_batches(StdlibTextDataModule(**{**kw, "seed": 1})))

    # resume: batch k equals the k-th slice of the dataset, independent of iteration history
    loader = dm.train_dataloader()
    assert len(loader) == 512 // 8
    k = 5
    xk, yk = dm.train_dataset.__getitems__(list(range(k * 8, (k + 1) * 8)))
    batches = list(iter(loader))
    assert torch.equal(batches[k][0], xk) and torch.equal(batches[k][1], yk)
    assert torch.equal(dm.train_dataset[k * 8][0], xk[0])

    val = list(dm.val_dataloader())
    assert len(val) == 4  # capped at val_batches
    vx = torch.cat([b[0] for b in val])
    assert torch.equal(vx[0], dm.val_data[:32].long())
    assert torch.equal(vx[1], dm.val_data[32:64].long())  # non-overlapping windows


def test_teacher_student_datamodule():
    kw = dict(n_train=1_000, n_val=200, batch_size=64)
    dm = TeacherStudentDataModule(**kw)
    a = _first_batches(dm)
    x, y = a[0]
    assert x.shape == (64, 32) and y.shape == (64, 8)
    assert x.dtype == y.dtype == torch.float32
    assert 0.7 < float(dm.train_dataset.tensors[1].std()) < 1.3  # targets scaled to ~unit std
    assert _same(a, _first_batches(TeacherStudentDataModule(**kw)))
    assert not _same(a, _first_batches(TeacherStudentDataModule(**{**kw, "seed": 1})))
    vx, vy = next(iter(dm.val_dataloader()))
    assert vx.shape == (64, 32) and torch.equal(vx, dm.val_dataset.tensors[0][:64])
    # noise is what it says: a noiseless copy differs by ~noise std
    clean = TeacherStudentDataModule(**{**kw, "noise": 0.0})
    clean.setup("fit")
    diff = dm.train_dataset.tensors[1] - clean.train_dataset.tensors[1]
    assert torch.equal(dm.train_dataset.tensors[0], clean.train_dataset.tensors[0])
    assert float(diff.std()) == pytest.approx(0.05, rel=0.1)


def test_synthetic_images_datamodule():
    kw = dict(n_train=1_000, n_val=200, batch_size=32)
    dm = SyntheticImagesDataModule(**kw)
    a = _first_batches(dm)
    x, y = a[0]
    assert x.shape == (32, 1, 16, 16) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < 10
    assert _same(a, _first_batches(SyntheticImagesDataModule(**kw)))
    assert not _same(a, _first_batches(SyntheticImagesDataModule(**{**kw, "seed": 1})))
    # without noise every sample is an exact roll of its class prototype by at most max_shift
    clean = SyntheticImagesDataModule(**{**kw, "noise": 0.0, "n_train": 50})
    clean.setup("fit")
    imgs, labels = clean.train_dataset.tensors
    shifts = range(-clean.hparams.max_shift, clean.hparams.max_shift + 1)
    for img, lab in zip(imgs, labels, strict=True):
        proto = clean.prototypes[lab]
        assert any(torch.equal(img, torch.roll(proto, (dy, dx), (-2, -1))) for dy in shifts for dx in shifts)
    assert len({tuple(p.flatten()[:4].tolist()) for p in clean.prototypes}) == 10


# --------------------------------------------------------------------------- models


def test_param_counts_default_sizes():
    counts = {m.__name__: _n_params(m()) for m in (CharGPT, MLPRegressor, SmallCNN)}
    print("param counts:", counts)
    assert 420_000 < counts["CharGPT"] < 460_000
    assert 500_000 < counts["MLPRegressor"] < 600_000
    assert 130_000 < counts["SmallCNN"] < 170_000


def test_char_gpt_forward_is_causal():
    torch.manual_seed(0)
    model = CharGPT(n_layer=1, n_embd=32, block_size=16).eval()
    idx = torch.randint(0, 256, (2, 16))
    out = model(idx)
    assert out.shape == (2, 16, 256)
    idx2 = idx.clone()
    idx2[:, 10:] = (idx2[:, 10:] + 1) % 256
    out2 = model(idx2)
    assert torch.allclose(out[:, :10], out2[:, :10], atol=1e-6)  # future tokens don't leak
    assert not torch.allclose(out[:, 10:], out2[:, 10:])
    assert model.lm_head.weight is model.wte.weight
    with pytest.raises(ValueError):
        model(torch.zeros(1, 17, dtype=torch.long))


class _LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(model: L.LightningModule, dm: L.LightningDataModule) -> tuple[L.Trainer, list[float]]:
    L.seed_everything(0, verbose=False)
    rec = _LossRecorder()
    trainer = L.Trainer(
        max_steps=30,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        callbacks=[rec],
    )
    trainer.fit(model, datamodule=dm)
    assert len(rec.losses) == 30
    assert all(math.isfinite(v) for v in rec.losses)
    assert trainer.global_step == 30
    return trainer, rec.losses


def _assert_decreases(losses: list[float], factor: float) -> None:
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < factor * first, f"loss did not decrease enough: {first:.4f} -> {last:.4f}"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda: (
                CharGPT(block_size=32, n_layer=1, n_embd=32, n_head=4),
                StdlibTextDataModule(
                    block_size=32, batch_size=16, max_bytes=200_000, samples_per_epoch=2_000
                ),
                0.8,
            ),
            id="char_gpt",
        ),
        pytest.param(
            lambda: (
                MLPRegressor(width=64, depth=2),
                TeacherStudentDataModule(n_train=2_000, n_val=256, batch_size=64),
                0.6,
            ),
            id="mlp",
        ),
        pytest.param(
            lambda: (
                SmallCNN(channels=(8, 16), hidden=32),
                SyntheticImagesDataModule(n_train=2_000, n_val=256, batch_size=32, noise=0.5, max_shift=2),
                0.6,
            ),
            id="cnn",
        ),
    ],
)
def test_fit_reduces_train_loss(make):
    model, dm, factor = make()
    trainer, losses = _fit(model, dm)
    _assert_decreases(losses, factor)
    # the LR schedule ran per step over estimated_stepping_batches (= max_steps) and ended at final_lr_frac
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(model.hparams.lr * model.hparams.final_lr_frac, rel=1e-6)
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert math.isfinite(metrics["val_loss"])
    if isinstance(model, SmallCNN):
        assert 0.0 <= metrics["val_acc"] <= 1.0


def test_hyperparameters_saved():
    assert CharGPT(n_layer=1).hparams.n_layer == 1
    assert SmallCNN(channels=(4, 8)).hparams.channels == (4, 8)
    assert MLPRegressor(depth=1).hparams.depth == 1
    assert StdlibTextDataModule(seed=3).hparams.seed == 3
    assert TeacherStudentDataModule(noise=0.1).hparams.noise == 0.1
    assert SyntheticImagesDataModule(max_shift=1).hparams.max_shift == 1
