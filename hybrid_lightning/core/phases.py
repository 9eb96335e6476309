"""The phase machine: Warmup -> Full -> Predict -> Correct -> Full ..., as pure functions.

Invariants (property-tested):
- deterministic: the next phase depends only on the arguments;
- Warmup comes first and lasts exactly ``warmup_steps`` steps;
- Predict lasts at most ``max_predict_steps`` steps and is always followed by Correct;
- Correct lasts exactly ``correct_steps`` steps, then Full;
- an alarm forces Full (from Predict it goes through Correct, where the rollback happens);
- a declined horizon (0) restarts the Full count, so the bandit is asked once per min_full_steps.
Full is plain training: it lasts as long as predictions are not trusted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Phase(enum.IntEnum):
    WARMUP = 0
    FULL = 1
    PREDICT = 2
    CORRECT = 3

    @property
    def runs_backward(self) -> bool:
        return self is not Phase.PREDICT


@dataclass(frozen=True)
class PhaseLimits:
    warmup_steps: int
    min_full_steps: int
    max_predict_steps: int
    correct_steps: int
    predict_threshold: float


@dataclass(frozen=True)
class PhaseState:
    """Where the machine is: the phase, steps completed in it, and the Predict horizon (0 otherwise)."""

    phase: Phase = Phase.WARMUP
    steps_in_phase: int = 0
    horizon: int = 0


def ready_to_predict(state: PhaseState, confidence: float, alarm: bool, limits: PhaseLimits) -> bool:
    """Whether a Full phase may hand over to Predict now (the bandit then picks the horizon)."""
    return (
        state.phase is Phase.FULL
        and not alarm
        and state.steps_in_phase >= limits.min_full_steps
        and limits.max_predict_steps > 0
        and confidence > limits.predict_threshold
    )


def next_phase(state: PhaseState, step: int, confidence: float, alarm: bool, horizon: int,
               limits: PhaseLimits) -> PhaseState:
    """Phase for the next step, after a step in ``state`` completed.

    ``step`` counts completed optimizer steps; ``horizon`` is the proposed Predict length
    (0 = do not predict; clipped to ``max_predict_steps``).
    """
    done = PhaseState(state.phase, state.steps_in_phase + 1, state.horizon)
    if done.phase is Phase.WARMUP:
        if step >= limits.warmup_steps:
            return PhaseState(Phase.FULL)
        return done
    if done.phase is Phase.PREDICT:
        if alarm or done.steps_in_phase >= done.horizon:
            return PhaseState(Phase.CORRECT)
        return done
    if alarm:
        return PhaseState(Phase.FULL)
    if done.phase is Phase.CORRECT:
        if done.steps_in_phase >= limits.correct_steps:
            return PhaseState(Phase.FULL)
        return done
    # Full
    if not ready_to_predict(done, confidence, alarm, limits):
        return done
    horizon = min(max(horizon, 0), limits.max_predict_steps)
    if horizon > 0:
        return PhaseState(Phase.PREDICT, 0, horizon)
    return PhaseState(Phase.FULL)  # horizon declined: another min_full_steps before asking again


def initial_state(limits: PhaseLimits) -> PhaseState:
    return PhaseState(Phase.WARMUP) if limits.warmup_steps > 0 else PhaseState(Phase.FULL)
