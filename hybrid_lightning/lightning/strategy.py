"""Strategies that run predicted steps: forward without grad (or none), no backward, delta instead of optimizer.

The :class:`~hybrid_lightning.lightning.callback.HybridPredictiveTraining` callback decides what each
optimizer step does and hands the strategy a :class:`~hybrid_lightning.core.engine.StepPlan`. On a
real step the strategy is plain Lightning. On a predicted step:

- ``training_step`` runs under ``torch.no_grad()`` when the plan asks for a monitoring forward, and
  otherwise returns a constant without calling the module;
- ``backward`` does nothing (no backward hooks fire, DDP's reducer is never touched);
- ``optimizer_step`` runs Lightning's closure (so zero_grad and the step counters behave), then adds
  the predicted delta to the parameters; ``optimizer.step`` and the precision plugin are bypassed,
  so optimizer state and AMP scalers are untouched.

Lightning still counts the step: ``global_step``, step-interval LR schedulers and
``every_n_train_steps`` checkpoints advance on predicted steps too.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch import Tensor

from hybrid_lightning.core.engine import StepPlan
from hybrid_lightning.errors import IncompatibleSetupError


def _loss_of(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        return output.get("loss")
    return None


@contextlib.contextmanager
def _quiet_logging(module: Any) -> Iterator[None]:
    """Silence ``self.log`` inside an extra forward, so probes do not pollute the user's metrics."""
    module.__dict__["log"] = lambda *a, **k: None
    module.__dict__["log_dict"] = lambda *a, **k: None
    try:
        yield
    finally:
        module.__dict__.pop("log", None)
        module.__dict__.pop("log_dict", None)


class HybridStrategyMixin:
    """Adds predicted steps to a Lightning strategy. The callback sets ``hybrid_plan`` per optimizer step."""

    hybrid_plan: StepPlan | None = None
    hybrid_apply: Callable[[StepPlan], None] | None = None

    def _predicting(self) -> bool:
        plan = self.hybrid_plan
        return plan is not None and not plan.runs_backward

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if not self._predicting():
            return super().training_step(*args, **kwargs)  # type: ignore[misc]
        assert self.hybrid_plan is not None
        if not self.hybrid_plan.run_forward:
            # nothing to compute: a constant loss keeps Lightning's loop and DDP's launch-free path happy
            return torch.zeros((), device=self.root_device)  # type: ignore[attr-defined]
        with torch.no_grad():
            return super().training_step(*args, **kwargs)  # type: ignore[misc]

    # Over the micro-batches of the current optimizer step, as a tensor (no device sync): the sum of the
    # (accumulation-normalized) losses, non-finite if any of them is. The callback reads it, with the
    # gradient norm when it needs one, in a single transfer before the optimizer step.
    hybrid_loss_sum: Tensor | None = None  # shape (1,)

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        if self._predicting():
            return closure_loss
        # no separate finiteness count: a NaN or inf term makes the sum non-finite (every kernel here is a
        # launch on a GPU, where these small steps take a few milliseconds)
        loss = closure_loss.detach().float().sum().reshape(1)
        prev = self.hybrid_loss_sum
        self.hybrid_loss_sum = loss if prev is None else prev + loss
        return super().backward(closure_loss, optimizer, *args, **kwargs)  # type: ignore[misc]

    def hybrid_take_loss(self) -> Tensor | None:
        """-> [loss sum] over this optimizer step's backward passes (None: none ran); resets."""
        loss, self.hybrid_loss_sum = self.hybrid_loss_sum, None
        return loss

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        if not self._predicting():
            return super().optimizer_step(optimizer, closure, model, **kwargs)  # type: ignore[misc]
        closure()  # training_step (no grad), zero_grad, no-op backward
        if self.hybrid_apply is None:
            raise RuntimeError("a predicted step reached the strategy without the HybridPredictiveTraining callback")
        assert self.hybrid_plan is not None
        self.hybrid_apply(self.hybrid_plan)
        return None

    def hybrid_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over processes, in place: one all-reduce. Lightning's ``reduce`` puts a barrier
        before each all-reduce (with NCCL a second collective and a device sync); the all-reduce alone
        already waits for every process."""
        if getattr(self, "world_size", 1) > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def hybrid_mean(self, tensor: Tensor) -> float:
        """The mean of ``tensor`` (a scalar) over processes, read to the host; ``tensor`` is left as it was."""
        return float(self.hybrid_sum(tensor.detach().clone())) / getattr(self, "world_size", 1)

    @torch.no_grad()
    def hybrid_probe(self, batch: Any, batch_idx: int) -> float:
        """Training loss of ``batch`` at the current parameters, averaged over processes; side-effect free.

        No grad, the user's logging silenced, module buffers (e.g. BatchNorm statistics) restored and
        the RNG forked with a fixed seed, so two probes of the same batch differ only by the parameters.
        """
        module = self.lightning_module  # type: ignore[attr-defined]
        buffers = [(b, b.detach().clone()) for b in module.buffers()]
        devices = [self.root_device] if self.root_device.type == "cuda" else []  # type: ignore[attr-defined]
        try:
            with torch.random.fork_rng(devices=devices), _quiet_logging(module):
                torch.manual_seed(1234)
                out = super().training_step(batch, batch_idx)  # type: ignore[misc]
        finally:
            for b, saved in buffers:
                b.copy_(saved)
        loss = _loss_of(out)
        if loss is None:
            raise IncompatibleSetupError(
                "training_step returned no loss during a probe; the plugin needs a loss tensor (or a dict with "
                "'loss') on every step")
        return self.hybrid_mean(loss.float().reshape(()))


class HybridSingleDeviceStrategy(HybridStrategyMixin, SingleDeviceStrategy):
    """``strategy="hybrid"``: one CPU or GPU. The device follows the Trainer's accelerator and devices."""

    strategy_name = "hybrid"

    def __init__(self, device: str | torch.device | None = None, **kwargs: Any) -> None:
        super().__init__(device=device if device is not None else "cpu", **kwargs)
        self._explicit_device = device is not None
        # the accelerator connector fills this from Trainer(accelerator=..., devices=...)
        self.parallel_devices: list[torch.device] | None = None

    @property
    def root_device(self) -> torch.device:
        if not self._explicit_device and self.parallel_devices:
            if len(self.parallel_devices) > 1:
                raise IncompatibleSetupError(
                    f"strategy='hybrid' runs on one device, but the Trainer asks for {len(self.parallel_devices)}: "
                    "pass strategy='hybrid_ddp' for several devices")
            return torch.device(self.parallel_devices[0])
        return self._root_device


def _hybrid_callback(trainer: Any) -> Any:
    from hybrid_lightning.lightning.callback import HybridPredictiveTraining  # the callback imports this module

    return next((c for c in trainer.callbacks if isinstance(c, HybridPredictiveTraining)), None)


class _HybridMultiProcessingLauncher(_MultiProcessingLauncher):
    """The spawn launcher, which also sends the plugin's report and phase results back to the main process.

    With ``spawn`` the fit runs in child processes; without this, the callback object the user holds
    would keep an empty report after ``trainer.fit`` returns."""

    def get_extra_results(self, trainer: Any) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        cb = _hybrid_callback(trainer)
        if cb is not None:
            extra["hybrid_lightning"] = {"report": cb.report, "results": list(cb.results)}  # plain dataclasses
        return extra

    def update_main_process_results(self, trainer: Any, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        cb, payload = _hybrid_callback(trainer), extra.get("hybrid_lightning")
        if cb is not None and payload is not None:
            cb.report = payload["report"]
            cb.results.clear()
            cb.results.extend(payload["results"])


class HybridDDPStrategy(HybridStrategyMixin, DDPStrategy):
    """``strategy="hybrid_ddp"`` (``"hybrid_ddp_spawn"`` for the spawn launcher): DDP with predicted steps.

    Accepts every :class:`~lightning.pytorch.strategies.DDPStrategy` argument. All processes take the
    same phase and apply the same delta: decisions use only all-reduced losses and quantities DDP
    keeps identical (parameters, synchronized gradients).
    """

    strategy_name = "hybrid_ddp"

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _MultiProcessingLauncher:
            self._launcher = _HybridMultiProcessingLauncher(self, start_method=self._start_method)

    def teardown(self) -> None:
        super().teardown()
        # Spawned workers leave through multiprocessing, which skips the atexit hook that destroys the
        # process group; a gloo group torn down by interpreter exit while the peer is still connected
        # can abort the worker (seen once in CI: SIGABRT after a finished fit). After a normal end,
        # agree that every process is done, then close the group while all peers are alive.
        # On an exception (teardown runs inside Lightning's except block) a barrier could wait forever.
        start_method = getattr(self, "_start_method", "popen")
        if start_method != "popen" and sys.exc_info()[1] is None and dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def register_strategies() -> None:
    entries = [
        ("hybrid", HybridSingleDeviceStrategy, "Hybrid predictive training on one device", {}),
        ("hybrid_ddp", HybridDDPStrategy, "Hybrid predictive training with DDP (popen launcher)",
         {"start_method": "popen"}),
        ("hybrid_ddp_spawn", HybridDDPStrategy, "Hybrid predictive training with DDP (spawn launcher)",
         {"start_method": "spawn"}),
    ]
    for name, cls, description, kwargs in entries:
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, cls, description=description, **kwargs)


register_strategies()
