"""Run statistics: torchmetrics aggregates for logging, and the end-of-fit report (table, JSON, plot)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchmetrics.aggregation import MaxMetric, MeanMetric, SumMetric

from hybrid_lightning.core.engine import StepReport
from hybrid_lightning.core.phases import Phase


class HybridMetrics:
    """Aggregates over the judged Predict phases of a fit (torchmetrics, on the CPU).

    Updated once per phase, not per step: per-step counts live in the report. Values are
    rank-identical because every decision is.
    """

    def __init__(self) -> None:
        self.residual = MeanMetric()  # mean |residual| (loss units)
        self.value = MeanMetric()  # mean q
        self.rollbacks = SumMetric()
        self.max_horizon = MaxMetric()

    def update(self, report: StepReport) -> None:
        r = report.phase_result
        if r is None:
            return
        if math.isfinite(r.residual):
            self.residual.update(abs(r.residual))
        self.value.update(r.value)
        self.rollbacks.update(0.0 if r.kept or r.refused else 1.0)
        self.max_horizon.update(float(r.horizon))

    @staticmethod
    def _get(metric: Any) -> float:
        if getattr(metric, "update_count", 0) == 0:
            return float("nan")
        return float(metric.compute())

    def values(self) -> dict[str, float]:
        return {"mean_abs_residual": self._get(self.residual), "mean_value": self._get(self.value),
                "rollbacks": self._get(self.rollbacks), "max_horizon": self._get(self.max_horizon)}


class _Curve:
    """(step, loss, phase) points with bounded memory: when full, keep every other point."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self.points: list[tuple[int, float, int]] = []
        self.every = 1
        self._seen = 0

    def add(self, step: int, loss: float, phase: Phase) -> None:
        self._seen += 1
        if self._seen % self.every:
            return
        self.points.append((step, loss, int(phase)))
        if len(self.points) >= self.capacity:
            self.points = self.points[::2]
            self.every *= 2


@dataclass
class HybridReport:
    """What the plugin did during one fit. ``cost_ratio`` is measured wall-clock, not assumed."""

    steps: dict[str, int] = field(default_factory=lambda: {p.name: 0 for p in Phase})
    seconds: dict[str, float] = field(default_factory=lambda: {p.name: 0.0 for p in Phase})
    backward_passes: int = 0  # optimizer steps that ran backward
    backward_skipped: int = 0  # optimizer steps that did not
    predict_phases: int = 0
    kept_phases: int = 0
    rollbacks: int = 0
    confirm_rollbacks: int = 0  # of the rollbacks: phases their own probe batch would have kept (divergence.confirm_*)
    refused_phases: int = 0  # line search: phases refused before their first step (not rollbacks)
    corrections_kept: int = 0
    divergence_events: int = 0
    skipped_nonfinite_steps: int = 0
    probe_forwards: int = 0
    dormant_steps: int = 0  # real steps with the dynamics model asleep (no Predict phase for a long time)
    budget_extensions: int = 0  # times a dormant period was lengthened by bandit.overhead_budget (can repeat)
    judged_groups: int = 0  # judge.block: J N N J groups judged
    judge_vetoes: int = 0  # ... after which the judge switched prediction off
    observe_share: float = float("nan")  # measured: observation time above a plain step / all step time
    mean_abs_residual: float = float("nan")
    mean_value: float = float("nan")  # q: loss progress per predicted step relative to a real one
    bandit_mean_reward: dict[str, float] = field(default_factory=dict)
    final_horizon_cap: int = 0
    curve: list[tuple[int, float, int]] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return sum(self.steps.values())

    @property
    def backward_skip_ratio(self) -> float:
        n = self.backward_passes + self.backward_skipped
        return self.backward_skipped / n if n else 0.0

    def _mean_seconds(self, phases: tuple[str, ...]) -> float:
        n = sum(self.steps[p] for p in phases)
        return sum(self.seconds[p] for p in phases) / n if n else float("nan")

    @property
    def cost_ratio(self) -> float:
        """Mean wall-clock of a predicted step over that of a real step, measured inside the callback's step
        window (the batch fetch and the loop's own work are not in it). A phase's probes, corrections and
        line-search trial forwards, refused phases' included, count as predicted-step time."""
        full = self._mean_seconds(("WARMUP", "FULL", "CORRECT"))
        pred = self._mean_seconds(("PREDICT",))
        return pred / full if full and math.isfinite(pred) and math.isfinite(full) else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(total_steps=self.total_steps, backward_skip_ratio=self.backward_skip_ratio,
                 cost_ratio=self.cost_ratio)
        d["curve"] = [list(p) for p in self.curve]
        return d

    def save_json(self, path: str | Path) -> None:
        def clean(x: Any) -> Any:
            if isinstance(x, float) and not math.isfinite(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x

        Path(path).write_text(json.dumps(clean(self.to_dict()), indent=2))

    def table(self) -> str:
        rows = [("phase", "steps", "seconds", "ms/step")]
        for p in Phase:
            n, s = self.steps[p.name], self.seconds[p.name]
            rows.append((p.name.lower(), str(n), f"{s:.2f}", f"{1000 * s / n:.2f}" if n else "-"))
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
        lines.insert(1, "  ".join("-" * x for x in w))

        def fmt(x: float) -> str:
            return "n/a" if not math.isfinite(x) else f"{x:.4g}"

        lines += [
            "",
            f"backward passes run / skipped : {self.backward_passes} / {self.backward_skipped} "
            f"({100 * self.backward_skip_ratio:.1f}% skipped)",
            f"predict phases kept / rolled back: {self.kept_phases} / {self.rollbacks}"
            f"  (by the confirmation: {self.confirm_rollbacks}; corrections kept: {self.corrections_kept}; "
            f"refused by the line search: {self.refused_phases})",
            f"divergence events              : {self.divergence_events}"
            f"  (non-finite real steps skipped: {self.skipped_nonfinite_steps})",
            f"mean |residual| (loss units)   : {fmt(self.mean_abs_residual)}",
            f"mean value q per predicted step: {fmt(self.mean_value)}  (1 = as good as a real step)",
            f"cost ratio predict/full step   : {fmt(self.cost_ratio)}  (measured wall-clock)",
            f"horizon cap at the end         : {self.final_horizon_cap}",
            f"dormant (monitor-only) steps   : {self.dormant_steps}"
            f"  (lengthened by the overhead budget: {self.budget_extensions} times)",
            f"observation time / step time   : {fmt(self.observe_share)}  (measured wall-clock)",
            f"block judge: groups / vetoes   : {self.judged_groups} / {self.judge_vetoes}",
        ]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> bool:
        """Loss over steps coloured by phase. Returns False when matplotlib is not installed."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        fig, ax = plt.subplots(figsize=(8, 4))
        colors = {Phase.WARMUP: "tab:gray", Phase.FULL: "tab:blue", Phase.PREDICT: "tab:orange",
                  Phase.CORRECT: "tab:green"}
        pts = torch.tensor(self.curve, dtype=torch.float64) if self.curve else torch.zeros(0, 3)
        for p, c in colors.items():
            sel = pts[pts[:, 2] == int(p)] if len(pts) else pts
            if len(sel):
                ax.scatter(sel[:, 0].numpy(), sel[:, 1].numpy(), s=4, color=c, label=p.name.lower())
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_title("hybrid_lightning: loss by phase")
        ax.legend(markerscale=3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return True
