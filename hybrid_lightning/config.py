"""HybridConfig: every knob of the plugin, as nested dataclasses that double as an OmegaConf schema.

``HybridConfig.from_yaml(path)`` merges a YAML file onto the schema: unknown keys, wrong types and
out-of-range values each raise one :class:`ConfigError` that names the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hybrid_lightning.errors import ConfigError

PREDICTORS = ("rssm", "constant_velocity", "dmd", "tail_average", "nowcast", "null", "drift")
PARAMETER_PREDICTORS = ("dmd", "tail_average", "nowcast", "null", "drift")  # predict a displacement of the parameters
ON_NONFINITE = ("skip", "raise")
AFTER_JUMP = ("keep", "zero_momentum", "reset")


@dataclass
class TrajectoryConfig:
    """How real updates are remembered and turned into a per-layer direction basis."""

    basis_rank: int = 1  # directions per layer: the EMA of real updates, plus top principal directions
    window: int = 0  # real updates kept for the principal directions (needs >= basis_rank when rank > 1)
    ema_decay: float = 0.9  # decay of the EMA of real updates (direction 0)
    basis_refresh: int = 10  # recompute principal directions every this many observed updates
    stride: int = 8  # read the real update every this many real steps (cost vs resolution)


@dataclass
class DynamicsConfig:
    """RSSM-lite sizes and online training."""

    hidden_dim: int = 32  # GRU state size
    latent_dim: int = 8  # stochastic latent size
    ensemble_size: int = 3  # independent members; their spread is part of the uncertainty
    samples: int = 4  # latent samples per member during a rollout
    learning_rate: float = 3e-3  # Adam learning rate of the online training
    bptt_window: int = 6  # truncated back-propagation through time, in observed steps
    train_every: int = 2  # one training update every this many observed steps
    kl_weight: float = 0.1  # weight of KL(posterior || prior) in the training loss
    confidence_decay: float = 0.95  # EMA decay of the one-step prediction error behind confidence
    drift_span: int = 10  # predictor "drift": observations (x trajectory.stride real steps) its velocity spans
    drift_gain: float = 1.0  # predictor "drift": real steps' worth of its velocity per predicted step
    # why: extrapolated norm growth made drift jumps over-sharpen the CNN (docs/predictors.md, tangential card)
    tangential: bool = False  # parameter predictors: less each tensor's part along itself (jumps turn, not grow)
    nowcaster: str = ""  # predictor "nowcast": weights from python -m hybrid_lightning.nowcast.train ("": shipped)


@dataclass
class ResidualConfig:
    capacity: int = 256  # residuals kept (ring buffer)


@dataclass
class CorrectorConfig:
    weight_correction: bool = True  # propose per-layer weight corrections (kept only if the probe improves)
    initial_gain: float = 0.5  # weight correction in 'missed steps' per unit of residual / progress rate
    max_gain: float = 2.0  # the gain grows 1.25x after a correction that helped, halves otherwise
    learning_rate: float = 0.05  # online SGD rate of the loss-residual model


@dataclass
class DivergenceConfig:
    window: int = 50  # history the monitor's statistics use
    min_history: int = 10  # observations before spike / explosion checks start
    loss_sigma: float = 6.0  # loss z-score that counts as a spike
    grad_explosion_factor: float = 10.0  # grad norm above factor x running median
    grad_vanishing_factor: float = 1e-4  # grad norm below factor x running median
    oscillation_threshold: float = 0.9  # fraction of sign flips of loss differences in the window
    rollback_tolerance: float = 0.0  # keep a phase if probe loss after <= before * (1 + tolerance)
    confirm_batches: int = 2  # a phase its probe would keep must also pass on up to this many earlier batches
    confirm_margin: float = 0.1  # ... unless the probe loss fell by more than this fraction (clearly better)


@dataclass
class BanditConfig:
    arms: list[int] | None = None  # predict horizons; 0 = "do not predict". None: 0 and 1/10, 1/4, 1/2, 1 x max
    alpha: float = 0.5  # LinUCB exploration width
    ridge: float = 1.0  # LinUCB ridge prior
    forward_cost: float = 0.33  # cost of a no-grad forward, in full-step units (reward bookkeeping)
    apply_cost: float = 0.005  # cost of composing and applying one predicted delta, in full-step units
    rollback_penalty: float = 1.0  # reward per rolled-back predicted step (a lost schedule step)
    value_floor: float = 1.0  # q a kept phase must beat to pay: with max_steps fixed, q < 1 costs final loss
    cooldown_steps: int = 100  # full steps without prediction once the horizon cap reaches 0 (doubles; 0: none)
    dormant_after: int = 100  # steps past min_full_steps with no Predict phase before the dynamics sleep (0: never)
    overhead_budget: float | None = 0.03  # share of step time observing may take; sleep on past it (None: no limit)


@dataclass
class JudgeConfig:
    """Judge prediction by its lasting value, from the training loss of stretches with and without phases."""

    block: int = 0  # steps per block after warmup, in groups J N N J; phases run only in J blocks (0: off)
    window: int = 4  # judged groups whose mean d decides; too low: no phase for 1, 2, 4 .. 32 groups
    margin: float = 0.5  # too low: mean d < -margin x the N blocks' progress (0.5: the J blocks made none)
    exploit: bool = True  # mean d >= 0: the next 1, 2, 4 .. 32 groups are J J J J, then J N N J again
    start_scale: float = 1.0  # first tests jump this x the predicted displacement, x2 per mean d >= 0 (1: no ramp)


@dataclass
class HybridConfig:
    """All plugin settings. Top-level fields are the phase machine's knobs."""

    warmup_steps: int = 100  # real steps before anything is predicted
    min_full_steps: int = 20  # real steps between two Predict phases
    max_predict_steps: int = 20  # longest Predict phase (0 disables prediction)
    predict_threshold: float = 0.6  # predict only when confidence > threshold
    correct_steps: int = 1  # real steps of the Correct phase after each Predict phase
    monitor_every: int = 0  # run the user's forward every k-th predicted step (0: only the paired probe)
    predictor: str = "rssm"  # "rssm", "constant_velocity"; research: "dmd", "drift", "tail_average", "nowcast", "null"
    on_nonfinite: str = "skip"  # real step with NaN/Inf gradients: "skip" it, or "raise"
    idle_read_every: int = 1  # on a GPU, while only monitoring: read losses k steps at a time (no sync, no NaN skip)
    after_jump: str = "keep"  # optimizer state after a kept Predict phase: "keep", "zero_momentum", or "reset"
    line_search: list[float] | None = None  # step lengths x the displacement, one probe each; none beats 0: no phase
    seed: int = 0  # seeds the dynamics model (initial weights, latent samples)
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    residuals: ResidualConfig = field(default_factory=ResidualConfig)
    corrector: CorrectorConfig = field(default_factory=CorrectorConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    bandit: BanditConfig = field(default_factory=BanditConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, source: str = "config") -> HybridConfig:
        """Build from a (nested) dict, rejecting unknown keys and wrong types."""
        schema = OmegaConf.structured(cls)
        try:
            merged = OmegaConf.merge(schema, OmegaConf.create(data or {}))
            cfg = OmegaConf.to_object(merged)
        except OmegaConfBaseException as err:
            raise ConfigError(_explain_omegaconf(err, source)) from None
        assert isinstance(cfg, cls)
        return cfg.validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> HybridConfig:
        """Load a YAML file (a mapping of HybridConfig fields; nested sections as nested mappings)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = OmegaConf.load(path)
        except Exception as err:  # yaml.YAMLError and friends: report them all as config errors
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not OmegaConf.is_dict(data):
            raise ConfigError(f"{path}: expected a mapping of HybridConfig fields, got {type(data).__name__}")
        return cls.from_dict(OmegaConf.to_container(data), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    # ------------------------------------------------------------------ derived values
    @property
    def horizons(self) -> list[int]:
        """Bandit arms: explicit ones, or 0 plus a tenth, a quarter, half and all of max_predict_steps."""
        if self.bandit.arms is not None:
            return sorted(set(self.bandit.arms))
        m = self.max_predict_steps
        return sorted({0, *(h for h in (m // 10, m // 4, m // 2, m) if h > 0)})

    # ------------------------------------------------------------------ validation
    def validate(self) -> HybridConfig:
        """Raise one ConfigError listing every impossible value; return self when all are valid."""
        problems: list[str] = []
        c = _Checker(problems)
        c.int_range("warmup_steps", self.warmup_steps, 0, None)
        c.int_range("min_full_steps", self.min_full_steps, 1, None)
        c.int_range("max_predict_steps", self.max_predict_steps, 0, 10_000)
        c.float_range("predict_threshold", self.predict_threshold, 0.0, 1.0)
        c.int_range("correct_steps", self.correct_steps, 1, 1_000)
        c.int_range("monitor_every", self.monitor_every, 0, None)
        c.choice("predictor", self.predictor, PREDICTORS)
        c.choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        c.int_range("idle_read_every", self.idle_read_every, 1, 10_000)
        c.choice("after_jump", self.after_jump, AFTER_JUMP)
        c.int_range("seed", self.seed, 0, 2**63 - 1)
        if self.line_search is not None:
            if not self.line_search:
                problems.append("line_search = [] tries no step length: give at least one, or None to switch it off")
            for i, a in enumerate(self.line_search):
                c.float_range(f"line_search[{i}]", a, 0.0, 100.0, lo_open=True)
            if self.predictor not in PARAMETER_PREDICTORS:
                names = ", ".join(map(repr, PARAMETER_PREDICTORS))
                problems.append(f"line_search scales a predicted displacement of the parameters; predictor "
                                f"{self.predictor!r} has none (use one of {names})")

        t = self.trajectory
        c.int_range("trajectory.basis_rank", t.basis_rank, 1, 16)
        c.int_range("trajectory.window", t.window, 0, 1_024)
        if t.basis_rank > 1 and t.window < t.basis_rank:
            problems.append(
                f"trajectory.window = {t.window} is too small for trajectory.basis_rank = {t.basis_rank}: "
                "principal directions need window >= basis_rank"
            )
        c.float_range("trajectory.ema_decay", t.ema_decay, 0.0, 1.0, lo_open=True, hi_open=True)
        c.int_range("trajectory.basis_refresh", t.basis_refresh, 1, None)
        c.int_range("trajectory.stride", t.stride, 1, 10_000)

        d = self.dynamics
        c.int_range("dynamics.hidden_dim", d.hidden_dim, 2, 4_096)
        c.int_range("dynamics.latent_dim", d.latent_dim, 1, 1_024)
        c.int_range("dynamics.ensemble_size", d.ensemble_size, 1, 64)
        c.int_range("dynamics.samples", d.samples, 1, 256)
        c.float_range("dynamics.learning_rate", d.learning_rate, 0.0, 1.0, lo_open=True)
        c.int_range("dynamics.bptt_window", d.bptt_window, 2, 1_024)
        c.int_range("dynamics.train_every", d.train_every, 1, None)
        c.int_range("dynamics.drift_span", d.drift_span, 1, 100_000)
        c.float_range("dynamics.drift_gain", d.drift_gain, 0.0, 1_000.0, lo_open=True)
        c.float_range("dynamics.kl_weight", d.kl_weight, 0.0, 100.0)
        c.float_range("dynamics.confidence_decay", d.confidence_decay, 0.0, 1.0, lo_open=True, hi_open=True)
        if d.nowcaster and not Path(d.nowcaster).is_file():
            problems.append(f"dynamics.nowcaster = {d.nowcaster!r} is not a file; train one with "
                            "python -m hybrid_lightning.nowcast.train, or leave it empty for the shipped weights")

        c.int_range("residuals.capacity", self.residuals.capacity, 1, 1_000_000)

        k = self.corrector
        c.float_range("corrector.initial_gain", k.initial_gain, 0.0, 100.0)
        c.float_range("corrector.max_gain", k.max_gain, 0.0, 100.0, lo_open=True)
        if k.initial_gain > k.max_gain:
            problems.append(
                f"corrector.initial_gain = {k.initial_gain} exceeds corrector.max_gain = {k.max_gain}"
            )
        c.float_range("corrector.learning_rate", k.learning_rate, 0.0, 1.0, lo_open=True)

        v = self.divergence
        c.int_range("divergence.window", v.window, 5, 100_000)
        c.int_range("divergence.min_history", v.min_history, 2, 100_000)
        if v.min_history > v.window:
            problems.append(
                f"divergence.min_history = {v.min_history} exceeds divergence.window = {v.window}"
            )
        c.float_range("divergence.loss_sigma", v.loss_sigma, 0.0, None, lo_open=True)
        c.float_range("divergence.grad_explosion_factor", v.grad_explosion_factor, 1.0, None, lo_open=True)
        c.float_range("divergence.grad_vanishing_factor", v.grad_vanishing_factor, 0.0, 1.0, lo_open=True,
                      hi_open=True)
        c.float_range("divergence.oscillation_threshold", v.oscillation_threshold, 0.0, 1.0, lo_open=True)
        c.float_range("divergence.rollback_tolerance", v.rollback_tolerance, 0.0, 10.0)
        c.int_range("divergence.confirm_batches", v.confirm_batches, 0, 16)
        c.float_range("divergence.confirm_margin", v.confirm_margin, 0.0, 1.0)

        j = self.judge
        c.int_range("judge.block", j.block, 0, None)
        if isinstance(j.block, int) and 0 < j.block < 4:
            problems.append(f"judge.block = {j.block} is too short: 0 (off), or >= 4 steps (a block's last quarter "
                            "stands for its end)")
        c.int_range("judge.window", j.window, 1, 1_000)
        c.float_range("judge.margin", j.margin, 0.0, 100.0)
        c.float_range("judge.start_scale", j.start_scale, 0.0, 1.0, lo_open=True)
        if j.block and j.start_scale != 1 and self.predictor not in PARAMETER_PREDICTORS:
            problems.append(f"judge.start_scale = {j.start_scale} scales a predicted displacement, which predictor "
                            f"{self.predictor!r} does not make: use one of {', '.join(PARAMETER_PREDICTORS)}, or 1")

        if self.dynamics.tangential and self.predictor not in PARAMETER_PREDICTORS:
            problems.append(f"dynamics.tangential projects a predicted displacement, which predictor "
                            f"{self.predictor!r} does not make: use one of {', '.join(PARAMETER_PREDICTORS)}, "
                            "or false")

        b = self.bandit
        if b.arms is not None:
            if len(b.arms) == 0:
                problems.append("bandit.arms = [] is empty: give at least [0] or leave it null")
            for arm in b.arms:
                if not isinstance(arm, int) or isinstance(arm, bool) or arm < 0:
                    problems.append(f"bandit.arms contains {arm!r}: arms must be integers >= 0")
                elif arm > self.max_predict_steps:
                    problems.append(
                        f"bandit.arms contains {arm}, above max_predict_steps = {self.max_predict_steps}: "
                        "arms must lie in [0, max_predict_steps]"
                    )
            if b.arms and 0 not in b.arms:
                problems.append(f"bandit.arms = {list(b.arms)} must include 0 (the 'do not predict' arm)")
        c.float_range("bandit.alpha", b.alpha, 0.0, 100.0)
        c.float_range("bandit.ridge", b.ridge, 0.0, None, lo_open=True)
        c.float_range("bandit.forward_cost", b.forward_cost, 0.0, 10.0)
        c.float_range("bandit.apply_cost", b.apply_cost, 0.0, 10.0)
        c.float_range("bandit.rollback_penalty", b.rollback_penalty, 0.0, 100.0)
        c.float_range("bandit.value_floor", b.value_floor, 0.0, 5.0)
        c.int_range("bandit.cooldown_steps", b.cooldown_steps, 0, None)
        c.int_range("bandit.dormant_after", b.dormant_after, 0, None)
        if b.overhead_budget is not None:
            c.float_range("bandit.overhead_budget", b.overhead_budget, 0.0, 1.0, lo_open=True)

        if problems:
            raise ConfigError("invalid HybridConfig:\n  - " + "\n  - ".join(problems))
        return self


class _Checker:
    """Collects range/type problems as human-readable lines."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    def int_range(self, name: str, value: Any, lo: int, hi: int | None) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            self.problems.append(f"{name} = {value!r} must be an integer")
            return
        if value < lo or (hi is not None and value > hi):
            upper = "" if hi is None else f" and <= {hi}"
            self.problems.append(f"{name} = {value} is out of range: must be >= {lo}{upper}")

    def float_range(self, name: str, value: Any, lo: float, hi: float | None, *, lo_open: bool = False,
                    hi_open: bool = False) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problems.append(f"{name} = {value!r} must be a number")
            return
        bad = (
            not math.isfinite(value)
            or (value <= lo if lo_open else value < lo)
            or (hi is not None and (value >= hi if hi_open else value > hi))
        )
        if bad:
            left = "(" if lo_open else "["
            right = ")" if hi_open or hi is None else "]"
            upper = "inf" if hi is None else f"{hi:g}"
            self.problems.append(f"{name} = {value!r} is out of range: must lie in {left}{lo:g}, {upper}{right}")

    def choice(self, name: str, value: Any, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            self.problems.append(f"{name} = {value!r} is not one of {', '.join(map(repr, allowed))}")


def _explain_omegaconf(err: OmegaConfBaseException, source: str) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).splitlines()[0]
    if type(err).__name__ == "ConfigKeyError":
        return f"{source}: unknown key {key!r} (not a HybridConfig field; check the spelling): {msg}"
    return f"{source}: invalid value for {key!r}: {msg}"

