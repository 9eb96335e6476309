"""Where the plugin's per-step time goes: Lightning's SimpleProfiler per hook, and every device sync.

    python -m benchmarks.hook_profile [--workloads mlp cnn] [--steps 400] [--accelerator cuda]

Per workload: plain Lightning, the plugin in monitor-only mode (``predict_threshold: 1.0``) and the
default config never confident enough to predict (``predict_threshold: 0.999``). Prints the mean time
per step of each hook over steps 50..end (the plugin's hooks and Lightning's ``run_training_batch``)
and, on a GPU, the places that synchronized the device during 20 steps
(``torch.cuda.set_sync_debug_mode``). A hook that reads a value from the GPU also waits there for the
work queued before it. Per-hook times are steadier than whole-run ratios on a shared machine.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import warnings

import lightning as L
import torch
import yaml
from lightning.pytorch.profilers import SimpleProfiler

from benchmarks.time_to_loss import HERE, WORKLOADS, _load
from hybrid_lightning import HybridConfig, HybridPredictiveTraining

MODES = {"plain": None, "monitor_only": {"predict_threshold": 1.0}, "never_confident": {"predict_threshold": 0.999}}
SKIP = 50


class SyncCounter(L.Callback):
    """Counts device syncs by source line over steps [start, start + 20) (CUDA only)."""

    def __init__(self, start: int = 200, n: int = 20) -> None:
        self.start, self.n, self.where = start, n, collections.Counter()
        self._cm: warnings.catch_warnings | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.device.type != "cuda":
            return
        if trainer.global_step == self.start:
            self._cm = warnings.catch_warnings(record=True)
            self._records = self._cm.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(1)
        elif trainer.global_step == self.start + self.n and self._cm is not None:
            self._stop()

    def on_train_end(self, trainer, pl_module):
        if self._cm is not None:
            self._stop()

    def _stop(self) -> None:
        torch.cuda.set_sync_debug_mode(0)
        self._cm.__exit__(None, None, None)
        self._cm = None
        for w in self._records:
            if "synchroniz" in str(w.message):
                self.where[f"{w.filename.split('site-packages/')[-1]}:{w.lineno}"] += 1


def profile(spec: dict, mode: str, steps: int, accelerator: str) -> tuple[dict[str, float], dict[str, float]]:
    """-> (ms per step by hook, syncs per step by source line)."""
    hybrid = MODES[mode]
    L.seed_everything(0, verbose=False)
    model = _load(spec["model"])(**spec["model_args"], lr=spec["lr"], total_steps=0)
    data = _load(spec["data"])(**spec["data_args"])
    syncs = SyncCounter(start=min(200, steps // 2))
    callbacks: list = [syncs]
    if hybrid is not None:
        callbacks.append(HybridPredictiveTraining(HybridConfig.from_dict(hybrid), verbose=False))
    prof = SimpleProfiler(dirpath=tempfile.mkdtemp(), filename="profile")  # its summary to a file, not stdout
    try:
        L.Trainer(max_steps=steps, accelerator=accelerator, devices=1,
                  strategy="hybrid" if hybrid is not None else "auto", callbacks=callbacks, limit_val_batches=0,
                  num_sanity_val_steps=0, logger=False, profiler=prof, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(model, data)
    finally:
        if syncs._cm is not None:  # the fit raised inside the counted steps
            syncs._stop()
    hooks = {}
    for action, d in prof.recorded_durations.items():
        if len(d) >= steps - 1 and ("[Callback]Hybrid" in action or action == "run_training_batch"):
            name = action.split("{")[0] + ("." + action.split(".")[-1] if "{" in action else "")
            hooks[name] = 1e3 * sum(d[SKIP:]) / (len(d) - SKIP)
    return hooks, {k: v / syncs.n for k, v in syncs.where.items()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """-> {workload: {mode: {hook: ms per step}}}; prints the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["mlp", "cnn"], choices=WORKLOADS)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    if args.steps < 2 * SKIP:
        p.error(f"--steps must be at least {2 * SKIP}: the first {SKIP} steps are warm-up")
    torch.set_num_threads(1)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in args.workloads:
        spec = yaml.safe_load((HERE / "workloads" / f"{name}.yaml").read_text())
        print(f"\n### {name}: ms per step (mean over steps {SKIP}..{args.steps})\n")
        print("| mode | hook | ms per step |\n|---|---|---|")
        sync_lines = []
        for mode in MODES:
            hooks, syncs = profile(spec, mode, args.steps, args.accelerator)
            out.setdefault(name, {})[mode] = hooks
            for hook, ms in sorted(hooks.items(), key=lambda kv: -kv[1]):
                if ms >= 0.005:
                    print(f"| {mode} | {hook} | {ms:.3f} |")
            by_count = sorted(syncs.items(), key=lambda kv: -kv[1])
            sync_lines += [f"| {mode} | {where} | {n:.2f} |" for where, n in by_count]
        if sync_lines:
            print(f"\n{name}: device syncs per step\n\n| mode | source line | per step |\n|---|---|---|")
            print("\n".join(sync_lines))
    return out


if __name__ == "__main__":
    main()
