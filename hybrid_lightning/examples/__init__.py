"""Example workloads: plain LightningModules + LightningDataModules (no plugin code)."""

from hybrid_lightning.examples.char_gpt import CharGPT, StdlibTextDataModule
from hybrid_lightning.examples.cnn import SmallCNN, SyntheticImagesDataModule
from hybrid_lightning.examples.common import configure_adamw, warmup_cosine
from hybrid_lightning.examples.mlp import MLPRegressor, TeacherStudentDataModule

__all__ = [
    "CharGPT",
    "MLPRegressor",
    "SmallCNN",
    "StdlibTextDataModule",
    "SyntheticImagesDataModule",
    "TeacherStudentDataModule",
    "configure_adamw",
    "warmup_cosine",
]
