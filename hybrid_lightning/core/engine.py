"""HybridEngine: owns state, trajectory, dynamics, residuals, corrector, monitor and bandit.

Protocol, once per optimizer step::

    plan = engine.plan()                 # what this step does: real step, or a delta to apply
    ... run the step (real: forward/backward/optimizer; predicted: engine.apply(plan)) ...
    report = engine.observe(StepObservation(loss=..., grad_norm=...), probe=probe)

``probe`` evaluates the training loss (no grad) on the step's batch at the *current* parameters
and returns a float that is identical on every process. At the end of a Predict phase the engine
calls it twice, once with the phase's result and once with the pre-phase snapshot swapped in: the
phase is kept only if it did not raise the loss on that same batch; otherwise it is rolled back
bit for bit. Every decision depends only on the observations, the parameters and the seed, so
the engine is deterministic, rank-consistent, and resumes exactly from ``state_dict()`` -- with one
exception by design: a caller that reports step times (``record_seconds``) lets
``bandit.overhead_budget`` lengthen dormant periods by wall-clock, so when the engine wakes, and what
it predicts after, can differ between runs. ``overhead_budget: None`` (or reporting no times) makes
the schedule step-exact again.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hybrid_lightning.config import HybridConfig
from hybrid_lightning.core.bandit import LinUCB, phase_reward
from hybrid_lightning.core.budget import OverheadBudget
from hybrid_lightning.core.corrector import ResidualCorrector
from hybrid_lightning.core.divergence import DivergenceMonitor, DivergenceReport, Level
from hybrid_lightning.core.dynamics import (
    DynamicsModel,
    ParameterDynamics,
    Prediction,
    make_dynamics,
    predict_y_steps,
)
from hybrid_lightning.core.judge import BlockJudge
from hybrid_lightning.core.phases import (
    Phase,
    PhaseLimits,
    PhaseState,
    initial_state,
    next_phase,
    ready_to_predict,
)
from hybrid_lightning.core.residuals import Residual, ResidualStore
from hybrid_lightning.core.state import TrainingState
from hybrid_lightning.core.trajectory import Trajectory
from hybrid_lightning.errors import HybridTrainingError, NumericalError, RecoveryAction

STATE_VERSION = 1

Probe = Callable[[], float]


@dataclass
class StepPlan:
    step: int  # index of this optimizer step (0-based)
    phase: Phase
    delta: list[Tensor] | None = None  # predicted step: add this to the parameters
    run_forward: bool = True  # predicted step: run the user's forward for monitoring
    measure_grad_norm: bool = False  # real step: report the gradient norm before clipping
    # real step while the engine only monitors: loss and grad_norm may be observed unread (device tensors); the
    # engine reads them config.idle_read_every steps at a time, so the caller need not sync the device each step
    read_late: bool = False
    predicted_loss: float | None = None  # predicted step: loss expected at the current parameters
    predicted_std: float | None = None

    @property
    def runs_backward(self) -> bool:
        return self.phase.runs_backward


@dataclass
class StepObservation:
    # mean training loss of the step over all processes (None: no forward ran); a 1-element tensor where the plan
    # says read_late
    loss: float | Tensor | None = None
    grad_norm: float | Tensor | None = None  # global gradient norm before clipping (real steps, when asked)
    skipped: bool = False  # the real step's optimizer update was skipped (non-finite gradients)


@dataclass
class PhaseResult:
    """How one Predict phase was judged."""

    start_step: int
    horizon: int  # steps the bandit chose
    steps: int  # steps executed (fewer after an alarm)
    loss_before: float  # probe loss at the snapshot
    loss_after: float  # probe loss after the phase (after the correction, if one was kept)
    predicted_change: float
    residual: float  # actual - predicted change (loss units)
    value: float  # q: loss progress per predicted step relative to a real step
    reward: float
    kept: bool
    corrected: bool
    reason: str
    correction_loss: float = float("nan")  # probe loss with the proposed weight correction (nan: none tried)
    loss_uncorrected: float = float("nan")  # probe loss after the phase, before any correction
    progress_rate: float = float("nan")  # loss decrease per real step when the phase was judged
    step_length: float = 1.0  # multiple of the predicted displacement applied (line_search; 0: refused)

    @property
    def refused(self) -> bool:
        """Refused by the line search before its first step: nothing moved, nothing was rolled back."""
        return self.reason == "line_search"

    @property
    def raw_value(self) -> float:
        """q measured on the probe before the keep/rollback decision (value is 0 for rolled-back phases)."""
        after = self.loss_uncorrected if self.kept else self.loss_after
        return (self.loss_before - after) / (max(self.steps, 1) * self.progress_rate)


@dataclass
class StepReport:
    step: int
    phase: Phase
    next_phase: Phase
    events: list[HybridTrainingError] = field(default_factory=list)
    phase_result: PhaseResult | None = None
    dormant: bool = False  # the engine was dormant during this step (monitor only)
    # (step, loss, grad_norm) of earlier steps whose values were read late, read now
    late_values: list[tuple[int, float | None, float | None]] = field(default_factory=list)

    @property
    def rolled_back(self) -> bool:
        r = self.phase_result
        return r is not None and not r.kept and not r.refused  # a refused phase never moved the weights


class HybridEngine:
    """The Warmup -> Full -> Predict -> Correct loop over a list of parameter tensors."""

    def __init__(self, params: Sequence[Tensor], config: HybridConfig | None = None, *,
                 names: Sequence[str] | None = None, buffers: Sequence[Tensor] = (),
                 dynamics: DynamicsModel | None = None) -> None:
        self.config = cfg = (config or HybridConfig()).validate()
        self.limits = PhaseLimits(cfg.warmup_steps, cfg.min_full_steps, cfg.max_predict_steps, cfg.correct_steps,
                                  cfg.predict_threshold)
        # parameter-sized buffers only once something will observe (never in monitor-only mode)
        self.trajectory = Trajectory(params, cfg.trajectory, names=names, buffers=buffers, track=False)
        L, K = self.trajectory.n_layers, self.trajectory.rank
        self.state = TrainingState(history=max(cfg.divergence.window, 2))
        self.dynamics: DynamicsModel = dynamics or make_dynamics(cfg.predictor, L, K, cfg.dynamics, cfg.seed)
        self.residuals = ResidualStore(cfg.residuals.capacity)
        self.corrector = ResidualCorrector(L, K, cfg.corrector)
        self.monitor = DivergenceMonitor(cfg.divergence)
        self.bandit = LinUCB(cfg.horizons, cfg.bandit.alpha, cfg.bandit.ridge)
        j = cfg.judge
        self.judge = (BlockJudge(cfg.warmup_steps, j.block, j.window, j.margin, j.exploit, j.start_scale)
                      if j.block else None)
        self._line_search = bool(cfg.line_search) and isinstance(self.dynamics, ParameterDynamics)
        self.phase_state: PhaseState = initial_state(self.limits)
        self.step = 0
        # Steps this run takes in all, when the caller knows (the Lightning adapter sets it at each fit start).
        # A Predict phase that could not end, and be judged, by then is not started: the run would otherwise
        # end on predicted weights nobody checked. Not persisted: a resumed run may have another length.
        self.step_limit: int | None = None
        self._plan: StepPlan | None = None
        self._prediction: Prediction | None = None
        self._displacement: Tensor | None = None  # whole-phase parameter change from a ParameterDynamics model
        self._phase_start: dict[str, Any] | None = None
        self._block_loss = 0.0
        self._block_count = 0
        self._last_block_loss: float | None = None
        self._horizon_cap = self._first_horizon_cap()
        self._cooldown_until = 0
        self._cooldown_len = cfg.bandit.cooldown_steps
        # dormancy: min_full_steps + dormant_after real steps without a Predict phase -> stop observing for a while
        self._awake_since = cfg.warmup_steps
        self._dormant_until = 0
        self._dormant_len = cfg.bandit.dormant_after
        self.budget = OverheadBudget(cfg.bandit.overhead_budget)
        self._last_kind: str | None = None  # what the last observed step was, for record_seconds
        self._observed = False
        # (step, loss, grad_norm, stride_done) of monitored steps not read yet; stride_done: the step closed a stride
        self._late: list[tuple[int, Any, Any, bool]] = []
        self._late_read: list[tuple[int, float | None, float | None]] = []  # read since the last report
        # Under DDP: the mean of a number over all processes (set by the adapter), so that a decision taken
        # from each process's own clock is the same on every process. None: one process.
        self.mean_across_processes: Callable[[float], float] | None = None
        self.counters: dict[str, int] = {
            "real_steps": 0, "predicted_steps": 0, "skipped_steps": 0, "phases": 0, "kept": 0, "rollbacks": 0,
            "corrections_tried": 0, "corrections_kept": 0, "probe_forwards": 0, "monitor_forwards": 0,
            "divergence_events": 0, "dormant_steps": 0, "dormant_periods": 0, "refused": 0, "confirm_rollbacks": 0,
            "budget_extensions": 0, "judged_groups": 0, "judge_vetoes": 0,
        }
        self._refused_in_row = 0  # line search: phases refused in a row (enough of them start a cooldown)
        self.last_phase_result: PhaseResult | None = None
        self._events: list[HybridTrainingError] = []  # raised since the last report
        self._unreported: PhaseResult | None = None  # judged inside plan(), reported by the next observe()
        # the last steps' probes (the newest last): a phase the newest would keep is confirmed on the others.
        # Not checkpointed: they hold batches; after a resume the confirmation uses the probes seen since.
        self._recent_probes: deque[Probe] = deque(maxlen=cfg.divergence.confirm_batches + 1)
        if self.prediction_enabled:
            self.trajectory.sync()

    # ------------------------------------------------------------------ read-only views
    @property
    def phase(self) -> Phase:
        return self.phase_state.phase

    @property
    def prediction_enabled(self) -> bool:
        """False when the config makes a Predict phase impossible (threshold >= 1, no horizon > 0)."""
        return (self.limits.max_predict_steps > 0 and self.limits.predict_threshold < 1.0
                and max(self.bandit.arms) > 0)

    def confidence(self) -> float:
        return float(min(max(self.dynamics.confidence(), 0.0), 1.0))

    @property
    def dormant(self) -> bool:
        """True while the engine only monitors, because it has not predicted for a long time.

        The trajectory and the dynamics model are idle (they cost nothing), and no Predict phase
        starts; the divergence monitor keeps checking every real step."""
        return self.step < self._dormant_until

    @property
    def horizon_cap(self) -> int:
        return self._horizon_cap

    # ------------------------------------------------------------------ plan
    def plan(self) -> StepPlan:
        """What the next optimizer step does. Idempotent until ``observe`` is called."""
        if self._plan is not None and self._plan.step == self.step:
            return self._plan
        ps = self.phase_state
        if ps.phase is Phase.PREDICT:
            if self._prediction is None:
                self._begin_predict()
            plan = self._plan_predicted_step()
        else:
            due = self.trajectory._since_sync + 1 >= self.config.trajectory.stride
            plan = StepPlan(self.step, ps.phase, measure_grad_norm=due, read_late=self._may_read_late())
        self._plan = plan
        return plan

    def _may_read_late(self) -> bool:
        """This step and the next only monitor, so nothing decided before the next step needs its values."""
        if self.config.idle_read_every <= 1 or self.phase_state.phase is not Phase.FULL or self.judge is not None:
            return False  # (the judge needs each loss at its step)
        if not self.prediction_enabled:
            return True
        return self.dormant and self.step + 1 < self._dormant_until  # the waking step reads everything

    def _begin_predict(self) -> None:
        ps = self.phase_state
        if not self.trajectory.tracking:  # a state saved as the phase was chosen, resumed after a release
            self._resync()
        self.trajectory.snapshot()
        features = self.state.features()
        loss0 = self.state.loss
        floor = min(0.0, min(self.state.losses, default=0.0))
        pred = predict_y_steps(self.dynamics, ps.horizon, self.config.trajectory.stride, loss0, floor)
        shift = self.corrector.loss_correction(features, self.residuals, self.state.loss_scale)
        if shift:
            pred.loss = (pred.loss + shift * torch.arange(1, ps.horizon + 1) / ps.horizon).clamp_min(floor)
        self._prediction = pred
        self._displacement = None
        if isinstance(self.dynamics, ParameterDynamics):
            self._displacement = self.dynamics.predict_displacement(self.trajectory, ps.horizon)
            if self._displacement is not None and self.config.dynamics.tangential:
                self._displacement = self.trajectory.tangential(self._displacement)
            scale = 1.0 if self.judge is None else self.judge.scale(self.step)
            if self._displacement is not None and scale != 1.0:
                self._displacement = self._displacement.mul(scale)  # not in place: it may be the predictor's own
        self._phase_start = {"step": self.step, "horizon": ps.horizon, "features": features, "loss0": loss0,
                             "forwards": 0}
        self.counters["phases"] += 1
        self._awake_since = self.step
        if self.judge is not None:
            self.judge.phase_started(self.step)

    def _begin_with_line_search(self, probe: Probe) -> PhaseResult | None:
        """Start the Predict phase now, with the predicted displacement scaled by the step length of
        ``config.line_search`` whose probe loss (on this real step's batch) is lowest. If none is lower
        than not moving, refuse the phase before it takes a step: -> its result (see ``_refuse``)."""
        self._begin_predict()
        start, disp, traj = self._phase_start, self._displacement, self.trajectory
        assert start is not None and self.config.line_search is not None
        start["step_length"] = 0.0
        if disp is None:
            return self._refuse()  # nothing predicted (e.g. DMD refilling its snapshots after waking)
        best_len, best = 0.0, float(probe())
        for a in self.config.line_search:
            traj.apply(traj.delta_from_flat(disp, a))
            try:
                loss = float(probe())
            finally:
                traj.restore_snapshot()
            if loss < best:  # NaN never wins
                best_len, best = a, loss
        n = 1 + len(self.config.line_search)
        start["forwards"] += n
        self.counters["probe_forwards"] += n
        start["step_length"] = best_len
        if best_len == 0.0:
            return self._refuse()
        disp.mul_(best_len)
        return None

    def _refuse(self) -> PhaseResult:
        """End the phase before its first step; nothing moved, so Full (not Correct) follows."""
        result = self._finish_phase(None, forced_reason="line_search")
        self.phase_state = PhaseState(Phase.FULL)
        return result

    def _plan_predicted_step(self) -> StepPlan:
        pred = self._prediction
        assert pred is not None and self._phase_start is not None
        y = self.phase_state.steps_in_phase
        if self._displacement is not None:
            delta = self.trajectory.delta_from_flat(self._displacement, 1.0 / self.phase_state.horizon)
        else:
            delta = self.trajectory.compose(pred.coeffs[y])
        if not self.trajectory.is_finite(delta):
            # refuse: undo the phase now, and run this step as the first real step of Correct
            self._events.append(NumericalError("predicted delta contains NaN/Inf; refused, phase rolled back"))
            self._unreported = self._finish_phase(None, forced_reason="nonfinite_delta")
            self.phase_state = PhaseState(Phase.CORRECT)
            return StepPlan(self.step, Phase.CORRECT, measure_grad_norm=True)
        every = self.config.monitor_every
        run_forward = every > 0 and y % every == 0
        expected = float(pred.loss[y - 1]) if y > 0 else self._phase_start["loss0"]
        std = float(pred.loss_std[y - 1]) if y > 0 else 0.0
        return StepPlan(self.step, Phase.PREDICT, delta=delta, run_forward=run_forward, predicted_loss=expected,
                        predicted_std=std)

    def apply(self, plan: StepPlan) -> None:
        """Apply a predicted step's delta to the parameters (in place)."""
        if plan.delta is None:
            raise ValueError(f"step {plan.step} is a {plan.phase.name} step; it has no delta to apply")
        self.trajectory.apply(plan.delta)

    # ------------------------------------------------------------------ observe
    def observe(self, obs: StepObservation, probe: Probe | None = None) -> StepReport:
        """Record the step that ``plan()`` described, judge phases, and choose the next phase."""
        plan = self.plan() if self._plan is None else self._plan
        if plan.step != self.step:
            raise RuntimeError(f"observe() for step {self.step} but the plan is for step {plan.step}")
        self._plan = None
        if probe is not None and self.config.divergence.confirm_batches and self.prediction_enabled \
                and not self.dormant:
            # only while a phase can follow: no phase ends within min_full_steps of waking, so none misses one
            self._recent_probes.append(probe)
        report = StepReport(self.step, plan.phase, plan.phase, phase_result=self._unreported)
        self._unreported = None
        ps = self.phase_state
        report.dormant = self.dormant
        self._observed = False  # set by whatever reads the parameters for the trajectory on this step
        if plan.read_late and not obs.skipped and _unread(obs):
            div = self._observe_late(obs)
        else:
            self.read_late()  # what was observed before this step first, in order
            if _unread(obs):  # a caller's tensors on a step that needs its values now
                obs = StepObservation(_host(obs.loss), _host(obs.grad_norm), obs.skipped)
            if plan.phase is Phase.PREDICT:
                div = self._observe_predicted(plan, obs)
            else:
                div = self._observe_real(obs)
        if div.error is not None:
            self._events.append(div.error)
            self.counters["divergence_events"] += 1
        alarm = div.alarm
        if self.judge is not None:
            if plan.phase is not Phase.PREDICT and not obs.skipped and obs.loss is not None:
                self.judge.record(self.step, float(obs.loss))
            self.judge.end_step(self.step)
            self.counters["judged_groups"], self.counters["judge_vetoes"] = self.judge.groups_judged, self.judge.vetoes
        self.step += 1

        if plan.phase is Phase.PREDICT:
            if alarm or ps.steps_in_phase + 1 >= ps.horizon:
                reason = "alarm:" + ",".join(div.signals) if alarm else None
                report.phase_result = self._finish_phase(probe, forced_reason=reason)
            self.phase_state = next_phase(ps, self.step, self.confidence(), alarm, 0, self.limits)
        else:
            if alarm or div.action is RecoveryAction.REDUCE_HORIZON:
                self._shrink_horizon()
            if self._update_dormancy(ps.phase):
                ps = PhaseState(Phase.FULL)  # just woke: min_full_steps of fresh observations before predicting
            self.phase_state = self._next_after_real(ps, alarm)
            if self.phase_state.phase is Phase.PREDICT and self._line_search and probe is not None:
                report.phase_result = self._begin_with_line_search(probe)
        report.next_phase = self.phase_state.phase
        report.events, self._events = self._events, []
        report.late_values, self._late_read = self._late_read, []
        if plan.phase is Phase.PREDICT or obs.skipped or report.phase_result is not None or \
                report.next_phase is Phase.PREDICT:
            self._last_kind = "other"  # prediction's own cost: the bandit weighs it, not the budget
        else:
            self._last_kind = "observe" if self._observed else "plain"
        return report

    def record_seconds(self, seconds: float) -> None:
        """The wall-clock of the step just observed, from its start to the end of ``observe``.

        It feeds ``config.bandit.overhead_budget``; a caller that never reports times gets the
        step-count dormancy alone. With several processes, set ``mean_across_processes`` first:
        each process's clock differs, and processes that wake at different steps would then
        disagree about which steps run backward."""
        if self._last_kind is not None:
            self.budget.record(seconds, self._last_kind)
            self._last_kind = None

    def _observe_predicted(self, plan: StepPlan, obs: StepObservation) -> DivergenceReport:
        self.counters["predicted_steps"] += 1
        self.state.record_predicted(obs.loss)
        if obs.loss is None:
            return DivergenceReport()
        self.counters["monitor_forwards"] += 1
        assert self._phase_start is not None
        self._phase_start["forwards"] += 1
        return self.monitor.check_predicted(obs.loss, plan.predicted_loss, plan.predicted_std)

    def _observe_late(self, obs: StepObservation) -> DivergenceReport:
        """A monitored step whose values are read later: its bookkeeping now, the monitor's checks at the read."""
        self.counters["real_steps"] += 1
        if self.dormant:
            self.counters["dormant_steps"] += 1
        stride_done = self.trajectory.step_taken()
        if stride_done:
            self.trajectory.skip_observation()
        self._late.append((self.step, obs.loss, obs.grad_norm, stride_done))
        if len(self._late) >= self.config.idle_read_every:
            self.read_late()
        return DivergenceReport()

    def read_late(self) -> None:
        """Read the monitored steps' values not read yet, in one host transfer, and check and record them in order.

        The engine calls it every ``idle_read_every`` such steps and before any other step; call it at the end
        of training. A non-finite loss found here was not skipped: its update reached the weights."""
        late, self._late = self._late, []
        if not late:
            return
        for (step, _, _, stride_done), (loss, norm) in zip(late, _read_waiting(late), strict=True):
            div = self.monitor.check_real(loss, norm)
            self.state.record_real(loss if loss is not None else float("nan"), norm)
            if not stride_done and loss is not None and math.isfinite(loss):  # as _observe_real does
                self._block_loss += loss
                self._block_count += 1
            if div.error is not None:
                err = div.error  # reported with a later step: say which step it is about
                self._events.append(type(err)(f"step {step}, read late: {err}", err.recovery))
                self.counters["divergence_events"] += 1
            if div.alarm or div.action is RecoveryAction.REDUCE_HORIZON:
                self._shrink_horizon(after=step)
            self._late_read.append((step, loss, norm))

    def end_of_training(self, probe: Probe | None) -> PhaseResult | None:
        """Training stopped inside a Predict phase (early stopping, a time limit): judge the phase now, as at its
        end, so the run does not end on predicted weights nobody checked. Without a probe, roll it back."""
        if self.phase_state.phase is not Phase.PREDICT or self._phase_start is None:
            self.release_probes()
            return None
        result = self._finish_phase(probe, forced_reason=None if probe is not None else "end_of_training")
        self.release_probes()
        self.phase_state = PhaseState(Phase.FULL)
        self._plan = None
        return result

    def flush(self) -> tuple[list[tuple[int, float | None, float | None]], list[HybridTrainingError]]:
        """At the end of training: read what waits. -> (step, loss, grad_norm) and events not reported yet."""
        self.read_late()
        self.release_probes()
        late, self._late_read = self._late_read, []
        events, self._events = self._events, []
        return late, events

    def _observe_real(self, obs: StepObservation) -> DivergenceReport:
        self.counters["real_steps"] += 1
        if obs.skipped:
            self.counters["skipped_steps"] += 1
            self.state.record_real(float("nan"))
            err = NumericalError(f"step {self.step}: non-finite gradients; the optimizer update was skipped",
                                 RecoveryAction.FORCE_FULL)
            return DivergenceReport(Level.CRITICAL, ["nonfinite"], RecoveryAction.FORCE_FULL, err)
        loss = obs.loss
        div = self.monitor.check_real(loss, obs.grad_norm)
        upd = None
        if self.dormant:
            self.counters["dormant_steps"] += 1
        if self.trajectory.step_taken():
            idle = not self.prediction_enabled or self.dormant
            if idle or not self.trajectory.tracking:
                if idle:  # nothing will be predicted for a while: monitor only, skip the trajectory and the dynamics
                    self.trajectory.skip_observation()
                else:  # a state saved while not tracking, resumed with prediction on: track from here
                    self._resync()
                self.state.record_real(loss if loss is not None else float("nan"), obs.grad_norm)
                return div
            upd = self.trajectory.record_real()
            self._observed = True
            if isinstance(self.dynamics, ParameterDynamics):
                self.dynamics.observe_params(self.trajectory)
            if not math.isfinite(upd.norm):
                raise NumericalError(
                    f"step {self.step}: parameters became NaN/Inf on a real (backward + optimizer) step; "
                    "this is not caused by prediction and cannot be rolled back. Lower the learning rate or "
                    "enable gradient clipping.", RecoveryAction.ABORT)
        self.state.record_real(loss if loss is not None else float("nan"), obs.grad_norm,
                               None if upd is None else upd.norm, None if upd is None else upd.cosine,
                               None if upd is None else upd.param_norm)
        if loss is not None and math.isfinite(loss):
            self._block_loss += loss
            self._block_count += 1
        if upd is not None:
            block = self._block_loss / self._block_count if self._block_count else None
            if block is not None and self._last_block_loss is not None:
                per_step = (block - self._last_block_loss) / self.config.trajectory.stride
                self.dynamics.observe(self.state.features(), per_step, upd.coeffs)
            self._last_block_loss = block
            self._block_loss, self._block_count = 0.0, 0
        return div

    def _resync(self) -> None:
        """The parameters moved other than by observed real steps: observe afresh from here."""
        self._observed = True  # reading the parameters is observation work (the budget charges it)
        self.trajectory.sync()
        self._last_block_loss = None
        self._block_loss, self._block_count = 0.0, 0

    def _update_dormancy(self, phase: Phase) -> bool:
        """Fall asleep after ``min_full_steps + dormant_after`` real steps (plus the predictor's own history,
        if it needs one) without a Predict phase; wake when the period (``dormant_after``, doubling up to
        32x until a phase pays) ends. -> True when the engine just woke."""
        base = self.config.bandit.dormant_after
        enabled = base > 0 and self.prediction_enabled  # a resumed run may have switched either off
        if self._dormant_until and (self.step >= self._dormant_until or not enabled):
            owed = self._steps_owed() if enabled else 0
            if owed > 0:  # observing has cost more than the budget allows: sleep until it is repaid
                self._dormant_until = self.step + owed
                self.counters["budget_extensions"] += 1
                return False
            # wake: the parameters moved while nobody looked; observe afresh from here
            self._dormant_until = 0
            self._awake_since = self.step
            if self.prediction_enabled:  # else it only monitors from here, without the trajectory's buffers
                self._resync()
            restart = getattr(self.dynamics, "restart", None)
            if callable(restart):
                restart()
            return True
        if not enabled or self.dormant or phase is not Phase.FULL:
            return False
        history = getattr(self.dynamics, "history_steps", None)
        needs = self.limits.min_full_steps + base + (history(self.config.trajectory.stride) if callable(history) else 0)
        if self.step - self._awake_since >= needs:
            # no Predict phase can start during a bandit cooldown either: sleep through it
            self._dormant_until = max(self.step + self._dormant_len, self._cooldown_until)
            self._dormant_len = min(2 * self._dormant_len, 32 * base)
            self.counters["dormant_periods"] += 1
            self._release_while_idle()
        return False

    def _steps_owed(self) -> int:
        owed = self.budget.steps_owed()
        if self.mean_across_processes is not None:  # every process must wake at the same step
            # the ceiling of the mean: while any process still owes, all sleep a little longer
            owed = math.ceil(self.mean_across_processes(float(owed)))
        return max(0, int(owed))

    def _release_while_idle(self) -> None:
        """Free the parameter-sized buffers that nothing reads while the engine only monitors: the
        trajectory's previous parameters and scratch, a parameter predictor's snapshot history (both
        start afresh when the engine wakes)."""
        self.release_probes()
        if self.trajectory.has_snapshot:
            return
        self.trajectory.release()
        restart = getattr(self.dynamics, "restart", None)  # optional in both protocols
        if isinstance(self.dynamics, ParameterDynamics) and callable(restart):
            restart()

    def _next_after_real(self, ps: PhaseState, alarm: bool) -> PhaseState:
        horizon = 0
        done = PhaseState(ps.phase, ps.steps_in_phase + 1, ps.horizon)
        conf = self.confidence()
        if ready_to_predict(done, conf, alarm, self.limits) and not self.dormant and self.trajectory.tracking:
            cap = self._horizon_cap
            if self.step_limit is not None:
                cap = min(cap, self.step_limit - self.step)  # predicted steps self.step .. self.step + h - 1
            if self.judge is not None:  # only inside a J block, and not on into the next block
                cap = min(cap, self.judge.steps_left(self.step)) if self.judge.may_predict(self.step) else 0
            if self.step >= self._cooldown_until and cap > 0:
                horizon = self.bandit.choose(self.state.features(), cap, prefer_long=self._line_search)
        return next_phase(ps, self.step, conf, alarm, horizon, self.limits)

    # ------------------------------------------------------------------ judging a phase
    def _probe_pair(self, probe: Probe) -> tuple[float, float]:
        after = float(probe())
        self.trajectory.swap_snapshot()
        try:
            before = float(probe())
        finally:
            self.trajectory.swap_snapshot()
        self.counters["probe_forwards"] += 2
        return before, after

    def _finish_phase(self, probe: Probe | None, forced_reason: str | None) -> PhaseResult:
        """Judge the Predict phase that just ended: keep (maybe correct) or roll back. Then resync."""
        start, pred = self._phase_start, self._prediction
        assert start is not None and pred is not None
        cfg = self.config
        steps = max(self.step - start["step"], 0)
        forwards = start["forwards"]
        before = after = float("nan")
        kept, corrected, reason = False, False, forced_reason or "probe"
        marginal = False  # its probe batch would keep it, but not by a clear margin: confirmed on earlier batches
        refused = forced_reason == "line_search"  # before the first step: the parameters never moved
        correction_loss = float("nan")
        uncorrected = float("nan")
        if forced_reason is None and probe is not None:
            before, after, alarm = self._judge_on(probe)
            forwards += 2
            kept = not alarm
            marginal = kept and after >= before - cfg.divergence.confirm_margin * abs(before)
            if marginal:  # its batch alone may be noise
                kept, extra = self._confirm(probe)
                forwards += extra
                reason = "probe" if kept else "confirm"
        elif forced_reason is None:
            reason = "no_probe"
        predicted_change = float(pred.loss[steps - 1]) - start["loss0"] if steps > 0 else 0.0
        actual = after - before
        residual = actual - predicted_change
        rate = self.state.progress_rate()
        value = -actual / (max(steps, 1) * rate) if kept else 0.0
        value = max(-5.0, min(5.0, value)) if math.isfinite(value) else 0.0

        if kept:
            uncorrected = after
            self.trajectory.drop_snapshot()
            # a correction is judged on the one probe batch: not on a phase that batch alone could not settle
            if probe is not None and math.isfinite(residual) and not marginal:
                corrected, after, correction_loss, extra = self._try_correction(probe, start["features"], residual,
                                                                                 rate, after)
                forwards += extra
            self.counters["kept"] += 1
        elif refused:
            self.trajectory.drop_snapshot()  # and no resync: the stride and the block loss carry on
            self.counters["refused"] += 1
        else:
            self.trajectory.rollback()
            self.counters["rollbacks"] += 1
        if not refused:
            self._resync()

        scale = self.state.loss_scale
        if math.isfinite(residual):
            r = Residual(self.step, steps, predicted_change, actual, start["features"])
            self.residuals.add(r)
            self.corrector.update_from_residual(r, scale)
            self.dynamics.observe_residual(residual / scale)
        elif not kept and not refused:
            self.dynamics.observe_residual(10.0)
        if refused:  # only the trial forwards were spent, over the steps the phase would have run: no step lost
            reward = phase_reward(0.0, False, start["horizon"], forwards, cfg.bandit.forward_cost, 0.0, 0.0)
        else:
            reward = phase_reward(value, kept, steps, forwards, cfg.bandit.forward_cost, cfg.bandit.apply_cost,
                                  cfg.bandit.rollback_penalty, cfg.bandit.value_floor)
        self.bandit.update(start["horizon"], start["features"], reward)
        self.state.record_phase_outcome(None if refused else not kept,
                                        residual / scale if math.isfinite(residual) else 0.0, value)
        if refused:
            # its horizon did not make it bad: keep the horizon, but as many refusals in a row as it takes
            # rejected phases to shrink the cap to 0 start the same doubling cooldown
            self._refused_in_row += 1
            if self._refused_in_row >= sum(a > 0 for a in self.bandit.arms):
                self._start_cooldown()
        else:
            self._refused_in_row = 0
        if kept and value > cfg.bandit.value_floor:  # it paid: a longer horizon amortizes the probes better
            longer = [a for a in self.bandit.arms if a > self._horizon_cap]
            self._horizon_cap = min(longer, default=self._horizon_cap)
            self._cooldown_len = cfg.bandit.cooldown_steps
            self._dormant_len = cfg.bandit.dormant_after
            self.budget.forgive()  # the observing that led here paid for itself
        elif not kept and not refused:
            self._shrink_horizon()
        self._prediction, self._phase_start, self._displacement = None, None, None
        result = PhaseResult(start["step"], start["horizon"], steps, before, after, predicted_change, residual,
                             value, reward, kept, corrected, reason, correction_loss, uncorrected, rate,
                             start.get("step_length", 1.0))
        self.last_phase_result = result
        return result

    def _confirm(self, probe: Probe) -> tuple[bool, int]:
        """One batch's paired probe is noisy: near the loss floor a harmful phase can look better on it by
        chance (an always-wrong predictor's late phases were kept 2 times in 8, and the runs ended 15% and 24%
        worse). So a phase that batch would keep must not look worse on the last steps' other batches
        either. -> (kept, forwards spent)."""
        forwards, n = 0, self.config.divergence.confirm_batches
        others = [p for p in self._recent_probes if p is not probe][-n:] if n else []
        for older in reversed(others):
            forwards += 2
            if self._judge_on(older)[2]:
                self.counters["confirm_rollbacks"] += 1
                return False, forwards
        return True, forwards

    def _judge_on(self, probe: Probe) -> tuple[float, float, bool]:
        """The paired probe on one batch and the monitor's verdict. -> (before, after, alarm)."""
        before, after = self._probe_pair(probe)
        div = self.monitor.check_phase(before, after)
        if div.error is not None:
            self._events.append(div.error)
        return before, after, div.alarm

    def release_probes(self) -> None:
        """Drop the recent steps' probes (they hold batches). The engine does so while dormant and at the end."""
        self._recent_probes.clear()

    def _try_correction(self, probe: Probe, features: Tensor, residual: float, rate: float,
                        after: float) -> tuple[bool, float, float, int]:
        """Propose a weight correction; keep it only if the probe loss improves.

        -> (kept, resulting probe loss, probe loss with the correction (nan if none), forwards)."""
        traj = self.trajectory
        corr = self.corrector.compute_correction(features, self.residuals, residual, self.state.loss_scale, rate,
                                                 traj.basis_norms()[:, 0], traj.max_layer_norms)
        if corr.coeffs is None:
            return False, after, float("nan"), 0
        delta = traj.compose(corr.coeffs)
        if not traj.is_finite(delta):
            return False, after, float("nan"), 0
        traj.snapshot()
        traj.apply(delta)
        corrected = float(probe())
        self.counters["probe_forwards"] += 1
        self.counters["corrections_tried"] += 1
        improved = math.isfinite(corrected) and corrected < after
        self.corrector.record_outcome(improved)
        if improved:
            traj.drop_snapshot()
            self.counters["corrections_kept"] += 1
            return True, corrected, corrected, 1
        traj.rollback()
        return False, after, corrected, 1

    def _shrink_horizon(self, after: int | None = None) -> None:
        """Halve the horizon cap to the next arm down; at 0, pause prediction for a doubling cooldown.
        ``after``: the step that called for it (default: the one just observed), for values read late."""
        arms = [a for a in self.bandit.arms if 0 < a <= self._horizon_cap // 2]
        if arms:
            self._horizon_cap = max(arms)
            return
        self._start_cooldown(after)

    def _start_cooldown(self, after: int | None = None) -> None:
        """No Predict phase for a cooldown (doubling each time); after it, probe again."""
        self._cooldown_until = (self.step if after is None else after + 1) + self._cooldown_len
        self._cooldown_len *= 2  # bandit.cooldown_steps = 0: no cooldown, ever
        self._refused_in_row = 0
        self._horizon_cap = self._first_horizon_cap()

    def _first_horizon_cap(self) -> int:
        """Start cautiously at the shortest horizon; each phase that pays unlocks the next longer one. With a
        line search, a phase whose prediction is wrong is refused before it takes a step, so start at the longest:
        its fixed cost (the trial forwards) is then spread over the most predicted steps."""
        positive = [a for a in self.bandit.arms if a > 0]
        if not positive:
            return 0
        return max(positive) if self._line_search else min(positive)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly, as tensors, lists, dicts, numbers and strings."""
        pred = self._prediction
        start = self._phase_start
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "step": self.step,
            "phase": [int(self.phase_state.phase), self.phase_state.steps_in_phase, self.phase_state.horizon],
            "prediction": None if pred is None else {
                "loss": pred.loss.clone(), "loss_std": pred.loss_std.clone(), "coeffs": pred.coeffs.clone(),
                "confidence": pred.confidence},
            "phase_start": None if start is None else {**start, "features": start["features"].clone()},
            "displacement": None if self._displacement is None else self._displacement.clone(),
            "block": [self._block_loss, self._block_count, self._last_block_loss],
            "horizon_cap": self._horizon_cap,
            "cooldown": [self._cooldown_until, self._cooldown_len],
            "dormancy": [self._awake_since, self._dormant_until, self._dormant_len],
            "budget": self.budget.state_dict(),
            "late": self._late_as_floats(),
            "refused_in_row": self._refused_in_row,
            "counters": dict(self.counters),
            "state": self.state.state_dict(),
            "trajectory": self.trajectory.state_dict(),
            "dynamics": self.dynamics.state_dict(),
            "residuals": self.residuals.state_dict(),
            "corrector": self.corrector.state_dict(),
            "monitor": self.monitor.state_dict(),
            "bandit": self.bandit.state_dict(),
            "judge": None if self.judge is None else self.judge.state_dict(),
        }

    def _late_as_floats(self) -> list[list[Any]]:
        """The values waiting to be read, read now but left waiting: saving a state changes no decision."""
        self._late = [(st, loss, norm, done) for (st, _, _, done), (loss, norm)
                      in zip(self._late, _read_waiting(self._late), strict=True)]
        return [list(x) for x in self._late]

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        version = sd.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"engine state version {version!r}; this version of hybrid_lightning reads "
                             f"{STATE_VERSION}")
        # parts first: if any of them rejects the state, the engine is left untouched
        self.trajectory.load_state_dict(sd["trajectory"])
        self.dynamics.load_state_dict(sd["dynamics"])
        self.residuals.load_state_dict(sd["residuals"])
        self.corrector.load_state_dict(sd["corrector"])
        self.monitor.load_state_dict(sd["monitor"])
        self.bandit.load_state_dict(sd["bandit"])
        judge = sd.get("judge")
        # else (the judge just switched on, or its blocks changed): it judges afresh from here
        if self.judge is not None and judge is not None and judge["schedule"] == [self.judge.start, self.judge.block]:
            self.judge.load_state_dict(judge)
        self.state.load_state_dict(sd["state"])
        if "budget" in sd:  # absent from states written before the budget existed: timed afresh
            self.budget.load_state_dict(sd["budget"])
        else:
            self.budget = OverheadBudget(self.config.bandit.overhead_budget)
        self.step = int(sd["step"])
        phase, steps_in, horizon = sd["phase"]
        self.phase_state = PhaseState(Phase(int(phase)), int(steps_in), int(horizon))
        p = sd["prediction"]
        self._prediction = None if p is None else Prediction(p["loss"].clone(), p["loss_std"].clone(),
                                                             p["coeffs"].clone(), float(p["confidence"]))
        s = sd["phase_start"]
        self._phase_start = None if s is None else {**s, "features": s["features"].clone()}
        d = sd.get("displacement")
        self._displacement = None if d is None else d.to(self.trajectory.device, self.trajectory.flat_dtype).clone()
        self._block_loss, self._block_count, self._last_block_loss = sd["block"]
        self._horizon_cap = int(sd["horizon_cap"])
        self._cooldown_until, self._cooldown_len = (int(x) for x in sd["cooldown"])
        if self.config.bandit.cooldown_steps == 0:  # no cooldown, also for states saved when 0 still grew from 1
            self._cooldown_until, self._cooldown_len = 0, 0
        # absent from states written before dormancy existed: awake from here on
        base = self.config.bandit.dormant_after
        self._awake_since, self._dormant_until, self._dormant_len = (
            int(x) for x in sd.get("dormancy", [self.step, 0, base]))
        self._dormant_len = max(self._dormant_len, base)  # dormant_after may have been raised since
        self._refused_in_row = int(sd.get("refused_in_row", 0))
        self.counters.update({k: int(v) for k, v in sd["counters"].items()})
        self._plan = None
        self._last_kind = None
        # absent from states written before late reads existed: nothing waits
        self._late = [(int(st), loss, norm, bool(done)) for st, loss, norm, done in sd.get("late", [])]
        self._late_read = []
        if not self.prediction_enabled or self.dormant:
            self._release_while_idle()


def _unread(obs: StepObservation) -> bool:
    return isinstance(obs.loss, Tensor) or isinstance(obs.grad_norm, Tensor)


def _host(value: float | Tensor | None) -> float | None:
    return float(value) if isinstance(value, Tensor) else value


def _read_waiting(late: Sequence[tuple[int, Any, Any, bool]]) -> list[tuple[float | None, float | None]]:
    """(loss, grad_norm) of each waiting step, all read in one transfer."""
    values = _read([v for _, loss, norm, _ in late for v in (loss, norm)])
    return list(zip(values[0::2], values[1::2], strict=True))


def _read(values: Sequence[float | Tensor | None]) -> list[float | None]:
    """Floats for floats, Nones and 1-element tensors, with a single device-to-host transfer for all the tensors.
    In float64, as reading each at once with ``float()`` would give."""
    tensors = [v.detach().double().reshape(1) for v in values if isinstance(v, Tensor)]
    read = iter(torch.cat([t.to(tensors[0].device) for t in tensors]).tolist() if tensors else ())
    return [next(read) if isinstance(v, Tensor) else v for v in values]
