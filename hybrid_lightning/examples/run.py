"""Run an example workload with (or without) the plugin: ``python examples/<name>.py --help``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import lightning as L
import torch

from hybrid_lightning.config import PREDICTORS, HybridConfig
from hybrid_lightning.examples.char_gpt import CharGPT, StdlibTextDataModule
from hybrid_lightning.examples.cnn import SmallCNN, SyntheticImagesDataModule
from hybrid_lightning.examples.mlp import MLPRegressor, TeacherStudentDataModule
from hybrid_lightning.lightning.callback import HybridPredictiveTraining

# name -> (model factory, datamodule factory, default steps)
WORKLOADS: dict[str, tuple[Callable[[], L.LightningModule], Callable[[], L.LightningDataModule], int]] = {
    "char_gpt": (CharGPT, StdlibTextDataModule, 1500),
    "mlp": (MLPRegressor, TeacherStudentDataModule, 2000),
    "cnn": (SmallCNN, SyntheticImagesDataModule, 1200),
}


def main(workload: str, argv: list[str] | None = None) -> HybridPredictiveTraining | None:
    make_model, make_data, default_steps = WORKLOADS[workload]
    p = argparse.ArgumentParser(description=f"Train the {workload} example with hybrid_lightning.")
    p.add_argument("--steps", type=int, default=default_steps, help="optimizer steps")
    p.add_argument("--config", help="HybridConfig YAML (overrides the flags below)")
    p.add_argument("--threshold", type=float, default=0.3, help="predict_threshold")
    p.add_argument("--predictor", choices=PREDICTORS, default="rssm")
    p.add_argument("--plain", action="store_true", help="plain Lightning training, no plugin (the baseline)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    L.seed_everything(0)
    callback = None
    if not args.plain:
        warmup = max(args.steps // 10, 1)
        config = (HybridConfig.from_yaml(args.config) if args.config else
                  HybridConfig(warmup_steps=warmup, min_full_steps=max(warmup // 5, 1), max_predict_steps=20,
                               predict_threshold=args.threshold, predictor=args.predictor))
        callback = HybridPredictiveTraining(config)
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1,
                        strategy="auto" if args.plain else "hybrid", callbacks=[callback] if callback else [],
                        val_check_interval=min(500, args.steps), check_val_every_n_epoch=None, limit_val_batches=16,
                        log_every_n_steps=25, default_root_dir=f"runs/{workload}", enable_checkpointing=False)
    trainer.fit(make_model(), make_data())
    print({k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("val")})
    return callback
