"""Thin Lightning adapter over the framework-agnostic engine."""

from hybrid_lightning.lightning.callback import HybridPredictiveTraining
from hybrid_lightning.lightning.metrics import HybridReport
from hybrid_lightning.lightning.strategy import HybridDDPStrategy, HybridSingleDeviceStrategy, HybridStrategyMixin

__all__ = ["HybridDDPStrategy", "HybridPredictiveTraining", "HybridReport", "HybridSingleDeviceStrategy",
           "HybridStrategyMixin"]
