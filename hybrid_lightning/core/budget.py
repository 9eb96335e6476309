"""OverheadBudget: how much wall-clock the dynamics model's observations may take while nothing is predicted."""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

_MIN_PLAIN = 8  # plain steps timed before an observation's extra time can be measured
_MAX_PENDING = 4096  # observation steps kept until then


class OverheadBudget:
    """Measures what observing costs and how long the engine must sleep to stay within ``fraction``.

    The caller reports each step's wall-clock as one of three kinds: ``"plain"`` (a real step with
    no observation), ``"observe"`` (a real step on which the trajectory and the dynamics model
    worked) or ``"other"`` (predicted steps, phase starts and judgements: prediction's own cost,
    which the bandit weighs). An observation's cost is its time above the median plain step, so
    device waits inside it are not mistaken for overhead. ``fraction=None`` measures but never owes.
    """

    def __init__(self, fraction: float | None, window: int = 64) -> None:
        self.fraction = fraction
        self._plain: deque[float] = deque(maxlen=window)
        self._pending: list[float] = []  # observation steps timed before a plain step's time was known
        self.run_seconds = 0.0
        self.observe_seconds = 0.0

    def record(self, seconds: float, kind: str) -> None:
        if kind not in ("plain", "observe", "other"):
            raise ValueError(f"kind must be 'plain', 'observe' or 'other', not {kind!r}")
        if not (math.isfinite(seconds) and seconds >= 0.0):
            return  # a clock that went backwards or a missing reading: ignore the step
        self.run_seconds += seconds
        if kind == "plain":
            self._plain.append(seconds)
            base = self.plain_step() if self._pending else None  # the median only when something waits for it
            if base is not None:  # e.g. stride 1: the first plain steps come while dormant
                self.observe_seconds += sum(max(0.0, s - base) for s in self._pending)
                self._pending.clear()
        elif kind == "observe":
            base = self.plain_step()
            if base is not None:
                self.observe_seconds += max(0.0, seconds - base)
            elif len(self._pending) < _MAX_PENDING:
                self._pending.append(seconds)

    def plain_step(self) -> float | None:
        """Median seconds of the recent plain steps (None until enough were timed)."""
        return statistics.median(self._plain) if len(self._plain) >= _MIN_PLAIN else None

    @property
    def share(self) -> float:
        """Observation time so far as a fraction of all timed step time."""
        return self.observe_seconds / self.run_seconds if self.run_seconds > 0 else 0.0

    def steps_owed(self) -> int:
        """Plain steps to run before the observation time is back within the budget (0 when it is)."""
        base = self.plain_step()
        if self.fraction is None or not base:
            return 0
        owed = self.observe_seconds / self.fraction - self.run_seconds
        return max(0, math.ceil(owed / base))

    def forgive(self) -> None:
        """Clear the observation time owed so far (a Predict phase paid for it)."""
        self.observe_seconds = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"plain": list(self._plain), "pending": list(self._pending), "run_seconds": self.run_seconds,
                "observe_seconds": self.observe_seconds}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        plain = [float(x) for x in sd["plain"]]
        pending = [float(x) for x in sd.get("pending", [])][:_MAX_PENDING]
        run, observe = float(sd["run_seconds"]), float(sd["observe_seconds"])
        if not all(math.isfinite(x) and x >= 0 for x in (*plain, *pending, run, observe)):
            raise ValueError("overhead budget state holds negative or non-finite times")
        self._plain = deque(plain, maxlen=self._plain.maxlen)
        self._pending = pending
        self.run_seconds, self.observe_seconds = run, observe
