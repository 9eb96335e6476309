"""Checkpoint/resume: the plugin's state survives a restart exactly, and bad state fails loudly or falls back."""

from __future__ import annotations

import logging
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from hybrid_lightning import CheckpointError, HybridPredictiveTraining, Phase
from lightning_helpers import StepData, eager_config, trainer

STEPS = 150

pytestmark = pytest.mark.filterwarnings(
    "ignore:Be aware that when using `ckpt_path`", "ignore:You're resuming from a checkpoint that ended before")


class PhaseRecorder(L.Callback):
    def __init__(self, cb):
        self.cb, self.phases = cb, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.phases.append(self.cb.engine.plan().phase.name)


def checkpointed_run(d, config):
    """One uninterrupted run that checkpoints after every optimizer step -> (dir, phases, final params, cb)."""
    torch.manual_seed(0)
    model = StepData()
    cb = HybridPredictiveTraining(config, verbose=False)
    rec = PhaseRecorder(cb)
    ck = ModelCheckpoint(dirpath=d, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer([cb, rec, ck], max_steps=STEPS, strategy="hybrid", enable_checkpointing=True).fit(model)
    return d, rec.phases, [p.detach().clone() for p in model.parameters()], cb


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return checkpointed_run(tmp_path_factory.mktemp("ckpts"), eager_config())


def resume(ckpt, config=None, **cb_kw):
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    model = StepData()
    cb = HybridPredictiveTraining(config or eager_config(), verbose=False, **cb_kw)
    trainer([cb], max_steps=STEPS, strategy="hybrid").fit(model, ckpt_path=str(ckpt))
    return model, cb


@pytest.mark.parametrize("target", ["WARMUP", "FULL", "PREDICT", "CORRECT"])
def test_resume_in_each_phase_reproduces_the_uninterrupted_run(reference, target):
    d, phases, final, ref_cb = reference
    # the checkpoint "step=k" holds the state after k steps; phases[k] is what step k does next
    candidates = [k for k in range(1, STEPS) if phases[k] == target]
    if target == "PREDICT":  # inside a phase, not at its first step: the snapshot must come back too
        candidates = [k for k in candidates if phases[k - 1] == "PREDICT"]
    k = candidates[len(candidates) // 2]
    model, cb = resume(d / f"step={k}.ckpt")
    assert cb.engine.step == STEPS
    for a, b in zip(model.parameters(), final):
        assert torch.equal(a.detach(), b)
    assert cb.engine.counters == ref_cb.engine.counters


def line_search_config():
    cfg = eager_config()
    cfg.predictor, cfg.line_search = "tail_average", [0.5, 1.0, 2.0]
    cfg.corrector.weight_correction = False
    return cfg.validate()


@pytest.fixture(scope="module")
def reference_line_search(tmp_path_factory):
    return checkpointed_run(tmp_path_factory.mktemp("ckpts_ls"), line_search_config())


def test_resume_with_a_line_search_reproduces_the_uninterrupted_run(reference_line_search):
    d, phases, final, ref_cb = reference_line_search
    results = list(ref_cb.results)
    refused = [r for r in results if r.reason == "line_search"]
    scaled = [r for r in results if r.reason == "probe" and r.step_length != 1.0 and r.steps >= 2]
    assert refused and scaled, [(r.reason, r.step_length) for r in results]
    # inside a phase whose displacement the line search scaled, and right after a refusal
    mid = scaled[0].start_step + 2
    after_refusal = refused[0].start_step + 1
    assert phases[mid] == "PREDICT" and phases[after_refusal - 1] != "PREDICT"
    for k in (mid, after_refusal):
        model, cb = resume(d / f"step={k}.ckpt", line_search_config())
        for a, b in zip(model.parameters(), final):
            assert torch.equal(a.detach(), b), k
        assert cb.engine.counters == ref_cb.engine.counters


def test_checkpoint_loads_with_weights_only_and_holds_the_full_engine_state(reference):
    d, phases, _, _ = reference
    k = next(k for k in range(1, STEPS) if phases[k] == "PREDICT" and phases[k - 1] == "PREDICT")
    ckpt = torch.load(d / f"step={k}.ckpt", weights_only=True)
    [state] = [v for key, v in ckpt["callbacks"].items() if key.startswith("HybridPredictiveTraining")]
    engine = state["engine"]
    for part in ("state", "trajectory", "dynamics", "residuals", "corrector", "monitor", "bandit", "budget", "phase",
                 "counters", "prediction", "phase_start"):
        assert part in engine
    assert engine["phase"][0] == int(Phase.PREDICT)
    assert engine["trajectory"]["snapshot"] is not None  # a live rollback snapshot is saved


def test_state_key_is_unique_per_configuration():
    a = HybridPredictiveTraining(eager_config())
    b = HybridPredictiveTraining(eager_config())
    other = eager_config()
    other.warmup_steps = 11
    c = HybridPredictiveTraining(other)
    assert a.state_key == b.state_key != c.state_key


def test_checkpoint_without_plugin_state_falls_back_to_a_fresh_engine_in_full(tmp_path, caplog):
    torch.manual_seed(0)
    model = StepData()
    ck = ModelCheckpoint(dirpath=tmp_path, filename="plain")
    trainer([ck], max_steps=30, strategy="auto", enable_checkpointing=True).fit(model)
    weights = torch.load(tmp_path / "plain.ckpt", weights_only=True)["state_dict"]
    seen = {}

    class Grab(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["phase"], seen["limit"] = cb.engine.phase, cb.engine.step_limit
            seen["weights"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    torch.manual_seed(7)
    cb = HybridPredictiveTraining(eager_config(), verbose=False)
    with caplog.at_level(logging.WARNING, logger="hybrid_lightning"):
        trainer([cb, Grab()], max_steps=40, strategy="hybrid").fit(StepData(), ckpt_path=str(tmp_path / "plain.ckpt"))
    assert seen["phase"] is Phase.FULL
    assert seen["limit"] == 10  # the fresh engine counts from 0; 10 of the fit's 40 steps are left
    assert all(torch.equal(seen["weights"][k], v) for k, v in weights.items())
    assert "no HybridPredictiveTraining state" in caplog.text


def _tampered(reference, tmp_path, mutate):
    d, phases, _, _ = reference
    ckpt = torch.load(d / "step=60.ckpt", weights_only=True)
    key = next(k for k in ckpt["callbacks"] if k.startswith("HybridPredictiveTraining"))
    mutate(ckpt["callbacks"][key])
    path = tmp_path / "tampered.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: s.update(version=999), "version 999"),
    (lambda s: s["engine"]["trajectory"].update(shapes=[[3, 3]]), "unusable"),
    (lambda s: s["engine"].pop("bandit"), "unusable"),
    (lambda s: s.update(engine=None), "no engine state"),
])
def test_bad_plugin_state_raises_a_clear_error(reference, tmp_path, mutate, needle):
    path = _tampered(reference, tmp_path, mutate)
    with pytest.raises(CheckpointError, match=needle) as info:
        resume(path)
    assert "model weights" in str(info.value)


def test_bad_plugin_state_can_fall_back_to_fresh(reference, tmp_path, caplog):
    path = _tampered(reference, tmp_path, lambda s: s.update(version=999))
    with caplog.at_level(logging.WARNING, logger="hybrid_lightning"):
        model, cb = resume(path, on_bad_state="fresh")
    assert "fresh engine in the Full phase" in caplog.text
    assert cb.engine.step == STEPS - 60 and cb.report.steps["WARMUP"] == 0


def test_line_search_forwards_are_charged_to_the_predict_phase(monkeypatch):
    # a clock on which each probe forward takes 1000 s: wherever probes ran, their time must land in PREDICT
    import hybrid_lightning.lightning.callback as callback_module

    offset = [0.0]
    real_clock = time.perf_counter
    monkeypatch.setattr(callback_module.time, "perf_counter", lambda: real_clock() + offset[0])
    torch.manual_seed(0)
    model = StepData()
    cb = HybridPredictiveTraining(line_search_config(), verbose=False)
    tr = trainer([cb], max_steps=80, strategy="hybrid")
    original = tr.strategy.hybrid_probe

    def slow_probe(*a, **k):
        offset[0] += 1000.0
        return original(*a, **k)

    tr.strategy.hybrid_probe = slow_probe
    tr.fit(model)
    forwards = cb.engine.counters["probe_forwards"]
    assert forwards > 0 and cb.engine.counters["refused"] + cb.engine.counters["kept"] > 0
    seconds = cb.report.seconds
    assert seconds["PREDICT"] >= 1000.0 * forwards
    assert all(seconds[p] < 1000.0 for p in ("WARMUP", "FULL", "CORRECT"))
    # the overhead budget sees the probes' steps as prediction's own cost, not as plain or observation steps
    budget = cb.engine.budget
    assert budget.run_seconds >= 1000.0 * forwards and budget.plain_step() < 1000.0
    assert budget.observe_seconds < 1000.0


def judged_config():
    cfg = eager_config()
    cfg.judge.block = 8
    return cfg.validate()


@pytest.fixture(scope="module")
def reference_judged(tmp_path_factory):
    return checkpointed_run(tmp_path_factory.mktemp("ckpts_judge"), judged_config())


def test_resume_with_the_block_judge_reproduces_the_uninterrupted_run(reference_judged):
    d, phases, final, ref_cb = reference_judged
    judge = ref_cb.engine.judge
    assert judge.groups_judged >= 2
    # mid-group, after the first judged group, between phases (inside one, the confirmation's probes, which hold
    # batches, are not in the checkpoint): the tails of the group's blocks and the decisions come back
    k = next(k for k in range(judge.start + 5 * judge.block + 1, STEPS) if phases[k - 1] == phases[k] == "FULL")
    model, cb = resume(d / f"step={k}.ckpt", judged_config())
    for a, b in zip(model.parameters(), final):
        assert torch.equal(a.detach(), b)
    assert cb.engine.counters == ref_cb.engine.counters
    assert cb.engine.judge.state_dict() == judge.state_dict()
