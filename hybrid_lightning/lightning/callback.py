"""HybridPredictiveTraining: the Lightning callback that connects the engine to a Trainer."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from hybrid_lightning.config import HybridConfig
from hybrid_lightning.core.dynamics import DynamicsModel
from hybrid_lightning.core.engine import HybridEngine, PhaseResult, StepObservation, StepPlan, StepReport
from hybrid_lightning.core.phases import Phase, PhaseState
from hybrid_lightning.errors import (
    CheckpointError,
    IncompatibleSetupError,
    NumericalError,
    PredictionDivergence,
    RecoveryAction,
)
from hybrid_lightning.lightning.metrics import HybridMetrics, HybridReport, _Curve
from hybrid_lightning.lightning.strategy import HybridStrategyMixin, _loss_of

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


def _as_config(config: HybridConfig | str | os.PathLike | dict | None) -> HybridConfig:
    if config is None:
        return HybridConfig().validate()
    if isinstance(config, HybridConfig):
        return config.validate()
    if isinstance(config, dict):
        return HybridConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return HybridConfig.from_yaml(config)
    raise TypeError(f"config must be a HybridConfig, a dict or a path to a YAML file, not {type(config).__name__}")


class HybridPredictiveTraining(Callback):
    """Skip backward passes with predicted, verified weight updates.

    Use with ``Trainer(strategy="hybrid")`` (one device) or ``strategy="hybrid_ddp"`` (DDP). After
    ``warmup_steps`` real steps, whenever the dynamics model is confident and the bandit expects a
    gain, a Predict phase applies predicted deltas instead of backward + optimizer; a paired probe
    at its end keeps the phase or rolls it back exactly. ``report`` summarizes the fit.

    Args:
        config: a :class:`HybridConfig`, a dict of its fields, or a path to a YAML file.
        report_dir: where ``hybrid_report.json``/``.png`` go (default: the trainer's log dir).
        verbose: print the report table at the end of fit (rank 0 only).
        on_bad_state: resuming from a checkpoint whose plugin state is from another plugin version or
            unusable: ``"raise"`` a :class:`CheckpointError` (default) or start the engine ``"fresh"``
            in the Full phase with a warning. A checkpoint with no plugin state at all (e.g. from a
            run without the plugin) always starts fresh in Full, with a warning. Model weights,
            optimizer and schedulers are restored by Lightning either way.
        dynamics_factory: build a custom :class:`~hybrid_lightning.core.dynamics.DynamicsModel` from
            ``(n_layers, basis_rank)`` instead of the configured predictor (research and tests).
    """

    def __init__(self, config: HybridConfig | str | None = None, report_dir: str | None = None,
                 verbose: bool = True, on_bad_state: str = "raise",
                 dynamics_factory: Callable[[int, int], DynamicsModel] | None = None) -> None:
        if on_bad_state not in ("raise", "fresh"):
            raise ValueError(f"on_bad_state must be 'raise' or 'fresh', not {on_bad_state!r}")
        self.on_bad_state = on_bad_state
        self.dynamics_factory = dynamics_factory
        self.config = _as_config(config)
        self.report_dir = report_dir
        self.verbose = verbose
        self.engine: HybridEngine | None = None
        self.report = HybridReport()
        self._metrics = HybridMetrics()
        self._curve = _Curve()
        self._pending_state: dict[str, Any] | None = None
        self._open: dict[str, Any] | None = None  # the optimizer step in progress
        self.last_report: StepReport | None = None  # the engine's report for the last optimizer step
        self.results: deque[PhaseResult] = deque(maxlen=4096)  # judged Predict phases of this fit, newest last
        self._params: list[torch.Tensor] = []
        self._restore_pb: Any = None
        self._state_key: str | None = None
        self._last_probe: Callable[[], float] | None = None

    # ------------------------------------------------------------------ identity / persistence
    @property
    def state_key(self) -> str:
        # Lightning reads this on every hook call: compute it once (the config is fixed at construction)
        if self._state_key is None:
            digest = hashlib.sha1(json.dumps(_identity(self.config), sort_keys=True).encode()).hexdigest()[:12]
            self._state_key = self._generate_state_key(config=digest)
        return self._state_key

    def state_dict(self) -> dict[str, Any]:
        engine_state = self.engine.state_dict() if self.engine is not None else None
        return {"version": CHECKPOINT_VERSION, "engine": engine_state, "report": self._report_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = state_dict  # applied once the engine exists (on_fit_start)

    def _report_state(self) -> dict[str, Any]:
        return {"steps": dict(self.report.steps), "seconds": dict(self.report.seconds)}

    # ------------------------------------------------------------------ setup checks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not isinstance(strategy, HybridStrategyMixin):
            raise IncompatibleSetupError(
                f"HybridPredictiveTraining needs a hybrid strategy, but the Trainer uses "
                f"{type(strategy).__name__}. Pass Trainer(strategy='hybrid') for one device or "
                "strategy='hybrid_ddp' for several (sharded strategies such as FSDP and DeepSpeed are not "
                "supported yet).")
        if not pl_module.automatic_optimization:
            raise IncompatibleSetupError(
                f"{type(pl_module).__name__} uses manual optimization, which HybridPredictiveTraining does not "
                "support: the plugin replaces Lightning's automatic backward/optimizer step. Use automatic "
                "optimization or remove the callback.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise IncompatibleSetupError(
                f"HybridPredictiveTraining supports exactly one optimizer; configure_optimizers returned "
                f"{len(trainer.optimizers)}. Combine the parameter groups into one optimizer.")
        optimizer = trainer.optimizers[0]
        seen: set[int] = set()
        params = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if not params:
            raise IncompatibleSetupError("the optimizer has no trainable parameters")
        names_by_id = {id(p): n for n, p in pl_module.named_parameters()}
        names = [names_by_id.get(id(p), f"param{i}") for i, p in enumerate(params)]
        buffers = [b for b in pl_module.buffers()]
        self._params = params
        dynamics = None
        if self.dynamics_factory is not None:
            dynamics = self.dynamics_factory(len(params), self.config.trajectory.basis_rank)
        self.engine = HybridEngine(params, self.config, names=names, buffers=buffers, dynamics=dynamics)
        self.report = HybridReport()
        self._metrics = HybridMetrics()
        self._curve = _Curve()
        self.results.clear()
        self.last_report = None
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None
        elif trainer.ckpt_path is not None:
            self._start_fresh(f"the checkpoint {trainer.ckpt_path} has no HybridPredictiveTraining state "
                              f"(state_key {self.state_key!r})")
        strategy = trainer.strategy
        assert isinstance(strategy, HybridStrategyMixin)
        strategy.hybrid_apply = self.engine.apply
        if trainer.world_size > 1:
            device = strategy.root_device
            self.engine.mean_across_processes = lambda x: float(
                strategy.hybrid_sum(torch.tensor([x], dtype=torch.float32, device=device))) / trainer.world_size
        strategy.hybrid_plan = None
        strategy.hybrid_loss_sum = None  # from an interrupted fit, between a backward and its optimizer step
        self._open = None
        self._attach_progress_bar(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning knows this fit's length (max_steps, or epochs x batches): a Predict phase that could not
        # end before it is not started. Counted from the engine's own step, which is behind global_step when
        # the engine started fresh on a checkpoint without plugin state. Unknown lengths come back as inf, or
        # as max_steps = -1 for unsized data with max_epochs: no limit then.
        assert self.engine is not None
        total = trainer.estimated_stepping_batches
        known = math.isfinite(total) and total >= 0
        self.engine.step_limit = self.engine.step + int(total) - trainer.global_step if known else None

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.engine is not None
        version = state.get("version") if isinstance(state, dict) else None
        problem = None
        if version != CHECKPOINT_VERSION:
            problem = (f"the checkpoint's HybridPredictiveTraining state has version {version!r}; this plugin "
                       f"reads version {CHECKPOINT_VERSION}")
        elif not isinstance(state.get("engine"), dict):
            problem = "the checkpoint's HybridPredictiveTraining state has no engine state"
        else:
            snapshot = self.engine.state_dict()
            try:
                self.engine.load_state_dict(state["engine"])
            except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as err:
                self.engine.load_state_dict(snapshot)  # nothing half-loaded
                problem = f"the checkpoint's HybridPredictiveTraining state is unusable ({type(err).__name__}: {err})"
        if problem is None:
            rep = state.get("report") or {}
            self.report.steps.update(rep.get("steps", {}))
            self.report.seconds.update(rep.get("seconds", {}))
            return
        if self.on_bad_state == "raise":
            raise CheckpointError(
                f"{problem}. The model weights, optimizer and scheduler states in the checkpoint are unaffected. "
                "Pass HybridPredictiveTraining(..., on_bad_state='fresh') to resume them with a fresh engine, or "
                "use the plugin version that wrote the checkpoint.")
        self._start_fresh(problem)

    def _start_fresh(self, why: str) -> None:
        """Documented fallback: a new engine in the Full phase (the model is already trained; no warmup)."""
        assert self.engine is not None
        self.engine.phase_state = PhaseState(Phase.FULL)
        log.warning("%s; the plugin starts a fresh engine in the Full phase: it observes min_full_steps real steps "
                    "before it may predict. Model weights, optimizer and schedulers were restored normally.", why)

    # ------------------------------------------------------------------ per step
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._open is not None:
            return  # inside a gradient-accumulation window: the phase stays as planned
        assert self.engine is not None
        plan = self.engine.plan()
        trainer.strategy.hybrid_plan = plan  # type: ignore[attr-defined]
        self._open = {"plan": plan, "global_step": trainer.global_step, "t0": time.perf_counter(),
                      "loss": None, "loss_value": None, "grad_norm": None, "skipped": False,
                      # with a GradScaler the scaler reads its overflow flag every step anyway: nothing to save
                      "late": (plan.read_late and _reads_late(trainer.strategy.root_device)
                               and getattr(trainer.precision_plugin, "scaler", None) is None)}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        strategy = trainer.strategy
        taken = strategy.hybrid_take_loss()  # type: ignore[attr-defined]
        step = self._open
        if step is None:
            return
        # One host transfer per real step, and no other: the loss for the engine, whether this update may
        # reach the weights, and on observation steps the gradient norm. Under DDP the loss is summed over
        # processes, so a non-finite loss on any process makes every process skip the same update.
        parts = []
        if taken is not None:
            parts.append(strategy.hybrid_sum(taken))  # type: ignore[attr-defined]
        measure = step["plan"].measure_grad_norm
        if measure:
            # one read pass over the gradients, on observation steps only
            grads = [p.grad for p in self._params if p.grad is not None]
            norm = (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()) if grads
                    else torch.zeros((), device=strategy.root_device))
            parts.append(norm.reshape(1).to(parts[0].device) if parts else norm.reshape(1))
        if step["late"]:
            # The engine only monitors: it reads these later, many steps in one transfer. No device sync here,
            # so no finiteness check either; a non-finite loss is found at the read (see _check_late).
            if taken is not None:  # in float64, as the read below divides
                step["loss_value"] = parts[0].double() / trainer.world_size
            if measure:
                step["grad_norm"] = parts[-1]
            return
        values = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist() if parts else []
        finite = True
        if taken is not None:
            step["loss_value"] = values[0] / trainer.world_size
            finite = math.isfinite(values[0])
        if measure:
            finite = finite and math.isfinite(values[-1])
            if math.isfinite(values[-1]):
                step["grad_norm"] = values[-1]
        if finite:
            return
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # AMP loss-scale overflow: the GradScaler skips this update itself; routine, not an error
        if self.config.on_nonfinite == "raise":
            raise NumericalError(
                f"non-finite gradients at step {trainer.global_step} (on_nonfinite='raise'). Check the inputs and "
                "the learning rate, or set on_nonfinite='skip' to skip such steps.", RecoveryAction.ABORT)
        if not self._weights_finite():
            # Skipping cannot help: an earlier update already made the weights non-finite. The gradient norm is
            # measured every trajectory.stride steps, so Inf gradients under a finite loss can pass in between.
            raise NumericalError(
                f"the weights are non-finite at step {trainer.global_step}: an earlier step's gradients were "
                "non-finite under a finite loss, on a step whose gradient norm was not checked (every "
                f"trajectory.stride = {self.config.trajectory.stride} steps). Lower the learning rate, enable "
                "gradient clipping, or set trajectory.stride: 1 to check every step.", RecoveryAction.ABORT)
        for p in self._params:
            p.grad = None  # the optimizer skips parameters without gradients: no NaN reaches weights or state
        self._open["skipped"] = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = self._open
        if step is None:
            return
        plan: StepPlan = step["plan"]
        loss = _loss_of(outputs)
        if loss is not None and (plan.runs_backward or plan.run_forward):
            loss = loss.detach().float()
            step["loss"] = loss if step["loss"] is None else step["loss"] + loss
        if trainer.global_step == step["global_step"]:
            return  # accumulating: the optimizer step is not complete yet
        assert self.engine is not None
        strategy = trainer.strategy
        value = step["loss_value"]  # real steps: read with the finiteness check, before the optimizer step
        if value is None and step["loss"] is not None:
            value = strategy.hybrid_mean(step["loss"])  # type: ignore[attr-defined]
        obs = StepObservation(loss=value, grad_norm=step["grad_norm"] if plan.measure_grad_norm else None,
                              skipped=step["skipped"])
        probe = partial(strategy.hybrid_probe, batch, batch_idx)  # type: ignore[attr-defined]
        self._last_probe = probe  # to judge a Predict phase that training stops inside of
        t_observe = time.perf_counter()
        report = self.engine.observe(obs, probe=probe)
        if report.late_values:
            self._check_late(trainer, report.late_values)
        # a real step that starts (or, with a line search, refuses) a Predict phase spent its observe() on
        # that phase: the line search's trial forwards are the phase's cost, not the real step's
        starts_phase = report.phase.runs_backward and (report.next_phase is Phase.PREDICT
                                                       or report.phase_result is not None)
        predict_seconds = time.perf_counter() - t_observe if starts_phase else 0.0
        self.last_report = report
        if report.phase_result is not None:
            self.results.append(report.phase_result)
            if report.phase_result.kept and self.config.after_jump != "keep":
                _adjust_optimizer_state(trainer.optimizers[0], self.config.after_jump)
        strategy.hybrid_plan = None  # type: ignore[attr-defined]
        self._open = None
        if strategy.root_device.type == "cuda" and (report.phase_result is not None or
                                                     report.next_phase is not report.phase):
            # Time per phase needs the device's queue drained only where the phase changes: within a run
            # of same-phase steps, work still queued at one step's end is counted in the next one's.
            torch.cuda.synchronize(strategy.root_device)
        elapsed = time.perf_counter() - step["t0"]
        self.engine.record_seconds(elapsed)
        value = None if step["late"] else value
        self._account(report, elapsed - predict_seconds, value)
        self.report.seconds["PREDICT"] += predict_seconds
        self._log(trainer, pl_module, report, value)

    def _weights_finite(self) -> bool:
        """Read on the rare non-finite step only: whether skipping or continuing can still help."""
        return all(bool(torch.isfinite(p).all()) for p in self._params)

    def _check_late(self, trainer: pl.Trainer, late: list[tuple[int, float | None, float | None]]) -> None:
        """Values of monitored steps, read late: losses into the curve; a non-finite value was not skipped."""
        for step, loss, _ in late:
            if loss is not None and math.isfinite(loss):
                self._curve.add(step, loss, Phase.FULL)
        bad = [step for step, loss, norm in late
               if not all(x is None or math.isfinite(x) for x in (loss, norm))]
        if not bad:
            return
        how = (f"The plugin was only monitoring and read its values {self.config.idle_read_every} steps at a time "
               "(idle_read_every), so that update could not be skipped. idle_read_every: 1 skips such steps at the "
               "cost of a device sync per step.")
        if self.config.on_nonfinite == "raise":
            raise NumericalError(f"non-finite loss or gradient norm at step {bad[0]} (on_nonfinite='raise'). {how}",
                                 RecoveryAction.ABORT)
        if self._weights_finite():
            return
        raise NumericalError(
            f"non-finite loss or gradient norm at step {bad[0]}, and the weights are now NaN/Inf. {how} Lower the "
            "learning rate or enable gradient clipping.", RecoveryAction.ABORT)

    def _account(self, report: StepReport, seconds: float, loss: float | None) -> None:
        name = report.phase.name
        self.report.steps[name] += 1
        self.report.seconds[name] += seconds
        self._metrics.update(report)
        if loss is not None and math.isfinite(loss):
            self._curve.add(report.step, loss, report.phase)
        _log_events(report.events, report.step)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: StepReport,
             loss: float | None) -> None:
        if not trainer.loggers:
            return
        connector = getattr(trainer, "_logger_connector", None)
        if not (report.phase_result is not None or getattr(connector, "should_update_logs", True)):
            return
        assert self.engine is not None
        values: dict[str, float] = {
            "hybrid/phase": float(report.phase),
            "hybrid/confidence": self.engine.confidence(),
            "hybrid/backward_skip_ratio": self._skip_ratio(),
            "hybrid/rollbacks": float(self.engine.counters["rollbacks"]),
            "hybrid/horizon_cap": float(self.engine.horizon_cap),
            "hybrid/dormant": float(report.dormant),
            "hybrid/observe_share": self.engine.budget.share,
        }
        if loss is not None:
            values["hybrid/actual_loss"] = loss
        if self.engine.judge is not None:  # 1 while the block judge lets J blocks predict
            values["hybrid/judge_on"] = float(self.engine.judge.predicting)
        r = report.phase_result
        if r is not None:
            values.update({
                "hybrid/horizon": float(r.horizon),
                "hybrid/predicted_loss_change": r.predicted_change,
                "hybrid/actual_loss_change": r.loss_after - r.loss_before,
                "hybrid/residual": r.residual,
                "hybrid/value": r.value,
                "hybrid/reward": r.reward,
            })
        values = {k: v for k, v in values.items() if math.isfinite(v)}
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ progress bar
    def _attach_progress_bar(self, trainer: pl.Trainer) -> None:
        bar = trainer.progress_bar_callback
        if bar is None or self._restore_pb is not None:
            return
        original = bar.get_metrics

        def get_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
            metrics = {k: v for k, v in original(trainer, pl_module).items() if not k.startswith("hybrid/")}
            if self.engine is not None:
                metrics["phase"] = self.engine.phase.name.lower()
                metrics["skip"] = f"{100 * self._skip_ratio():.0f}%"
            return metrics

        bar.get_metrics = get_metrics  # type: ignore[method-assign]
        self._restore_pb = (bar, original)

    def _skip_ratio(self) -> float:
        s = self.report.steps
        total = sum(s.values())
        return s["PREDICT"] / total if total else 0.0

    # ------------------------------------------------------------------ end of fit
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.engine is None:
            return
        ended = self.engine.end_of_training(self._last_probe)
        self._last_probe = None
        if ended is not None:
            self.results.append(ended)
            self._metrics.update(StepReport(ended.start_step + ended.steps, Phase.PREDICT, Phase.FULL,
                                            phase_result=ended))
            log.info("hybrid: training stopped inside a Predict phase; the phase was judged now and %s",
                     "kept" if ended.kept else "rolled back")
        late, events = self.engine.flush()
        _log_events(events, self.engine.step)
        if late:
            self._check_late(trainer, late)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finalize()
        # trainer.log_dir is a collective under DDP: every rank must ask, before rank 0 writes
        out = Path(self.report_dir or trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            self.report.save_json(out / "hybrid_report.json")
            self.report.plot(out / "hybrid_report.png")
            if self.verbose:
                print(f"\nhybrid_lightning report ({out / 'hybrid_report.json'})\n{self.report.table()}\n")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._restore_pb is not None:
            bar, original = self._restore_pb
            bar.get_metrics = original  # type: ignore[method-assign]
            self._restore_pb = None
        strategy = trainer.strategy
        if isinstance(strategy, HybridStrategyMixin):
            strategy.hybrid_plan = None
            strategy.hybrid_apply = None
        self._open = None
        self._last_probe = None
        if self.engine is not None:
            self.engine.release_probes()  # they hold batches (and, through the strategy, the trainer)

    def _finalize(self) -> None:
        e = self.engine
        if e is None:
            return
        c = e.counters
        r = self.report
        r.backward_skipped = r.steps["PREDICT"]
        r.backward_passes = r.steps["WARMUP"] + r.steps["FULL"] + r.steps["CORRECT"]
        r.predict_phases, r.kept_phases, r.rollbacks = c["phases"], c["kept"], c["rollbacks"]
        r.refused_phases = c["refused"]
        r.corrections_kept, r.divergence_events = c["corrections_kept"], c["divergence_events"]
        r.skipped_nonfinite_steps, r.probe_forwards = c["skipped_steps"], c["probe_forwards"]
        r.dormant_steps = c["dormant_steps"]
        r.budget_extensions = c["budget_extensions"]
        r.confirm_rollbacks = c["confirm_rollbacks"]
        r.judged_groups, r.judge_vetoes = c["judged_groups"], c["judge_vetoes"]
        r.observe_share = e.budget.share
        vals = self._metrics.values()
        r.mean_abs_residual, r.mean_value = vals["mean_abs_residual"], vals["mean_value"]
        r.bandit_mean_reward = {str(k): v for k, v in e.bandit.mean_rewards().items() if k}
        r.final_horizon_cap = e.horizon_cap
        r.curve = list(self._curve.points)


def _log_events(events: list[Any], step: int) -> None:
    for err in events:
        level = logging.INFO if isinstance(err, PredictionDivergence) else logging.WARNING
        log.log(level, "hybrid step %d: %s: %s (recovery: %s)", step, type(err).__name__, err, err.recovery.value)


# Settings that change no decision: a checkpoint's plugin state stays findable when they change.
_RUNTIME_ONLY = frozenset({"idle_read_every"})


def _identity(config: HybridConfig) -> dict[str, Any]:
    """What names a configuration in a checkpoint: the settings that differ from their defaults, so a
    setting added in a later version (at its default) leaves the state of older checkpoints findable."""

    def diff(ours: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in ours.items():
            if isinstance(value, dict) and isinstance(default.get(key), dict):
                value = diff(value, default[key])
                if value:
                    out[key] = value
            elif key not in default or value != default[key]:
                out[key] = value
        return out

    found = diff(config.to_dict(), HybridConfig().to_dict())
    return {k: v for k, v in found.items() if k not in _RUNTIME_ONLY}


def _reads_late(device: torch.device) -> bool:
    """Pass the engine unread values where reading them syncs an asynchronous device: on a CPU a read is free,
    and reading at once keeps on_nonfinite's skip for every step."""
    return device.type != "cpu"


_MOMENTA = ("exp_avg", "momentum_buffer")  # Adam/AdamW first moment, SGD momentum


def _adjust_optimizer_state(optimizer: Any, mode: str) -> None:
    """After a kept jump: forget the momentum (it points along the pre-jump path) or all of the state.

    ``reset`` empties the per-parameter state, so the next step re-initialises it as on step one
    (Adam's bias correction included); every rank does the same, so DDP replicas stay identical.
    """
    for st in optimizer.state.values():
        if mode == "reset":
            st.clear()
            continue
        for key in _MOMENTA:
            buf = st.get(key)
            if isinstance(buf, torch.Tensor):
                buf.zero_()
