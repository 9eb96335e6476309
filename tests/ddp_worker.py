"""A 2-process DDP run for the multi-process tests (started by tests/test_ddp.py, never by pytest itself).

Every rank writes <out>/rank<r>.pt: its parameters, buffers, the plugin's phase counts and events, so the test
can compare ranks bit for bit.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hybrid_lightning import HybridDDPStrategy, HybridPredictiveTraining, Phase  # noqa: E402
from lightning_helpers import eager_config, nowcast_config  # noqa: E402

# Barriers during training steps: the plugin's per-step all-reduces must not add any (Lightning's
# ``strategy.reduce`` puts one before each all-reduce). Looked up at call time, so patching the module works.
BARRIERS = {"counting": False, "n": 0}
_barrier = torch.distributed.barrier


def _counting_barrier(*args, **kwargs):
    if BARRIERS["counting"]:
        BARRIERS["n"] += 1
    return _barrier(*args, **kwargs)


torch.distributed.barrier = _counting_barrier


class DDPModel(L.LightningModule):
    """Per-rank data that is a pure function of (epoch, batch_idx, rank); optional BatchNorm (plain, not
    SyncBatchNorm, which DDP supports on GPUs only) and a branch used on even steps only."""

    def __init__(self, batchnorm: bool = False, unused: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(8, 32), *( [nn.BatchNorm1d(32)] if batchnorm else []), nn.Tanh())
        self.head = nn.Linear(32, 2)
        self.extra = nn.Linear(32, 2) if unused else None
        self.inject_nan = False

    def batch(self, batch_idx):
        g = torch.Generator().manual_seed(100_000 * self.current_epoch + 1_000 * self.global_rank + batch_idx)
        x = torch.randn(32, 8, generator=g)
        y = torch.tanh(x @ torch.linspace(-1, 1, 16).reshape(8, 2)) + 0.05 * torch.randn(32, 2, generator=g)
        if self.inject_nan and self.global_rank == 1:
            x = x * float("nan")
        return x, y

    def training_step(self, batch, batch_idx):
        # DDP broadcasts rank 0's buffers before every forward; what the forward sees must agree across ranks
        self.seen_buffers = {n: b.detach().clone() for n, b in self.named_buffers()}
        x, y = self.batch(batch_idx)
        h = self.body(x)
        out = self.head(h)
        if self.extra is not None and batch_idx % 2 == 0:
            out = out + self.extra(h)
        return nn.functional.mse_loss(out, y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.001 * s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(range(64), batch_size=None)


class NanAtPhaseEnd(L.Callback):
    """On rank 1 only, poison the batch of the last step of the first Predict phase after --nan-after steps:
    its probe then sees NaN on one rank only."""

    def __init__(self, cb, after):
        self.cb, self.after, self.done = cb, after, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        plan, ps = self.cb.engine.plan(), self.cb.engine.phase_state
        last = plan.phase is Phase.PREDICT and ps.steps_in_phase == ps.horizon - 1
        pl_module.inject_nan = (not self.done and trainer.global_step >= self.after and last)
        if pl_module.inject_nan:
            self.done = True
            self.step = trainer.global_step


class NanOnRealStep(L.Callback):
    """On rank 1 only, poison the batch of the first real step at or after --nan-real-at that is not an
    observation step (so only the loss, not the gradient norm, can tell that it is bad)."""

    def __init__(self, cb, at):
        self.cb, self.at, self.done = cb, at, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        plan = self.cb.engine.plan()
        pl_module.inject_nan = (not self.done and trainer.global_step >= self.at and plan.runs_backward
                                and not plan.measure_grad_norm)
        if pl_module.inject_nan:
            self.done = True
            self.step = trainer.global_step


class DebtOnRank1(L.Callback):
    """Rank 1 alone starts with ``seconds`` of observation time owed to the engine's overhead budget."""

    def __init__(self, cb, seconds):
        self.cb, self.seconds = cb, seconds

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 1:
            self.cb.engine.budget.observe_seconds += self.seconds


class Events(L.Callback):
    """Records judged Predict phases; at the end of fit (inside each worker, whatever the launcher) every rank
    writes <out>/rank<r>.pt."""

    def __init__(self, cb, out, nan):
        self.cb, self.out, self.nan, self.rows = cb, out, nan, []

    def on_train_start(self, trainer, pl_module):
        BARRIERS["counting"] = True

    def on_train_end(self, trainer, pl_module):
        BARRIERS["counting"] = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        r = self.cb.engine.last_phase_result
        if r is not None and (not self.rows or self.rows[-1][0] != r.start_step):
            self.rows.append((r.start_step, r.steps, bool(r.kept), r.reason))

    def on_fit_end(self, trainer, pl_module):
        torch.save({
            "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "buffers": getattr(pl_module, "seen_buffers", {}),
            "steps": dict(self.cb.report.steps),
            "counters": dict(self.cb.engine.counters),
            "curve": list(self.cb.report.curve),
            "phases": self.rows,
            "nan_step": getattr(self.nan, "step", None),
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "barriers_in_training": BARRIERS["n"],
        }, Path(self.out) / f"rank{trainer.global_rank}.pt")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--launcher", default="popen", choices=["popen", "spawn"])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--find-unused", type=int, default=0)
    p.add_argument("--static-graph", type=int, default=0)
    p.add_argument("--batchnorm", type=int, default=0)
    p.add_argument("--unused", type=int, default=0)
    p.add_argument("--nan-after", type=int, default=-1)
    p.add_argument("--nan-real-at", type=int, default=-1)
    p.add_argument("--ckpt-dir", default="")
    p.add_argument("--resume", default="")
    p.add_argument("--nowcast", type=int, default=0, help="the shipped nowcaster instead of constant velocity")
    p.add_argument("--debt-on-rank1", type=float, default=0.0,
                   help="never confident, quick to fall asleep, an overhead budget of 1 (nothing is ever owed), "
                        "and rank 1 alone starts owing this many seconds of observation: the ranks' clocks disagree")
    p.add_argument("--late-reads", type=int, default=0,
                   help="monitor only, read late as on a GPU (forced on these CPUs), this many steps at a time")
    args = p.parse_args()
    # a native abort in a worker then prints where it happened (the env var reaches spawned children)
    faulthandler.enable()
    os.environ["PYTHONFAULTHANDLER"] = "1"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DDPModel(batchnorm=bool(args.batchnorm), unused=bool(args.unused))
    config = nowcast_config() if args.nowcast else eager_config()
    if args.debt_on_rank1:
        config.predict_threshold, config.predictor, config.bandit.dormant_after = 0.999, "rssm", 10
        config.bandit.overhead_budget = 1.0
    if args.late_reads:
        config.predict_threshold, config.idle_read_every = 1.0, args.late_reads
        import hybrid_lightning.lightning.callback as callback_module

        callback_module._reads_late = lambda device: True
    cb = HybridPredictiveTraining(config, verbose=False)
    callbacks_extra = [DebtOnRank1(cb, args.debt_on_rank1)] if args.debt_on_rank1 else []
    nan = NanAtPhaseEnd(cb, args.nan_after) if args.nan_after >= 0 else None
    if args.nan_real_at >= 0:
        nan = NanOnRealStep(cb, args.nan_real_at)
    callbacks = ([nan] if nan else []) + callbacks_extra + [cb, Events(cb, args.out, nan)]
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=1, save_top_k=-1,
                                         filename="{step}"))
    strategy = HybridDDPStrategy(start_method=args.launcher, find_unused_parameters=bool(args.find_unused),
                                 static_graph=bool(args.static_graph), process_group_backend="gloo",
                                 timeout=timedelta(seconds=60))
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=2, strategy=strategy,
                        callbacks=callbacks, logger=False, enable_checkpointing=bool(args.ckpt_dir),
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=args.out)
    trainer.fit(model, ckpt_path=args.resume or None)
    if args.launcher == "spawn":  # this is the main process; the fit ran in spawned children
        torch.save({"steps": dict(cb.report.steps), "phases": len(cb.results), "kept": cb.report.kept_phases},
                   Path(args.out) / "main.pt")


if __name__ == "__main__":
    main()
