"""Error family of the plugin; every error says what recovery the engine takes (or advises)."""

from __future__ import annotations

import enum


class RecoveryAction(enum.Enum):
    """What the engine does (or what the user must do) after an error."""

    CONTINUE = "continue"  # nothing to undo; keep training
    REDUCE_HORIZON = "reduce_horizon"  # keep going, but predict for fewer steps
    FORCE_FULL = "force_full"  # stop predicting for min_full_steps
    ROLLBACK = "rollback"  # restore the pre-Predict snapshot, then force Full
    ABORT = "abort"  # cannot recover; training must stop

    def can_continue(self) -> bool:
        return self is not RecoveryAction.ABORT


class HybridTrainingError(Exception):
    """Base class. ``recovery`` tells what happens next."""

    default_recovery = RecoveryAction.ABORT

    def __init__(self, message: str, recovery: RecoveryAction | None = None) -> None:
        super().__init__(message)
        self.recovery = recovery if recovery is not None else self.default_recovery


class ConfigError(HybridTrainingError, ValueError):
    """A configuration value, key or type is invalid. Raised before any training step."""


class IncompatibleSetupError(HybridTrainingError, RuntimeError):
    """The Trainer / model setup cannot be used with the plugin (raised at setup, before any step)."""


class PredictionDivergence(HybridTrainingError):
    """A predicted phase made training worse (or produced a loss spike); it was rolled back."""

    default_recovery = RecoveryAction.ROLLBACK


class NumericalError(HybridTrainingError):
    """NaN or Inf in a loss, gradient norm, predicted delta or parameter."""

    default_recovery = RecoveryAction.ROLLBACK


class TrainingInstability(HybridTrainingError):
    """Divergence seen on real (full) steps: loss spike, exploding or vanishing gradients."""

    default_recovery = RecoveryAction.FORCE_FULL


class CheckpointError(HybridTrainingError):
    """Plugin state in a checkpoint is missing, from another version or corrupted."""
