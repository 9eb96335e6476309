"""Two CPU processes with DDP over gloo. Slow-ish (each run ~10 s): deselect with -m 'not multiprocess'."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
pytestmark = pytest.mark.multiprocess


def run_ddp(out: Path, *args: str) -> tuple[dict, dict]:
    out.mkdir(parents=True, exist_ok=True)
    # the process group itself has a 60 s timeout, so a hang inside a collective fails long before this one
    proc = subprocess.run([sys.executable, str(WORKER), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")


def assert_ranks_identical(a, b):
    assert a["world_size"] == b["world_size"] == 2
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
    for name in a["buffers"]:
        assert torch.equal(a["buffers"][name], b["buffers"][name]), name
    assert a["steps"] == b["steps"] and a["counters"] == b["counters"] and a["phases"] == b["phases"]


@pytest.mark.parametrize("args", [
    ["--launcher", "popen"],
    ["--launcher", "spawn"],
    ["--find-unused", "1", "--unused", "1"],
    ["--static-graph", "1"],
    ["--batchnorm", "1"],
    ["--nowcast", "1", "--steps", "360"],  # two whole jumps (every 136 real steps after a 10-step warmup)
], ids=["popen", "spawn", "find_unused", "static_graph", "batchnorm", "nowcast"])
def test_ranks_stay_bit_identical_through_all_phases(tmp_path, args):
    a, b = run_ddp(tmp_path, *args)
    assert_ranks_identical(a, b)
    assert all(a["steps"][p] > 0 for p in ("WARMUP", "FULL", "PREDICT", "CORRECT")), a["steps"]
    assert a["counters"]["kept"] + a["counters"]["rollbacks"] == a["counters"]["phases"] > 0
    assert all(torch.isfinite(v).all() for v in a["params"].values())
    assert a["barriers_in_training"] == 0  # one all-reduce per real step, no barrier
    if "spawn" in args:  # the callback object in the main process reports what the children did
        main = torch.load(tmp_path / "main.pt")
        assert main["steps"] == a["steps"] and main["phases"] == len(a["phases"]) > 0
        assert main["kept"] == a["counters"]["kept"]


def test_nan_on_one_rank_rolls_back_both(tmp_path):
    a, b = run_ddp(tmp_path, "--nan-after", "30")
    assert_ranks_identical(a, b)
    step = a["nan_step"]
    assert step is not None and step == b["nan_step"]
    # the phase whose probe saw NaN on rank 1 only was rolled back on both ranks
    judged = [r for r in a["phases"] if r[0] + r[1] == step + 1]
    assert judged and judged[0][2] is False
    assert all(torch.isfinite(v).all() for v in a["params"].values())


def test_nan_loss_on_one_rank_skips_the_update_on_both(tmp_path):
    # between observation steps only the loss can tell; rank 1's NaN reaches every rank's gradients
    # through the all-reduce, so every rank must skip, not just the one that saw it
    a, b = run_ddp(tmp_path, "--nan-real-at", "3")
    assert_ranks_identical(a, b)
    assert a["nan_step"] is not None and a["nan_step"] == b["nan_step"]
    assert a["counters"]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in a["params"].values())


def test_ranks_whose_clocks_disagree_wake_at_the_same_step(tmp_path):
    # rank 1 owes sleep to the overhead budget, rank 0 nothing: both must take the budget's decision
    # together (from the mean over ranks), or one would wake while the other sleeps
    a, b = run_ddp(tmp_path, "--debt-on-rank1", "1000")
    assert_ranks_identical(a, b)
    assert a["counters"]["budget_extensions"] == 1 and a["counters"]["dormant_periods"] == 1
    assert a["counters"]["dormant_steps"] == 120 - 26  # asleep after 10 + 6 + 10 steps, to the end
    assert a["steps"]["PREDICT"] == 0


def test_late_reads_under_ddp_take_every_decision_as_reading_at_once_and_a_nan_stops_both_ranks(tmp_path):
    a, b = run_ddp(tmp_path / "late", "--late-reads", "8", "--steps", "60")
    assert_ranks_identical(a, b)
    now, _ = run_ddp(tmp_path / "now", "--late-reads", "1", "--steps", "60")
    assert a["counters"] == now["counters"] and a["curve"] == now["curve"] and len(a["curve"]) == 60
    # a NaN on rank 1 reaches both ranks through the all-reduced loss: both stop at the same read, no hang
    out = tmp_path / "nan"
    out.mkdir()
    proc = subprocess.run([sys.executable, str(WORKER), "--out", str(out), "--late-reads", "8", "--steps", "60",
                           "--nan-real-at", "30"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and proc.stderr.count("NumericalError: non-finite") == 2  # one per rank


def test_resume_under_ddp_reproduces_the_uninterrupted_run(tmp_path):
    ckpts = tmp_path / "ckpts"
    a, b = run_ddp(tmp_path / "ref", "--ckpt-dir", str(ckpts))
    assert_ranks_identical(a, b)
    # resume from inside a Predict phase that was not its first step
    predicted = {s for start, n, _, _ in a["phases"] for s in range(start + 1, start + n)}
    k = sorted(predicted)[len(predicted) // 2]
    ra, rb = run_ddp(tmp_path / "resumed", "--resume", str(ckpts / f"step={k}.ckpt"))
    assert_ranks_identical(ra, rb)
    for name in a["params"]:
        assert torch.equal(ra["params"][name], a["params"][name]), name
