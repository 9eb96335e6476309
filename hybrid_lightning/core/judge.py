"""BlockJudge: does prediction pay in this run? Judged from the run's own training loss, at no extra forward.

The paired probe at a phase's end sees a jump's overshoot, not its lasting value: it rolls back drift jumps
that leave the run far better off at its end (docs/predictors.md, drift card). This judge compares stretches
of the run with and without Predict phases instead. From ``start`` on, the steps form blocks of ``block``
steps in groups of four, J N N J: a Predict phase may run only inside a J block (the order cancels a linear
trend in the progress per block). The loss at a block's end is the mean training loss of its last ``tail``
real steps. Per group, d = (progress over the two J blocks - progress over the two N blocks) / 2.

After each group whose J blocks held a phase: while the mean d of the last ``window`` such groups is at
least ``-margin`` x the N blocks' mean progress over them (at margin 0.5: while the J blocks make any progress
at all), the next group is J N N J again; otherwise the next ``off`` groups are N N N N (no phase at all), ``off``
doubling (up to 32) each time the judge says no in a row, and then a J N N J group judges again. With
``exploit``, a mean d >= 0 (the J blocks at least as fast as the others) makes the next ``on`` groups J J J J
(phases anywhere), ``on`` doubling likewise, before the next J N N J group.

With ``start_scale`` < 1 the judge also ramps the jump: a test group's phases move ``scale`` x the predicted
displacement, starting at ``start_scale``. A mean d >= 0 doubles the scale for the next test (up to 1), and
the J J J J groups it earns move the scale just judged; a veto halves it (down to ``start_scale``). So a
workload that large jumps harm pays for small test jumps only, and a scale is exploited only once tested.

Its decisions depend only on the step indices and the observed losses, so they are deterministic,
identical on every process, and resume exactly from ``state_dict()``.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

PATTERN = "JNNJ"
MAX_OFF = 32


class BlockJudge:
    def __init__(self, start: int, block: int, window: int = 4, margin: float = 0.5, exploit: bool = True,
                 start_scale: float = 1.0) -> None:
        if block < 4:
            raise ValueError(f"block must be >= 4 steps, got {block}")
        if window < 1:
            raise ValueError(f"window must be >= 1 group, got {window}")
        if not margin >= 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if not 0 < start_scale <= 1:
            raise ValueError(f"start_scale must be in (0, 1], got {start_scale}")
        self.start, self.block, self.window, self.margin = int(start), int(block), int(window), float(margin)
        self.exploit, self.start_scale = bool(exploit), float(start_scale)
        self._trial = self._tested = self.start_scale  # the scale of test groups; of the J J J J groups
        self.tail = max(1, block // 4)
        self._tails: dict[int, list[float]] = {}  # block index (-1: the one before start) -> [loss sum, count]
        self.d: list[float] = []  # the last ``window`` judged groups' d, oldest first
        self.n_progress: list[float] = []  # ... and their N blocks' mean progress
        self._off_until = 0  # the first group that may be J N N J
        self._off_len = 1
        self._on_until = 0  # groups before it (from the last verdict on) are J J J J
        self._on_len = 1
        self._phases = 0  # Predict phases started in the current group
        self.groups_judged = 0
        self.vetoes = 0  # times the judge switched prediction off

    # ------------------------------------------------------------------ schedule
    def _block_of(self, step: int) -> int:
        return (step - self.start) // self.block  # floor: -1 for the block before start

    def may_predict(self, step: int) -> bool:
        """May step ``step`` be a predicted step (or the first of a phase)?"""
        if step < self.start:
            return True
        b = self._block_of(step)
        return b // 4 < self._on_until or b // 4 >= self._off_until and PATTERN[b % 4] == "J"

    def steps_left(self, step: int) -> int:
        """Steps from ``step`` to the end of its block (a phase must not run on into an N block)."""
        if step < self.start:
            return self.start - step + self.block  # the first block is J
        return self.block - (step - self.start) % self.block

    def scale(self, step: int) -> float:
        """The share of the predicted displacement a phase starting at ``step`` moves."""
        if step < self.start:
            return self.start_scale
        return self._tested if self._block_of(step) // 4 < self._on_until else self._trial

    @property
    def predicting(self) -> bool:
        """False while the judge has switched prediction off."""
        if not self.d:
            return True
        return statistics.fmean(self.d) >= -self.margin * max(statistics.fmean(self.n_progress), 0.0)

    # ------------------------------------------------------------------ observations
    def phase_started(self, step: int) -> None:
        if step >= self.start:
            self._phases += 1

    def record(self, step: int, loss: float) -> None:
        """A real step's training loss (finite; a non-finite one is left out)."""
        if not math.isfinite(loss):
            return
        b = self._block_of(step)
        if b >= 0 and (step - self.start) % self.block < self.block - self.tail:
            return  # not in its block's tail
        if b < 0 and step < self.start - self.tail:
            return
        s = self._tails.setdefault(b, [0.0, 0])
        s[0] += loss
        s[1] += 1

    def end_step(self, step: int) -> float | None:
        """Step ``step`` is over (real or predicted). At a group's last step, judge it. -> its d, or None."""
        if step < self.start or (step + 1 - self.start) % (4 * self.block):
            return None
        g = self._block_of(step) // 4
        phases, self._phases = self._phases, 0
        ends = [self._tails.get(4 * g - 1 + i) for i in range(5)]
        for b in [b for b in self._tails if b < 4 * g + 3]:
            del self._tails[b]
        if g < self._off_until or g < self._on_until or phases == 0 or any(e is None or e[1] == 0 for e in ends):
            return None  # nothing predicted in it (or a block's end unseen): nothing to judge
        b0, b1, b2, b3, b4 = (e[0] / e[1] for e in ends if e is not None)
        d = ((b0 - b1) + (b3 - b4) - (b1 - b2) - (b2 - b3)) / 2
        self.d = (self.d + [d])[-self.window:]
        self.n_progress = (self.n_progress + [(b1 - b3) / 2])[-self.window:]
        self.groups_judged += 1
        if self.predicting:
            self._off_len = 1
            pays = statistics.fmean(self.d) >= 0
            if pays:
                self._tested, self._trial = self._trial, min(2 * self._trial, 1.0)
            if self.exploit and pays:
                self._on_until = g + 1 + self._on_len
                self._on_len = min(2 * self._on_len, MAX_OFF)
            else:
                self._on_len = 1
        else:
            self._on_len = 1
            self._trial = max(self._trial / 2, self.start_scale)
            self._off_until = g + 1 + self._off_len
            self._off_len = min(2 * self._off_len, MAX_OFF)
            self.vetoes += 1
        return d

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {"schedule": [self.start, self.block],
                "tails": [[b, s, n] for b, (s, n) in sorted(self._tails.items())], "d": list(self.d),
                "n_progress": list(self.n_progress),
                "off": [self._off_until, self._off_len], "on": [self._on_until, self._on_len], "phases": self._phases,
                "counts": [self.groups_judged, self.vetoes], "scale": [self._trial, self._tested]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        tails = {int(b): [float(s), int(n)] for b, s, n in sd["tails"]}
        d = [float(x) for x in sd["d"]][-self.window:]
        n_progress = [float(x) for x in sd["n_progress"]][-self.window:]
        if len(n_progress) != len(d):
            raise ValueError(f"judge state holds {len(d)} groups' d but {len(n_progress)} progress values")
        off_until, off_len = (int(x) for x in sd["off"])
        on_until, on_len = (int(x) for x in sd["on"])
        judged, vetoes = (int(x) for x in sd["counts"])
        self._tails, self.d, self.n_progress, self._off_until, self._off_len = tails, d, n_progress, off_until, off_len
        self._phases, self.groups_judged, self.vetoes = int(sd["phases"]), judged, vetoes
        self._on_until, self._on_len = on_until, on_len
        # no "scale": saved before the ramp existed, when every jump moved all of it; another start_scale: clamped
        trial, tested = (min(max(float(x), self.start_scale), 1.0) for x in sd.get("scale", [1.0, 1.0]))
        self._trial, self._tested = trial, tested
