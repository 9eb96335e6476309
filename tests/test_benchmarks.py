"""Smoke tests of the benchmark commands in --quick mode: they run and write valid output (no timing claims)."""

from __future__ import annotations

import argparse
import json
import math
import types

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from benchmarks import (
    dynamics_quality,
    hook_profile,
    jump_judge,
    jump_sweep,
    overhead,
    partial_predict,
    predictor_value,
    regimes,
    seed_target,
    step_attribution,
    step_cost,
    time_to_loss,
)
from hybrid_lightning.core.divergence import DivergenceMonitor
from hybrid_lightning.core.trajectory import Trajectory

KEYS = {"workload", "speedup_vs_baseline", "speedup_vs_equal_compute", "final_val_baseline", "final_val_hybrid",
        "predict_fraction", "rollbacks"}


def test_time_to_loss_quick_writes_json_png_and_table(tmp_path, capsys):
    time_to_loss.main(["--quick", "--repeats", "1", "--workloads", "mlp", "--out", str(tmp_path)])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    [line] = lines
    assert KEYS <= set(line) and line["workload"] == "mlp"
    data = json.loads((tmp_path / "mlp.json").read_text())
    kinds = {r["kind"] for r in data["runs"]}
    assert {"baseline", "hybrid:default", "hybrid:eager", "hybrid:eager_long"} <= kinds
    steps = {r["kind"]: r["steps"] for r in data["runs"]}
    assert steps["hybrid:eager_long"] == round(1.5 * steps["baseline"]) and steps["hybrid:eager"] == steps["baseline"]
    for r in data["runs"]:
        steps = [p["step"] for p in r["curve"]]
        assert steps == sorted(steps) and steps[-1] == r["steps"]
        seconds = [p["seconds"] for p in r["curve"]]
        assert seconds == sorted(seconds) and all(math.isfinite(p["val"]) for p in r["curve"])
    assert (tmp_path / "mlp.png").stat().st_size > 0
    assert "| mlp | default |" in (tmp_path / "time_to_loss.md").read_text()


def test_time_to_loss_trains_every_run_in_the_chosen_regime(tmp_path):
    [res] = time_to_loss.main(["--quick", "--repeats", "1", "--seeds", "1", "--workloads", "mlp", "--variants",
                               "default", "--regime", "sgd", "--out", str(tmp_path)])
    spec = yaml.safe_load((time_to_loss.HERE / "workloads" / "mlp.yaml").read_text())
    assert res["regime"] == "sgd" and res["lr"] == spec["sgd_lr"]
    with pytest.raises(SystemExit):
        time_to_loss.main(["--quick", "--tune", "--regime", "low_lr", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # the grid belongs to the tuned_wd and finetune regimes
        time_to_loss.main(["--quick", "--tune-wd", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # finetune is tuned in LR alone; finetune_wd has the grid
        time_to_loss.main(["--quick", "--tune-wd", "--regime", "finetune", "--out", str(tmp_path)])


@pytest.mark.parametrize("regime", ["tuned_wd", "finetune_wd"])
def test_time_to_loss_tune_wd_runs_the_grid_and_trains_with_its_best(tmp_path, regime):
    [res] = time_to_loss.main(["--quick", "--repeats", "1", "--seeds", "1", "--workloads", "mlp", "--variants",
                               "default", "--regime", regime, "--tune-wd", "--out", str(tmp_path)])
    grid = _quick_mlp()["tuned_wd"] if regime == "tuned_wd" else _quick_mlp()["finetune"]["wd"]
    sweep = res["sweep"]
    assert [(s["lr"], s["weight_decay"]) for s in sweep] == [(lr, wd) for lr in grid["lr_sweep"]
                                                             for wd in grid["wd_sweep"]]
    assert sweep[0]["final_val"] != sweep[1]["final_val"]  # weight decay changes training
    best = min(sweep, key=lambda s: s["final_val"])
    assert (res["lr"], res["weight_decay"]) == (best["lr"], best["weight_decay"])
    # the baseline is the grid's best run again: same seed, same settings, same final val
    assert res["final_val_baseline"] == best["final_val"]


def test_time_to_loss_layer_lr_scales_every_run_and_only_real_steps(tmp_path, monkeypatch):
    made = []

    class Recording(time_to_loss.ScaledPrefixStep):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(time_to_loss, "ScaledPrefixStep", Recording)
    [res] = time_to_loss.main(["--quick", "--repeats", "1", "--seeds", "2", "--workloads", "mlp", "--variants",
                               "tail_average_every24", "--layer-lr", "net.0.", "--layer-lr-factor", "0",
                               "--layer-lr-between", "0", "1", "--out", str(tmp_path)])
    assert res["layer_lr"] == {"prefix": ["net.0."], "factor": 0.0, "between": [0.0, 1.0]}
    runs = res["runs"]
    assert [r["kind"] for r in runs] == ["baseline", "hybrid:tail_average_every24", "control:tail_average_every24",
                                         "seed:1"]
    assert len(made) == len(runs)  # baseline, hybrid, control and seed runs all get the scaled layer
    assert runs[1]["backward_passes"] < runs[1]["steps"]  # the hybrid predicted some steps
    for r, cb in zip(runs, made):  # every real step after warmup is scaled; predicted steps are not
        assert cb.scaled_steps == r["backward_passes"] - int(0.1 * r["steps"])


def _ttl_dir(path, base_vals, hyb_vals, ctl_vals=None):
    """A time_to_loss output directory with one workload: curves at 10 s per evaluation, vals as given."""
    def run(kind, vals):
        return {"kind": kind, "train_seconds": 10.0 * len(vals),
                "curve": [{"step": i, "seconds": 10.0 * i, "backward": i, "val": v} for i, v in enumerate(vals, 1)]}
    runs = [run("baseline", base_vals), run("hybrid:v", hyb_vals)] + ([run("control:v", ctl_vals)] if ctl_vals else [])
    path.mkdir()
    (path / "hybrid_report.json").write_text("{}")  # the plugin's own report lands in the same folder
    (path / "mlp.json").write_text(json.dumps({"final_val_baseline": base_vals[-1], "runs": runs,
                                               "variants": {"v": {"final_val_hybrid": hyb_vals[-1]}}}))
    return path


def test_fixed_loss_measures_without_autograd_and_puts_the_weights_back():
    class Recording(torch.nn.Linear):
        grad_modes: list[bool] = []

        def forward(self, x):
            self.grad_modes.append(torch.is_grad_enabled())
            return super().forward(x)

    torch.manual_seed(0)
    m = Recording(3, 1)
    before = [p.detach().clone() for p in m.parameters()]
    batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(2)]
    zeros = [torch.zeros_like(p) for p in before]
    assert predictor_value.fixed_loss(m, batches, zeros) == pytest.approx(
        float(sum((y ** 2).mean() for _, y in batches) / 2))  # zero weights predict 0
    assert Recording.grad_modes == [False, False] and m.training
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))


def test_seed_target_measures_every_seed_against_the_median_of_their_baselines(tmp_path):
    dirs = [_ttl_dir(tmp_path / "s0", [4, 3, 2], [3, 2, 1], [4, 3, 2.5]),  # targets 2, 3, 1.5: shared is 2
            _ttl_dir(tmp_path / "s1", [4, 3.5, 3], [4, 2, 2]),  # its baseline never gets to 2
            _ttl_dir(tmp_path / "s2", [2, 1.5, 1.5], [3, 2.5, 2.5])]  # its hybrid never does
    [row] = seed_target.main([str(d) for d in dirs])
    assert row["target"] == 2 and row["variant"] == "v"
    s0, s1, s2 = row["seeds"]
    assert (s0["baseline_time_to_target"], s0["hybrid_time_to_target"]) == (30.0, 20.0)
    assert s0["vs_baseline"] == "1.50x" and s0["control_vs_baseline"] == "not reached"
    assert s1["vs_baseline"] == "≥ 1.50x (baseline not reached)"  # its 30 s of training over the hybrid's 20
    assert s1["control_vs_baseline"] == "not reached"  # no control run: the control is the baseline
    assert s2["vs_baseline"] == "not reached" and s2["control_vs_baseline"] == "1.00x"


def test_jump_sweep_jumps_with_the_points_k_and_gain_and_compares_with_plain_training(tmp_path):
    cfg = jump_sweep.jump_config("mlp", 12, 8.0)
    assert (cfg["min_full_steps"], cfg["max_predict_steps"], cfg["dynamics"]["drift_gain"]) == (12, 1, 8.0)
    res = jump_sweep.main(["--quick", "--workloads", "mlp", "--points", "4:4", "8:1", "--out", str(tmp_path)])
    plain, a, b = res["mlp"]
    assert (plain["point"], plain["vs_baseline"], plain["backward_passes"]) == ("plain", 0.0, 60)
    # one skipped backward pass per jump: the run with jumps twice as often skips more of them
    assert 60 > a["backward_passes"] and b["backward_passes"] < 60 and a["backward_passes"] < b["backward_passes"]
    assert a["final_val"] != plain["final_val"]
    # the loss on the same first training batches at every run's end: another model, another loss
    assert math.isfinite(plain["final_train"]) and a["final_train"] != plain["final_train"]
    assert json.loads((tmp_path / "jump_sweep.json").read_text())["results"]["mlp"][1]["point"] == "4:4"
    assert "| mlp | 8:1 |" in (tmp_path / "jump_sweep.md").read_text()
    assert "divergence" in cfg and "divergence" not in jump_sweep.jump_config("mlp", 12, 8.0, guarded=True)
    assert "judge" not in cfg and jump_sweep.jump_config("mlp", 12, 8.0, judge=48)["judge"] == {"block": 48}
    judged = jump_sweep.main(["--quick", "--workloads", "mlp", "--points", "4:4", "--judge", "4", "--out",
                              str(tmp_path / "judged")])
    # the judge keeps jumps out of N blocks: fewer of them than the unjudged 4:4 run's
    assert a["backward_passes"] < judged["mlp"][1]["backward_passes"] < 60
    assert json.loads((tmp_path / "judged" / "jump_sweep.json").read_text())["judge"] == 4
    assert "block judge of 4 steps" in (tmp_path / "judged" / "jump_sweep.md").read_text()
    assert "after_jump" not in cfg
    assert jump_sweep.jump_config("mlp", 12, 8.0, after_jump="zero_momentum")["after_jump"] == "zero_momentum"
    zeroed = jump_sweep.main(["--quick", "--workloads", "mlp", "--points", "4:4", "--after-jump", "zero_momentum",
                              "--out", str(tmp_path / "zeroed")])
    # the same jumps, then Adam's first moment zeroed after each: another trajectory, same plain run
    assert zeroed["mlp"][0]["final_val"] == plain["final_val"]
    assert zeroed["mlp"][1]["backward_passes"] == a["backward_passes"]
    assert zeroed["mlp"][1]["final_val"] != a["final_val"]
    assert json.loads((tmp_path / "zeroed" / "jump_sweep.json").read_text())["after_jump"] == "zero_momentum"
    assert "optimizer state after a jump: zero_momentum" in (tmp_path / "zeroed" / "jump_sweep.md").read_text()
    with pytest.raises(SystemExit, match="after-jump"):
        jump_sweep.summarize([tmp_path, tmp_path / "zeroed"])
    assert jump_sweep.jump_config("mlp", 12, 8.0, judge=48, start_scale=0.25)["judge"] == {"block": 48,
                                                                                           "start_scale": 0.25}
    ramped = jump_sweep.main(["--quick", "--workloads", "mlp", "--points", "4:4", "--judge", "4",
                              "--judge-start-scale", "0.25", "--out", str(tmp_path / "ramped")])
    assert ramped["mlp"][1]["final_val"] != judged["mlp"][1]["final_val"]  # smaller jumps: another trajectory
    assert json.loads((tmp_path / "ramped" / "jump_sweep.json").read_text())["judge_start_scale"] == 0.25
    assert "ramping the gain from 0.25 of it" in (tmp_path / "ramped" / "jump_sweep.md").read_text()
    assert "tangential" not in cfg["dynamics"]
    assert jump_sweep.jump_config("mlp", 12, 8.0, tangential=True)["dynamics"] == {"drift_gain": 8.0,
                                                                                   "tangential": True}
    turned = jump_sweep.main(["--quick", "--workloads", "mlp", "--points", "4:4", "--tangential", "--out",
                              str(tmp_path / "turned")])
    # the same jumps less their part along the weights: another trajectory, as many skipped backward passes
    assert turned["mlp"][1]["backward_passes"] == a["backward_passes"]
    assert turned["mlp"][1]["final_val"] != a["final_val"]
    assert json.loads((tmp_path / "turned" / "jump_sweep.json").read_text())["tangential"] is True
    assert "tangential" in (tmp_path / "turned" / "jump_sweep.md").read_text()
    with pytest.raises(SystemExit, match="tangential"):
        jump_sweep.summarize([tmp_path, tmp_path / "turned"])
    with pytest.raises(SystemExit, match="ramp"):
        jump_sweep.summarize([tmp_path / "judged", tmp_path / "ramped"])
    # jumps only in one half of the run: fewer than throughout, and the halves' skipped passes add up to its
    halves = [jump_sweep.main(["--quick", "--workloads", "mlp", "--points", "4:4", *w, "--out", str(tmp_path / d)])
              for w, d in ((["--until", "0.5"], "first"), (["--start", "0.5"], "second"))]
    skipped = [60 - h["mlp"][1]["backward_passes"] for h in halves]
    assert all(0 < n < 60 - a["backward_passes"] for n in skipped)
    assert abs(sum(skipped) - (60 - a["backward_passes"])) <= 2
    assert json.loads((tmp_path / "second" / "jump_sweep.json").read_text())["window"] == [0.5, 1.0]
    assert "only from 0 to 0.5 of the run" in (tmp_path / "first" / "jump_sweep.md").read_text()
    with pytest.raises(SystemExit, match="window"):
        jump_sweep.summarize([tmp_path / "first", tmp_path / "second"])
    # another validation size: the same training, its val loss on fewer batches
    one = jump_sweep.main(["--quick", "--workloads", "mlp", "--points", "4:4", "--val-batches", "1",
                           "--out", str(tmp_path / "one")])
    assert one["mlp"][1]["backward_passes"] == a["backward_passes"] and one["mlp"][0]["final_val"] != plain["final_val"]
    assert json.loads((tmp_path / "one" / "jump_sweep.json").read_text())["val_batches"] == 1
    assert "validation on 1 batches per evaluation" in (tmp_path / "one" / "jump_sweep.md").read_text()
    with pytest.raises(SystemExit, match="validation size"):
        jump_sweep.summarize([tmp_path, tmp_path / "one"])
    # the drift's velocity over another span: the same skipped passes, another trajectory
    assert "drift_span" not in cfg["dynamics"]
    assert jump_sweep.jump_config("mlp", 12, 8.0, span=30)["dynamics"]["drift_span"] == 30
    spanned = jump_sweep.main(["--quick", "--workloads", "mlp", "--points", "4:4", "--span", "3",
                               "--out", str(tmp_path / "spanned")])
    assert spanned["mlp"][1]["final_val"] != a["final_val"]
    assert json.loads((tmp_path / "spanned" / "jump_sweep.json").read_text())["span"] == 3
    assert "the drift over 3 observations" in (tmp_path / "spanned" / "jump_sweep.md").read_text()
    with pytest.raises(SystemExit, match="span"):
        jump_sweep.summarize([tmp_path, tmp_path / "spanned"])
    with pytest.raises(SystemExit):
        jump_sweep.main(["--points", "24"])
    for bad in (["--judge-start-scale", "0.5"], ["--start", "0.6", "--until", "0.5"], ["--until", "1.5"],
                ["--val-batches", "0"], ["--span", "0"]):
        with pytest.raises(SystemExit):
            jump_sweep.main(["--quick", "--workloads", "mlp", "--points", "4:4", *bad, "--out", str(tmp_path / "no")])
    assert not (tmp_path / "no").exists()  # refused before anything ran


def test_val_batches_overrides_the_workloads_validation_size_and_refuses_zero(tmp_path):
    args = types.SimpleNamespace(quick=False, regime="adamw_cosine", out=tmp_path)
    assert time_to_loss.load_spec("cnn", args)["val_batches"] == 8
    assert time_to_loss.load_spec("cnn", types.SimpleNamespace(**vars(args), val_batches=32))["val_batches"] == 32
    assert time_to_loss.val_batches_arg("3") == 3
    with pytest.raises(argparse.ArgumentTypeError):
        time_to_loss.val_batches_arg("0")


def test_layer_masked_drift_moves_only_the_named_layers_by_the_drift(tmp_path):
    traj = types.SimpleNamespace(names=["net.0.weight", "net.0.bias", "net.2.weight"], numels=[4, 2, 3])
    moved = torch.arange(1.0, 10.0)
    drift = jump_sweep.LayerMaskedDrift(3, 1, span=1, gain=2.0, prefixes=("net.0.",))
    whole = jump_sweep.Drift(3, 1, span=1, gain=2.0)
    for d in (drift, whole):
        d._snaps.extend([(0, torch.zeros(9)), (8, moved.clone())])
    full = whole.predict_displacement(traj, 4)
    assert torch.equal(full, moved * 2.0 * 4 / 8)
    assert torch.equal(drift.predict_displacement(traj, 4), torch.cat([full[:6], torch.zeros(3)]))
    nothing = jump_sweep.LayerMaskedDrift(3, 1, span=1, gain=2.0, prefixes=("head",))
    nothing._snaps.extend([(0, torch.zeros(9)), (8, moved.clone())])
    with pytest.raises(ValueError, match="no parameter name starts with head"):
        nothing.predict_displacement(traj, 4)
    assert jump_sweep.drift_factory({"predictor": "drift"}, None) is None
    built = jump_sweep.drift_factory(jump_sweep.jump_config("mlp", 12, 8.0), ["net.2"])(3, 1)
    assert (built.gain, built.span, built.prefixes) == (8.0, 10, ("net.2",))
    res = jump_sweep.main(["--quick", "--workloads", "mlp", "--points", "4:4", "--only-layers", "net.0.",
                           "--out", str(tmp_path)])
    sweep = json.loads((tmp_path / "jump_sweep.json").read_text())
    assert sweep["only_layers"] == ["net.0."] and res["mlp"][1]["backward_passes"] < 60
    assert "moving only net.0." in (tmp_path / "jump_sweep.md").read_text()


def test_control_drift_jumps_as_far_as_the_drift_but_back_or_in_a_random_direction(tmp_path):
    traj = types.SimpleNamespace(names=["a", "b"], numels=[6, 3])
    moved = torch.arange(1.0, 10.0)

    def built(direction, seed=0):
        d = jump_sweep.ControlDrift(2, 1, span=1, gain=2.0, direction=direction, seed=seed)
        d._snaps.extend([(0, torch.zeros(9)), (8, moved.clone())])
        return d.predict_displacement(traj, 4)

    full = moved * 2.0 * 4 / 8
    assert torch.equal(built("negative"), -full)
    rand = built("random")
    for r, f in zip(rand.split([6, 3]), full.split([6, 3])):
        assert torch.allclose(r.norm(), f.norm())  # as far, per tensor
        assert abs(torch.nn.functional.cosine_similarity(r, f, dim=0)) < 0.99  # not along the drift
    assert torch.equal(built("random"), rand) and not torch.equal(built("random", seed=1), rand)
    with pytest.raises(ValueError, match="negative or random"):
        jump_sweep.ControlDrift(2, 1, span=1, gain=2.0, direction="drift")
    # tangential jumps: the random direction is as long as the *projected* drift, and projected itself
    params = [torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0, 0.0])]
    real = Trajectory(params)
    turned = jump_sweep.ControlDrift(2, 1, span=1, gain=1.0, direction="random", tangential=True)
    turned._snaps.extend([(0, torch.zeros(5)), (1, torch.tensor([3.0, 4.0, 1.0, 1.0, 0.0]))])
    out = turned.predict_displacement(real, 1)
    projected = real.tangential(torch.tensor([3.0, 4.0, 1.0, 1.0, 0.0]))  # [0, 0, 0, 1, 0]: along itself removed
    for o, f, w in zip(out.split([2, 3]), projected.split([2, 3]), params):
        assert torch.allclose(o.norm(), f.norm()) and abs(float(o @ w)) < 1e-5
    assert torch.allclose(real.tangential(out), out, atol=1e-6)  # the engine's projection changes nothing
    cfg = jump_sweep.jump_config("mlp", 12, 8.0)
    assert jump_sweep.drift_factory(cfg, None, "drift") is None
    assert jump_sweep.drift_factory(cfg, None, "negative")(3, 1).direction == "negative"
    with pytest.raises(ValueError, match="every layer"):
        jump_sweep.drift_factory(cfg, ["net.0."], "random")
    jump_sweep.main(["--quick", "--workloads", "mlp", "--points", "4:4", "--direction", "random",
                     "--out", str(tmp_path)])
    sweep = json.loads((tmp_path / "jump_sweep.json").read_text())
    assert sweep["direction"] == "random"
    assert "control: a random direction" in (tmp_path / "jump_sweep.md").read_text()


def test_jump_sweep_summary_lists_the_points_every_seed_ran_with_their_mean_change(tmp_path):
    def sweep(seed: int, rows: list[tuple[str, float]], name: str = "") -> str:
        d = tmp_path / (name or f"s{seed}")
        d.mkdir()
        res = [{"point": p, "final_val": v, "vs_baseline": v / rows[0][1] - 1.0} for p, v in rows]
        (d / "jump_sweep.json").write_text(json.dumps({"seed": seed, "regime": "low_lr", "results": {"mlp": res}}))
        return str(d)

    dirs = [sweep(0, [("plain", 2.0), ("24:16", 1.9), ("24:1", 2.0)]), sweep(1, [("plain", 1.0), ("24:16", 1.1)])]
    assert jump_sweep.main(["--summarize", *dirs]) == {}
    lines = jump_sweep.summarize([tmp_path / "s0", tmp_path / "s1"]).splitlines()
    assert "Seeds 0 / 1, regime low_lr, jumps unguarded" in lines[0]
    assert "| mlp | plain | 2.0000 / 1.0000 | | |" in lines
    assert "| mlp | 24:16 | 1.9000 / 1.1000 | -5.0% / +10.0% | +2.5% |" in lines
    assert not any("24:1 " in x for x in lines)  # seed 1 did not run it
    # a second sweep of seed 1 adds its points; the point seed 1 ran already keeps its first value
    sweep(1, [("plain", 1.0), ("24:1", 0.9), ("24:16", 5.0)], "s1_more")
    lines = jump_sweep.summarize([tmp_path / "s0", tmp_path / "s1", tmp_path / "s1_more"]).splitlines()
    assert "Seeds 0 / 1," in lines[0]
    assert "| mlp | 24:1 | 2.0000 / 0.9000 | +0.0% / -10.0% | -5.0% |" in lines
    sweep(1, [("plain", 1.5), ("24:2", 0.9)], "s1_other")  # seed 1's plain run ended elsewhere: not the same setup
    with pytest.raises(SystemExit, match="ended elsewhere"):
        jump_sweep.summarize([tmp_path / "s1", tmp_path / "s1_other"])
    other = json.loads((tmp_path / "s0" / "jump_sweep.json").read_text()) | {"regime": "adamw_cosine"}
    (tmp_path / "s0_cosine").mkdir()
    (tmp_path / "s0_cosine" / "jump_sweep.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="another regime"):
        jump_sweep.summarize([tmp_path / "s1", tmp_path / "s0_cosine"])
    other = json.loads((tmp_path / "s0" / "jump_sweep.json").read_text()) | {"judge": 48}
    (tmp_path / "s0_judged").mkdir()
    (tmp_path / "s0_judged" / "jump_sweep.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="judge"):
        jump_sweep.summarize([tmp_path / "s1", tmp_path / "s0_judged"])
    assert "jumps unguarded, block judge of 48 steps" in jump_sweep.summarize([tmp_path / "s0_judged"])
    for seed, train in ((0, [0.5, 0.4]), (1, [1.0, 1.2])):  # sweeps that measured the training loss at the end
        d = tmp_path / f"t{seed}"
        sw = json.loads((tmp_path / f"s{seed}" / "jump_sweep.json").read_text())
        sw["results"]["mlp"] = [r | {"final_train": t} for r, t in zip(sw["results"]["mlp"], train)]
        d.mkdir()
        (d / "jump_sweep.json").write_text(json.dumps(sw))
    with_train = jump_sweep.summarize([tmp_path / "t0", tmp_path / "t1"]).splitlines()
    assert "| mlp | 24:16 | 1.9000 / 1.1000 | -5.0% / +10.0% | +2.5% | +0.0% |" in with_train  # -20% and +20%
    assert "| mlp | plain | 2.0000 / 1.0000 | | | |" in with_train
    assert "| mlp | 24:16 | 1.9000 / 1.1000 | -5.0% / +10.0% | +2.5% |" in lines


def test_jump_judge_jumps_only_in_j_blocks_and_probes_at_every_boundary(tmp_path):
    spec = _quick_mlp()
    spec["_out"], spec["_regime"] = str(tmp_path), "adamw_cosine"
    cfg, block = jump_sweep.jump_config("mlp", 2, 4.0, quick=True), 6
    seen: list[tuple[int, int]] = []  # (global step, predicted steps so far) at every step's start
    sched = []

    class Record(Callback):
        def __init__(self, cb):
            self.cb = cb

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.global_step, self.cb.engine.counters["predicted_steps"]))

    def extra(cb):
        sched.append(jump_judge.BlockSchedule(cb, start=10, block=block))
        return [sched[0], Record(cb)]

    run = time_to_loss.train(spec, "hybrid", 60, spec["lr"], 0, cfg, "cpu", extra_callbacks=extra)
    predicted = [g for (g, c), (_, c1) in zip(seen, seen[1:]) if c1 > c]
    assert predicted and run.backward_passes == 60 - len(predicted)
    # with blocks of 6 a jump falls due on a J block's last step (16): the engine decides it a step ahead
    assert all(jump_judge.PATTERN[(s - 10) // block % 4] == "J" for s in predicted)
    assert [s for s, _ in sched[0].points] == list(range(10, 60, block))


def test_jump_judge_statistic_cancels_a_linear_trend_and_sees_the_j_blocks_extra_progress():
    # progress per block falls linearly (1.0, 0.9, ...); J blocks (1st and 4th of each group) gain 0.05 more
    progress = [1.0 - 0.1 * i + (0.05 if "JNNJ"[i % 4] == "J" else 0.0) + 0.001 * (i % 3) for i in range(8)]
    losses = [10.0]
    for x in progress:
        losses.append(losses[-1] - x)
    out = jump_judge.judge(list(enumerate(losses)))
    assert out["groups"] == 2 and out["mean_d"] == pytest.approx(0.05, abs=0.002) and out["t"] > 2
    assert jump_judge.verdict(out["t"]) == "jumps pay" and jump_judge.verdict(-3.0) == "jumps harm"
    assert jump_judge.verdict(None) == "no evidence" and jump_judge.judge(list(enumerate(losses[:5])))["t"] is None


def test_time_to_interpolates_and_reports_not_reached():
    P = time_to_loss.Point
    curve = [P(10, 1.0, 10, 2.0), P(20, 2.0, 20, 1.0), P(30, 3.0, 30, 0.5)]
    assert time_to_loss.time_to(curve, 1.5) == 1.5
    assert time_to_loss.time_to(curve, 0.5) == 3.0
    assert time_to_loss.time_to(curve, 0.4) is None
    assert time_to_loss.time_to(curve, 1.0, "backward") == 20


def test_dynamics_quality_quick_prints_the_summary(tmp_path, capsys):
    summary = dynamics_quality.main(["--quick", "--workloads", "mlp", "--out", str(tmp_path)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) == {"loss_r2", "delta_cosine", "correction_gain", "coverage_2sigma", "confidence_query_us"}
    assert last == json.loads(json.dumps(summary))


def _quick_mlp() -> dict:
    spec = yaml.safe_load((time_to_loss.HERE / "workloads" / "mlp.yaml").read_text())
    spec.update(spec.pop("quick"))
    return spec


def test_regimes_change_only_what_they_name():
    spec = _quick_mlp()
    assert regimes.regime_spec(spec, "adamw_cosine") == spec
    flat = regimes.regime_spec(spec, "constant_lr")
    assert flat["model_args"]["final_lr_frac"] == 1.0 and flat["lr"] == spec["lr"]
    assert regimes.regime_spec(spec, "low_lr")["lr"] == spec["lr"] / 10
    big = regimes.regime_spec(spec, "large_batch")
    assert big["data_args"]["batch_size"] == 4 * spec["data_args"]["batch_size"]
    assert regimes.regime_spec(spec, "sgd")["lr"] == spec["sgd_lr"]
    decayed = regimes.regime_spec(spec, "tuned_wd")
    assert decayed["model_args"]["weight_decay"] == spec["tuned_wd"]["weight_decay"] > 0
    assert decayed["lr"] == spec["tuned_wd"]["lr"]
    with pytest.raises(ValueError, match="tuned_wd entry"):
        regimes.regime_spec({k: v for k, v in spec.items() if k != "tuned_wd"}, "tuned_wd")
    assert "final_lr_frac" not in spec["model_args"] and "weight_decay" not in spec["model_args"]  # left alone
    model = time_to_loss._load(spec["model"])(**spec["model_args"], lr=0.1, total_steps=100)
    assert isinstance(regimes.regime_model(model, "low_lr").configure_optimizers()["optimizer"], torch.optim.AdamW)
    sgd = regimes.regime_model(model, "sgd").configure_optimizers()["optimizer"]
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["lr"] == 0.1


def test_finetune_regime_trains_at_its_own_lr_from_a_source_task_trained_as_tuned():
    spec = _quick_mlp()
    tuned = regimes.regime_spec(spec, "finetune")
    assert (tuned["lr"], tuned["lr_sweep"]) == (spec["finetune"]["lr"], spec["finetune"]["lr_sweep"])
    source = regimes.source_spec(tuned)
    assert (source["lr"], source["_regime"]) == (spec["lr"], "adamw_cosine")  # the workload as tuned
    gpt = yaml.safe_load((time_to_loss.HERE / "workloads" / "char_gpt.yaml").read_text())
    gpt_source = regimes.source_spec(regimes.regime_spec(gpt, "finetune"))
    assert gpt_source["data_args"]["max_bytes"] == gpt["finetune"]["source"]["data_args"]["max_bytes"]
    assert gpt_source["data_args"]["block_size"] == gpt["data_args"]["block_size"]  # the rest kept
    assert gpt_source["_data_seed_offset"] == gpt["finetune"]["source"]["seed_offset"]
    with pytest.raises(ValueError, match="finetune entry"):
        regimes.regime_spec({k: v for k, v in spec.items() if k != "finetune"}, "finetune")
    assert "weight_decay" not in tuned["model_args"]
    decayed = regimes.regime_spec(spec, "finetune_wd")
    wd = spec["finetune"]["wd"]
    assert (decayed["lr"], decayed["model_args"]["weight_decay"]) == (wd["lr"], wd["weight_decay"])
    assert "weight_decay" not in regimes.source_spec(decayed)["model_args"]  # the fine-tuning runs', not the source's
    assert regimes.source_spec(decayed)["lr"] == spec["lr"]
    with pytest.raises(ValueError, match="wd for finetune_wd"):
        regimes.regime_spec({**spec, "finetune": {k: v for k, v in spec["finetune"].items() if k != "wd"}},
                            "finetune_wd")


def test_finetune_runs_start_from_the_source_weights_trained_once_per_seed(tmp_path):
    args = argparse.Namespace(quick=True, regime="finetune", val_batches=None, out=tmp_path)
    spec = time_to_loss.load_spec("mlp", args)
    start = time_to_loss.pretrained(spec, 0, "cpu")
    assert time_to_loss.pretrained(spec, 0, "cpu") is start  # cached: the source trains once per seed
    fresh = time_to_loss._load(spec["model"])(**spec["model_args"], lr=0.1, total_steps=1).state_dict()
    assert any(not torch.equal(start[k], fresh[k]) for k in fresh)  # trained, not an initialization

    class FirstWeights(Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    seen: dict = {}
    time_to_loss.train(spec, "baseline", 3, spec["lr"], 0, None, "cpu", extra_callbacks=lambda _: [FirstWeights()])
    assert seen.keys() == start.keys() and all(torch.equal(seen[k], start[k]) for k in start)
    other = time_to_loss.pretrained(spec, 1, "cpu")
    assert any(not torch.equal(start[k], other[k]) for k in start)


def test_wsd_regime_warms_up_stays_flat_then_decays_linearly_to_the_final_lr():
    spec = _quick_mlp()
    model = time_to_loss._load(spec["model"])(**spec["model_args"], lr=0.1, total_steps=100)
    out = regimes.regime_model(model, "wsd").configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and isinstance(sched.lr_lambdas[0], regimes.WarmupStableDecay)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1 / 5) and lrs[4] == pytest.approx(0.1)  # 5% warmup
    assert all(x == pytest.approx(0.1) for x in lrs[4:81])  # flat until 80% of the run
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))  # then falls, linearly, toward 10%
    assert lrs[99] == pytest.approx(0.1 * (1 - 0.9 * 19 / 20))
    assert regimes.WarmupStableDecay(100)(1000) == pytest.approx(0.1)


def test_predict_until_moves_the_engines_end_of_run_rule_earlier():
    engine = types.SimpleNamespace(step_limit=1000, step=0)
    cb = time_to_loss.PredictUntil(types.SimpleNamespace(engine=engine), 0.8)
    trainer = types.SimpleNamespace(max_steps=1000, global_step=0)
    cb.on_train_batch_start(trainer, None, None, 0)
    assert engine.step_limit == 800
    engine.step_limit = 500  # an earlier limit (a resumed run, say) stays
    cb.on_train_batch_start(trainer, None, None, 1)
    assert engine.step_limit == 500
    engine.step_limit, engine.step, trainer.global_step = None, 10, 300  # a fresh engine 300 steps in
    cb.on_train_batch_start(trainer, None, None, 2)
    assert engine.step_limit == 510
    engine.step_limit, trainer.max_steps = None, -1  # length unknown: no limit
    cb.on_train_batch_start(trainer, None, None, 3)
    assert engine.step_limit is None
    with pytest.raises(SystemExit):
        time_to_loss.main(["--quick", "--predict-until", "1.5"])


def test_overhead_modes_run_the_configs_they_name():
    assert overhead.MODES["monitor_read_late"]["idle_read_every"] == 16
    for mode in ("monitor_only", "monitor_read_late"):
        seconds, report = overhead.per_step(_quick_mlp(), 60, overhead.MODES[mode], "cpu")
        assert math.isfinite(seconds) and seconds > 0
        assert report["observe_share"] == 0.0 and report["dormant_steps"] == 0  # prediction off: never asleep


def test_step_attribution_splits_the_extra_time_by_the_engines_labels():
    plain = [1.0] * 10
    times = [1.1] * 8 + [2.0, 2.0]
    kinds = ["plain"] * 8 + ["observe"] * 2
    out = step_attribution.split(plain, times, kinds)
    total = sum(times)
    assert out["monitoring"] == pytest.approx(8 * 0.1 / total) and out["observation"] == pytest.approx(2 * 0.9 / total)
    assert out["extra"] == pytest.approx((total - 10) / total)
    assert out["steps"] == {"plain": 8, "observe": 2, "other": 0}
    times, kinds, share = step_attribution.timed_run(_quick_mlp(), 80, {"predict_threshold": 0.999}, "cpu")
    assert len(times) == len(kinds) == 30 and set(kinds) <= {"plain", "observe", "other"} and 0.0 <= share < 1.0


def test_predictor_value_runs_anchor_the_lasting_value(capsys):
    out = predictor_value.main(["--quick", "--workloads", "mlp", "--predictors", "real", "null", "tail_average",
                                "--horizon", "4", "--min-full", "8", "--regimes", "sgd", "--line-search", "0.5", "2"])
    real, null, tail = out
    assert real["predicted_steps"] == 0 and real["phases"] == 0 and real["lasting_q"] is None
    assert null["predicted_steps"] > 0 and null["phases"] > 0
    assert null["refused"] == 0 and null["median_step_length"] == 1.0  # the control is never line-searched
    assert tail["refused"] + tail["phases"] > 0 and tail["median_step_length"] in (None, 0.5, 2.0)
    assert math.isfinite(real["final_val"]) and "| mlp | sgd | null |" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # its runs start from an initialization, never from a source task's weights
        predictor_value.main(["--quick", "--regimes", "finetune"])


def test_predictor_value_control_and_unguarded_runs():
    out = predictor_value.main(["--quick", "--workloads", "mlp", "--predictors", "null", "control", "drift",
                                "--horizon", "4", "--min-full", "8", "--unguarded", "--drift-span", "3"])
    null, control, drift = out
    # the equal-compute control: plain training for as many real steps as the null run took
    assert control["predicted_steps"] == 0 and control["steps"] == null["steps"] - null["predicted_steps"]
    assert drift["phases"] > 0 and drift["kept"] == drift["phases"]
    # unguarded: the probe still measures q, but a phase is kept unless its probe loss grows 11-fold
    for unguarded, kept in ((False, False), (True, True)):
        cfg = predictor_value.forced_config(100, "drift", 4, 8, unguarded=unguarded, drift_span=3)
        assert cfg.dynamics.drift_span == 3
        monitor = DivergenceMonitor(cfg.divergence)
        assert monitor.check_phase(1.0, 5.0).alarm is not kept and monitor.check_phase(1.0, 12.0).alarm
    with pytest.raises(SystemExit):  # the control needs the null run's count of real steps
        predictor_value.main(["--quick", "--workloads", "mlp", "--predictors", "control"])


def test_averaged_probe_leaves_training_alone_and_midrun_q_compares_at_equal_steps():
    spec = yaml.safe_load((time_to_loss.HERE / "workloads" / "mlp.yaml").read_text())
    spec.update(spec.pop("quick"))
    spec["steps"] = 90  # two probes
    plain, probed = (predictor_value.measure(spec, "null", 4, 8, averaged_probe=on) for on in (False, True))
    assert plain["probe_curve"] is None and [t for t, _, _ in probed["probe_curve"]] == [40, 80]
    assert probed["final_val"] == plain["final_val"]  # the probe's forwards and weight swaps change nothing
    run = lambda p, curve: {"workload": "w", "regime": "r", "predictor": p, "probe_curve": curve}  # noqa: E731
    out = [run("real", [(40, 1.0, 0.5), (80, 1.0, 0.5)]), run("null", [(40, 2.0, 1.5), (80, 1.0, 0.5)]),
           run("drift", [(40, 1.25, 1.5), (80, 0.9, 0.4), (120, 0.1, 0.1)])]  # no 120 elsewhere: not compared
    rows = predictor_value.midrun_q(out)
    assert [(r["step"], r["q_weights"], r["q_ema"]) for r in rows] == [(40, 0.75, 0.0), (80, None, None)]


def test_fork_judge_leaves_training_alone_and_its_counterfactual_differs_only_by_the_phases():
    spec = yaml.safe_load((time_to_loss.HERE / "workloads" / "mlp.yaml").read_text())
    spec.update(spec.pop("quick"))
    spec["steps"] = 90
    runs = {(pred, on): predictor_value.measure(spec, pred, 4, 8, unguarded=True, drift_span=2,
                                                fork_judge=(4, 12) if on else ())
            for pred in ("null", "drift") for on in (False, True)}
    for pred in ("null", "drift"):
        assert runs[pred, False]["fork_judge"] is None
        # the counterfactual's training, weight swaps and probe forwards change nothing in the run itself
        assert runs[pred, True]["final_val"] == runs[pred, False]["final_val"]
        rows = runs[pred, True]["fork_judge"]
        assert rows and all(set(x["loss"]) == {0, 4, 12} and set(x["avg"]) == {4, 12} for x in rows)
        # r = 12 > min_full: the window holds the next phase too, which the counterfactual does not have
        assert all(x["predicted"] == {0: 4, 4: 4, 12: 8} for x in rows)
    # null phases change nothing: the counterfactual is the same weights trained on the same batches at the same LRs
    assert all(p == c for x in runs["null", True]["fork_judge"] for p, c in x["loss"].values())
    assert any(p != c for x in runs["drift", True]["fork_judge"] for p, c in x["loss"].values())


def test_fork_judge_q_weighs_the_loss_saved_against_the_counterfactuals_progress_per_real_step():
    row = lambda saved: {"predicted": {0: 4, 2: 8}, "loss": {0: (1.5, 1.0), 2: (0.8 - saved, 0.8)}}  # noqa: E731
    # the counterfactual gained 0.1 per real step; 8 predicted steps worth as much would save 0.8
    assert predictor_value.fork_judge_q([row(0.4), row(0.0)], 2) == pytest.approx(0.25)
    assert predictor_value.fork_judge_q([row(0.4)], 0) is None and predictor_value.fork_judge_q([], 2) is None


def test_hook_profile_times_the_plugins_hooks_only_where_the_plugin_runs():
    out = hook_profile.main(["--workloads", "mlp", "--steps", "100"])["mlp"]
    assert set(out) == {"plain", "monitor_only", "never_confident"}
    assert list(out["plain"]) == ["run_training_batch"]
    for mode in ("monitor_only", "never_confident"):
        hooks = {k.split(".")[-1]: v for k, v in out[mode].items()}
        assert hooks["on_train_batch_end"] > 0 and hooks["on_before_optimizer_step"] > 0


def test_step_cost_splits_every_step_of_the_hybrid_run_by_kind(tmp_path):
    [r] = step_cost.main(["--quick", "--variant", "tail_average_every24", "--regime", "adamw_cosine",
                          "--repeats", "1", "--out", str(tmp_path)])
    kinds = r["kinds"]
    assert sum(k["steps"] for k in kinds.values()) == r["steps"] == r["plain_steps"]
    assert r["predicted_steps"] == kinds["predicted"]["steps"] + kinds["predicted, judged"]["steps"] > 0
    # every phase that starts ends with a judgement (none is started that max_steps would cut short)
    assert kinds["real, starts phase"]["steps"] == kinds["predicted, judged"]["steps"]
    assert r["c_end_to_end"] is not None and "c (end to end)" in (tmp_path / "step_cost.md").read_text()


def test_lasting_q_scales_the_null_runs_loss_to_the_runs_share_of_predicted_steps():
    def run(pred, predicted, final):
        return {"workload": "w", "regime": "r", "predictor": pred, "predicted_steps": predicted, "steps": 100,
                "final_val": final}

    out = [run("real", 0, 1.0), run("null", 40, 2.0), run("half", 20, 1.25), run("tiny", 2, 1.0),
           run("worse", 40, 2.5)]
    predictor_value.lasting_q(out)
    assert [r["lasting_q"] for r in out] == [None, 0.0, 0.5, None, -0.5]


class _PrefixRecorder(Callback):
    """After PartialPredict's own hook: the prefix's and the rest's parameters and the LR, per step."""

    def __init__(self, cb: partial_predict.PartialPredict) -> None:
        self.cb, self.steps = cb, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        prefix = torch.cat([p.detach().flatten() for p in self.cb._params(pl_module)])
        rest = torch.cat([p.detach().flatten() for n, p in pl_module.named_parameters()
                          if not n.startswith(self.cb.prefix)])
        self.steps.append((self.cb._frozen, prefix.clone(), rest.clone(), trainer.optimizers[0].param_groups[0]["lr"]))


@pytest.mark.parametrize("mean_velocity", [False, True])
def test_partial_steps_train_the_rest_and_move_the_prefix_only_by_its_prediction(mean_velocity):
    spec = _quick_mlp()
    spec["_out"], spec["_regime"] = "", "adamw_cosine"
    cb = partial_predict.PartialPredict(("net.0.",), "windows", mean_velocity, full=8, partial=4)
    rec = _PrefixRecorder(cb)
    time_to_loss.train(spec, "partial", 60, 3e-3, 0, None, "cpu", extra_callbacks=lambda _: [cb, rec])
    assert cb.partial_steps == sum(frozen for frozen, *_ in rec.steps) == 16  # 54 steps after warmup: 4 windows of 4
    moves = []
    for (_, p0, r0, _), (frozen, p1, r1, lr) in zip(rec.steps, rec.steps[1:]):
        assert not torch.equal(r0, r1)  # the rest always takes a real step
        if frozen:
            moves.append((p1 - p0, lr))
        else:
            assert not torch.equal(p0, p1)
    if not mean_velocity:
        assert all(not d.any() for d, _ in moves)
        return
    # within a window every partial step moves along the window's mean velocity, scaled by the LR
    windows = [moves[i:i + 4] for i in range(0, len(moves), 4)]
    for window in windows:
        (d0, lr0), *rest = window
        assert d0.abs().sum() > 0
        for d, lr in rest:
            torch.testing.assert_close(d, d0 * (lr / lr0), rtol=1e-3, atol=1e-7)  # atol: float32 rounding of p
    assert not torch.allclose(windows[0][0][0], windows[1][0][0])  # a new window, a new velocity


def test_partial_predict_quick_writes_json_and_table(tmp_path, capsys):
    rows = partial_predict.main(["--quick", "--workloads", "mlp", "--seeds", "0", "--variants", "baseline",
                                 "control_0.8", "windows_mean_velocity", "windows_mean_velocity_guarded",
                                 "--full", "8", "--partial", "4", "--prefix", "net.0.", "--out", str(tmp_path)])
    assert [r["steps"] for r in rows] == [60, 48, 60, 60] and [r["partial"] for r in rows] == [0, 0, 16, 16]
    assert rows[2]["windows"] == rows[3]["windows"] == 4 and rows[2]["rolled_back"] == 0 <= rows[3]["rolled_back"]
    assert json.loads((tmp_path / "partial_predict.json").read_text())[2]["variant"] == "windows_mean_velocity"
    table = (tmp_path / "partial_predict.md").read_text()
    assert "| mlp | windows_mean_velocity | 16 |" in table and table in capsys.readouterr().out
    assert f"| mlp | windows_mean_velocity_guarded | 16 (windows rolled back: {rows[3]['rolled_back']} of 4) |" in table


def test_the_guard_keeps_the_prefix_where_the_probe_loss_is_lower():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    x = torch.randn(32, 4)
    batch = (x, model(x).detach())  # the current weights fit these targets exactly
    cb = partial_predict.PartialPredict(("0.",), "windows", True, guarded=True)
    good = [p.detach().clone() for p in cb._params(model)]
    with torch.no_grad():  # a wild prediction: the window started at the good weights
        cb._start = [g.clone() for g in good]
        for p in cb._params(model):
            p.add_(torch.randn_like(p))
    cb._judge(model, batch)
    assert cb.rolled_back == 1 and all(torch.equal(p, g) for p, g in zip(cb._params(model), good))
    with torch.no_grad():  # now the window started from worse weights: the prediction stays
        cb._start = [g + torch.randn_like(g) for g in good]
    cb._judge(model, batch)
    assert cb.rolled_back == 1 and all(torch.equal(p, g) for p, g in zip(cb._params(model), good))
    assert model.training  # the probes ran in eval mode and the mode is restored


@pytest.mark.parametrize(("partial_gain", "expected"),
                         [(2.0, [1, 0, 0, 1, 1, 1, 1, 1]), (0.5, [1, 0, 0, 1, 0, 0, 0, 0])])
def test_the_adaptive_variant_runs_the_slots_whose_progress_lasts(monkeypatch, partial_gain, expected):
    clock = iter(range(10_000))
    monkeypatch.setattr(partial_predict.time, "perf_counter", lambda: float(next(clock)))
    cb = partial_predict.PartialPredict(("x",), "windows", True, full=2, partial=1, adaptive=True)
    trainer = types.SimpleNamespace(max_steps=100)
    level, arms = 10.0, []
    for t in range(34):  # warmup ends at step 10; then 2 full steps and a 1-step slot, 8 times
        cb._step = t
        if cb._partial(t, 100):
            arms.append(cb._arm)
            level -= partial_gain if cb._arm else 1.0  # what a slot's steps are worth once the next stretch ran
        else:
            cb._track(trainer, {"loss": torch.tensor(level)})
    assert [int(a) for a in arms] == expected and cb.slots == 8 and cb.partial_slots == sum(expected)


def test_windows_fall_only_between_the_chosen_fractions_of_the_run():
    everywhere = partial_predict.PartialPredict(("x",), "windows", True, full=2, partial=1)
    late = partial_predict.PartialPredict(("x",), "windows", True, full=2, partial=1, between=(0.5, 1.0))
    slots = [t for t in range(100) if everywhere._partial(t, 100)]
    assert slots[0] == 12 and slots == list(range(12, 100, 3))  # warmup 10 steps, then every third step
    assert [t for t in range(100) if late._partial(t, 100)] == [t for t in slots if t >= 50]


@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_mean_velocity_is_the_displacement_per_step_between_the_snapshots_it_spans(gain):
    spec = _quick_mlp()
    spec["_out"], spec["_regime"] = "", "adamw_cosine"
    cb = partial_predict.PartialPredict(("net.0.",), "windows", True, full=8, partial=4, gain=gain)
    rec = _PrefixRecorder(cb)
    time_to_loss.train(spec, "partial", 60, 3e-3, 0, None, "cpu", extra_callbacks=lambda _: [cb, rec])
    frozen = [f for f, *_ in rec.steps]
    starts = [t for t in range(1, 60) if frozen[t] and not frozen[t - 1]]
    assert starts == [14, 26, 38, 50]  # warmup 6 steps, then 8 full + 4 partial
    for start in starts[1:]:  # the first window's snapshots do not cross a partial window yet
        snaps = [t for t in range(start) if not frozen[t] and t % partial_predict.SNAP_EVERY == 0]
        t0, t1 = snaps[-partial_predict.SNAPS:][0], snaps[-1]
        assert any(frozen[t0:t1])  # the span crosses the previous window: counted in steps, not snapshots
        moved = rec.steps[start][1] - rec.steps[start - 1][1]
        lr, last_lr = rec.steps[start][3], rec.steps[t1][3]
        expected = gain * (rec.steps[t1][1] - rec.steps[t0][1]) / (t1 - t0) * lr / last_lr
        torch.testing.assert_close(moved, expected, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_scaled_prefix_step_scales_only_the_prefix_and_only_inside_the_range(scale):
    spec = _quick_mlp()
    spec["_out"], spec["_regime"] = "", "adamw_cosine"

    def run(callbacks):
        recorder = _PrefixRecorder(types.SimpleNamespace(prefix=("net.0.",), _frozen=False,
                                                         _params=lambda m: [m.get_parameter("net.0.weight")]))
        time_to_loss.train(spec, "scaled", 40, 3e-3, 0, None, "cpu", extra_callbacks=lambda _: callbacks + [recorder])
        return recorder.steps

    plain = run([])
    scaled = run([partial_predict.ScaledPrefixStep(("net.0.",), scale, between=(0.5, 1.0))])
    if scale == 1.0:  # scaling by one changes nothing
        assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(plain, scaled))
        return
    assert all(torch.equal(a[1], b[1]) for a, b in zip(plain[:20], scaled[:20]))  # before the range: plain steps
    assert all(torch.equal(scaled[19][1], s[1]) for s in scaled[20:])  # inside it the prefix stands still
    assert all(not torch.equal(a[2], b[2]) for a, b in zip(scaled[20:], scaled[21:]))  # the rest trains
