"""hybrid_lightning: skip some backward passes with predicted, verified weight updates."""

from hybrid_lightning.config import HybridConfig
from hybrid_lightning.core.phases import Phase
from hybrid_lightning.errors import (
    CheckpointError,
    ConfigError,
    HybridTrainingError,
    IncompatibleSetupError,
    NumericalError,
    PredictionDivergence,
    RecoveryAction,
    TrainingInstability,
)
from hybrid_lightning.lightning import (
    HybridDDPStrategy,
    HybridPredictiveTraining,
    HybridReport,
    HybridSingleDeviceStrategy,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "HybridConfig", "HybridDDPStrategy", "HybridPredictiveTraining",
    "HybridReport", "HybridSingleDeviceStrategy", "HybridTrainingError", "IncompatibleSetupError",
    "NumericalError", "Phase", "PredictionDivergence", "RecoveryAction", "TrainingInstability", "__version__",
]
