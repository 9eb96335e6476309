"""Framework-agnostic engine: pure torch, never imports lightning."""

from hybrid_lightning.core.bandit import LinUCB, phase_reward
from hybrid_lightning.core.budget import OverheadBudget
from hybrid_lightning.core.corrector import Correction, ResidualCorrector
from hybrid_lightning.core.divergence import DivergenceMonitor, DivergenceReport, Level
from hybrid_lightning.core.dynamics import (
    ConstantVelocity,
    DynamicsModel,
    Prediction,
    Rollout,
    RSSMLite,
    make_dynamics,
    predict_y_steps,
)
from hybrid_lightning.core.engine import HybridEngine, PhaseResult, StepObservation, StepPlan, StepReport
from hybrid_lightning.core.phases import Phase, PhaseLimits, PhaseState, next_phase, ready_to_predict
from hybrid_lightning.core.residuals import Residual, ResidualStore
from hybrid_lightning.core.state import FEATURE_DIM, TrainingState
from hybrid_lightning.core.trajectory import RealUpdate, Trajectory

__all__ = [
    "FEATURE_DIM", "ConstantVelocity", "Correction", "DivergenceMonitor", "DivergenceReport", "DynamicsModel",
    "HybridEngine", "Level", "LinUCB", "OverheadBudget", "Phase", "PhaseLimits", "PhaseResult", "PhaseState",
    "Prediction",
    "RSSMLite", "RealUpdate", "Residual", "ResidualCorrector", "ResidualStore", "Rollout", "StepObservation",
    "StepPlan", "StepReport", "TrainingState", "Trajectory", "make_dynamics", "next_phase", "phase_reward",
    "predict_y_steps", "ready_to_predict",
]
