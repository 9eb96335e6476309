from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_lightning import ConfigError, HybridConfig
from hybrid_lightning.core.judge import BlockJudge
from hybrid_lightning.core.predictors import NullPredictor
from tests.test_engine import _save_load, eager_config, make, params_of, run


def drive(judge: BlockJudge, losses, start_step=0, jumps=None):
    """Feed one real loss per step from ``start_step``; a phase starts at the first step of each J block (or at
    ``jumps``). -> the d of each judged group."""
    out = []
    for step, loss in enumerate(losses, start_step):
        starts = (step - judge.start) % judge.block == 0 if jumps is None else step in jumps
        if starts and step >= judge.start and judge.may_predict(step):
            judge.phase_started(step)
        judge.record(step, loss)
        d = judge.end_step(step)
        if d is not None:
            out.append(d)
    return out


def test_schedule_is_j_n_n_j_from_start_and_phases_stay_inside_their_block():
    j = BlockJudge(start=10, block=8)
    assert all(j.may_predict(s) for s in range(10))
    blocks = ["J" if j.may_predict(10 + 8 * b) else "N" for b in range(8)]
    assert "".join(blocks) == "JNNJJNNJ"
    assert [j.steps_left(s) for s in (10, 13, 17, 18)] == [8, 5, 1, 8]
    assert j.steps_left(4) == 14  # before start: up to the end of the first (J) block


def test_a_linear_trend_is_judged_zero_and_prediction_goes_on():
    # steps 0..7: the block before start, whose end starts the first group; J N N J tests only
    j = BlockJudge(start=8, block=8, exploit=False)
    ds = drive(j, [10.0 - 0.1 * s for s in range(8 + 96)])
    assert len(ds) == 3 and all(abs(d) < 1e-9 for d in ds)
    assert j.predicting and all(j.may_predict(s) for s in (104, 111))


def test_jumps_that_lower_the_loss_have_positive_d():
    # each J block falls 1.0 more than each N block
    losses, level = [], 10.0
    for s in range(8 + 64):
        level -= 0.1 + (0.125 if s >= 8 and "JNNJ"[(s - 8) // 8 % 4] == "J" else 0.0)
        losses.append(level)
    j = BlockJudge(start=8, block=8, exploit=False)
    ds = drive(j, losses)
    # a block's end is the mean of its last 2 steps: a boundary step of the neighbouring block leaks in
    assert ds == pytest.approx([1.0, 1.0], abs=0.1) and j.predicting and j.vetoes == 0


@pytest.mark.parametrize("exploit", [False, True])
def test_with_exploit_jumps_that_pay_run_in_every_block_for_1_2_4_groups_between_tests(exploit):
    j = BlockJudge(start=4, block=4, exploit=exploit)
    level, schedules = 10.0, []
    for s in range(4 + 16 * 12):
        if s >= 4 and (s - 4) % 16 == 0:
            schedules.append("".join("J" if j.may_predict(s + 4 * k) else "N" for k in range(4)))
        if s >= 4 and (s - 4) % 4 == 0 and j.may_predict(s):
            j.phase_started(s)
        level -= 0.2 if s >= 4 and j.may_predict(s) else 0.1  # predicting blocks make twice the progress
        j.record(s, level)
        j.end_step(s)
    if exploit:  # test, 1 group all J, test, 2, test, 4, test
        assert schedules == ["JNNJ", "JJJJ", "JNNJ"] + ["JJJJ"] * 2 + ["JNNJ"] + ["JJJJ"] * 4 + ["JNNJ", "JJJJ"]
    else:
        assert schedules == ["JNNJ"] * 12
    assert j.groups_judged == (4 if exploit else 12) and j.vetoes == 0


@pytest.mark.parametrize("margin, on", [(0.5, True), (0.2, False)])
def test_jump_blocks_slower_than_the_others_are_tolerated_within_the_margin(margin, on):
    # J blocks progress 0.6x as fast as N blocks: d = -0.4 x the N blocks' progress
    losses, level = [], 10.0
    for s in range(4 + 32):
        level -= 0.06 if s >= 4 and "JNNJ"[(s - 4) // 4 % 4] == "J" else 0.1
        losses.append(level)
    j = BlockJudge(start=4, block=4, margin=margin)
    ds = drive(j, losses)
    assert ds == pytest.approx([-0.16] * (2 if on else 1))  # vetoed: the second group is N N N N, not judged
    assert j.n_progress == pytest.approx([0.4] * len(ds))
    assert j.predicting is on and j.vetoes == (0 if on else 1)


def test_harmful_jumps_switch_prediction_off_for_1_2_4_groups():
    # J blocks raise the loss: every judged group vetoes; the pause doubles each time
    j = BlockJudge(start=4, block=4, window=2)  # a block's end: its last step's loss
    level, tested = 10.0, []
    for s in range(4 + 16 * 12):
        g, pos = (s - 4) // 16, (s - 4) // 4 % 4
        if s >= 4 and (s - 4) % 16 == 0 and j.may_predict(s):
            j.phase_started(s)
            tested.append(g)
        level += 0.05 if s >= 4 and g in tested and pos in (0, 3) else -0.05
        j.record(s, level)
        j.end_step(s)
    assert tested == [0, 2, 5, 10]  # off 1, then 2, then 4 groups
    assert j.vetoes == 4 and not j.predicting


def ramp_run(j: BlockJudge, paying: bool, groups: int) -> list[tuple[str, float]]:
    """Blocks of 4 steps from step 4, a phase at each J block's start; J blocks make twice the progress (or
    lose as much as the others make). -> per group: its pattern, and the scale each of its phases moved."""
    level, out = 10.0, []
    for s in range(4 + 16 * groups):
        if s >= 4 and (s - 4) % 16 == 0:
            out.append(("".join("J" if j.may_predict(s + 4 * k) else "N" for k in range(4)), []))
        if s >= 4 and (s - 4) % 4 == 0 and j.may_predict(s):
            j.phase_started(s)
            out[-1][1].append(j.scale(s))
        jumping = s >= 4 and j.may_predict(s)
        level += (-0.2 if paying else 0.1) if jumping else -0.1
        j.record(s, level)
        j.end_step(s)
    return [(pattern, sorted(set(scales))) for pattern, scales in out]


def test_the_ramp_doubles_the_scale_of_each_test_that_pays_and_exploits_only_a_tested_scale():
    j = BlockJudge(start=4, block=4, start_scale=0.125)
    assert j.scale(0) == 0.125  # before start too: a phase there is not judged by anything
    groups = ramp_run(j, paying=True, groups=12)
    assert groups == [("JNNJ", [0.125]), ("JJJJ", [0.125]), ("JNNJ", [0.25]), ("JJJJ", [0.25]), ("JJJJ", [0.25]),
                      ("JNNJ", [0.5])] + [("JJJJ", [0.5])] * 4 + [("JNNJ", [1.0]), ("JJJJ", [1.0])]
    assert j.vetoes == 0


def test_the_ramp_halves_the_scale_after_a_veto_down_to_its_start():
    j = BlockJudge(start=4, block=4, window=1, start_scale=0.25)
    j._trial = 1.0  # as if earlier tests had paid
    groups = ramp_run(j, paying=False, groups=12)
    tested = [scales[0] for pattern, scales in groups if pattern == "JNNJ"]
    assert tested == [1.0, 0.5, 0.25, 0.25] and j.vetoes == 4
    assert all(pattern == "NNNN" for pattern, _ in groups if pattern != "JNNJ")


def test_a_judge_state_from_before_the_ramp_resumes_at_the_whole_displacement():
    old = BlockJudge(start=4, block=4)
    ramp_run(old, paying=True, groups=3)
    sd = old.state_dict()
    del sd["scale"]
    j = BlockJudge(start=4, block=4, start_scale=0.25)
    j.load_state_dict(sd)
    assert j.scale(4 + 16 * 3) == 1.0


def test_without_the_ramp_every_phase_moves_the_whole_displacement():
    j = BlockJudge(start=4, block=4)
    for paying in (True, False):
        assert {x for _, scales in ramp_run(j, paying, groups=8) for x in scales} == {1.0}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), min_size=40, max_size=300), st.sampled_from([0.125, 0.25, 1.0]))
def test_the_ramp_scale_stays_a_power_of_two_between_its_start_and_1(losses, start_scale):
    j = BlockJudge(2, 4, window=2, start_scale=start_scale)
    levels = {start_scale * 2 ** k for k in range(4) if start_scale * 2 ** k <= 1}
    seen = set()
    for step, loss in enumerate(losses):
        seen.add(j.scale(step))
        if step % 3 == 0 and j.may_predict(step):
            j.phase_started(step)
        j.record(step, loss)
        j.end_step(step)
    assert seen <= levels


class FixedStep(NullPredictor):
    """Predicts the same displacement every time: 0.01 on every parameter."""

    def predict_displacement(self, trajectory, steps):
        return torch.full_like(trajectory.current, 0.01)


@pytest.mark.parametrize("start_scale", [1.0, 0.25])
def test_engine_moves_the_judges_scale_of_the_predicted_displacement(start_scale):
    cfg = judged_config(exploit=True)
    cfg.max_predict_steps, cfg.bandit.arms = 1, [0, 1]
    cfg.divergence.rollback_tolerance, cfg.corrector.weight_correction = 10.0, False
    cfg.judge.start_scale, cfg.predictor = start_scale, "null"  # the name validates; FixedStep predicts
    model, opt, engine = make(config=cfg.validate(), dynamics=FixedStep(4, 1))  # 4 tensors, basis rank 1
    moves = []
    for s in range(200):
        before = params_of(model)
        phase = run(model, opt, engine, s, s + 1).phases[0]
        if phase == "PREDICT":
            moves.append({round(float(x), 6) for a, b in zip(params_of(model), before) for x in (a - b).flatten()})
    assert moves and all(m == {round(0.01 * engine.judge.scale(0), 6)} for m in moves[:2]), moves
    assert engine.judge.start_scale == start_scale


def test_a_group_without_a_phase_or_with_unseen_block_ends_is_not_judged():
    j = BlockJudge(start=8, block=8)
    ds = drive(j, [10.0 - 0.1 * s for s in range(40)], jumps=set())
    assert ds == [] and j.groups_judged == 0
    j = BlockJudge(start=16, block=8)  # losses start at 16: the tail before start (12..15) is unseen
    assert drive(j, [10.0 - 0.1 * s for s in range(32)], start_step=16) == []


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), min_size=40, max_size=160), st.integers(0, 159), st.integers(4, 12),
       st.integers(1, 3), st.sampled_from([1.0, 0.25]))
def test_state_dict_resumes_the_judge_exactly(losses, cut, block, window, start_scale):
    cut = min(cut, len(losses))
    jumps = set(range(0, 200, 3))
    ref = BlockJudge(2, block, window, start_scale=start_scale)
    expected = drive(ref, losses, jumps=jumps)
    a = BlockJudge(2, block, window, start_scale=start_scale)
    first = drive(a, losses[:cut], jumps=jumps)
    b = BlockJudge(2, block, window, start_scale=start_scale)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    rest = drive(b, losses[cut:], start_step=cut, jumps=jumps)
    assert first + rest == expected
    assert b.state_dict() == ref.state_dict()


def test_config_accepts_0_or_at_least_4_steps():
    assert HybridConfig.from_dict({"judge": {"block": 48}}).judge.block == 48
    ramp = {"predictor": "drift", "judge": {"block": 48, "start_scale": 0.125}}
    assert HybridConfig.from_dict(ramp).judge.start_scale == 0.125
    with pytest.raises(ConfigError, match="start_scale"):  # the default predictor moves no displacement to scale
        HybridConfig.from_dict({"judge": {"block": 48, "start_scale": 0.125}})
    for bad in ({"block": 2}, {"block": -1}, {"window": 0}, {"start_scale": 0.0}, {"start_scale": 1.5}):
        with pytest.raises(ConfigError, match="judge"):
            HybridConfig.from_dict({"judge": bad})


def judged_config(block=12, exploit=False):
    cfg = eager_config()
    cfg.min_full_steps, cfg.max_predict_steps = 2, 6
    cfg.bandit.cooldown_steps = 0
    cfg.judge.block, cfg.judge.exploit = block, exploit
    return cfg.validate()


def test_engine_predicts_only_inside_j_blocks():
    cfg = judged_config()
    model, opt, engine = make(config=cfg)
    res = run(model, opt, engine, 0, 300)
    predicted = [s for s, p in enumerate(res.phases) if p == "PREDICT"]
    assert predicted, "the judge must leave J blocks to predict in"
    judge = engine.judge
    assert all(judge.start <= s and "JNNJ"[(s - judge.start) // judge.block % 4] == "J" for s in predicted)
    assert engine.counters["judged_groups"] == judge.groups_judged >= 1
    # the control: without the judge, this run predicts in what would be N blocks too
    cfg0 = judged_config(block=0)
    model, opt, engine = make(config=cfg0)
    res = run(model, opt, engine, 0, 300)
    assert any("JNNJ"[(s - 10) // 12 % 4] == "N" for s, p in enumerate(res.phases) if p == "PREDICT" and s >= 10)


@pytest.mark.parametrize("exploit", [False, True])
def test_engine_with_judge_resumes_exactly_from_any_step(exploit):
    # confirm_batches 0: the confirmation's probes hold batches and are not checkpointed (test_engine)
    cfg = judged_config(exploit=exploit)
    cfg.divergence.confirm_batches = 0
    model, opt, engine = make(config=cfg)
    ref = run(model, opt, engine, 0, 200)
    expected, ref_judge = params_of(model), engine.judge.state_dict()
    assert engine.judge.groups_judged >= 1 and (ref_judge["on"][0] > 0) is exploit  # resumed across J J J J groups
    for cut in range(11, 200, 7):
        m1, o1, e1 = make(config=cfg)
        run(m1, o1, e1, 0, cut)
        saved = _save_load(e1, m1, o1)
        m2, o2, e2 = make(seed=99, config=cfg)
        m2.load_state_dict(saved["model"])
        o2.load_state_dict(saved["opt"])
        e2.load_state_dict(saved["engine"])
        res = run(m2, o2, e2, cut, 200)
        assert res.phases == ref.phases[cut:] and e2.judge.state_dict() == ref_judge, cut
        assert all(torch.equal(a, b) for a, b in zip(params_of(m2), expected)), cut


def test_a_resumed_engine_whose_judge_blocks_changed_judges_afresh():
    cfg = judged_config()
    model, opt, engine = make(config=cfg)
    run(model, opt, engine, 0, 120)
    assert engine.judge.groups_judged >= 1
    saved = _save_load(engine, model, opt)["engine"]
    same = make(config=cfg)[2]
    same.load_state_dict(saved)
    assert same.judge.state_dict() == engine.judge.state_dict()
    other = make(config=judged_config(block=16))[2]
    other.load_state_dict(saved)
    assert other.judge.groups_judged == 0 and other.judge.d == []
    off = make(config=judged_config(block=0))[2]
    off.load_state_dict(saved)  # the judge switched off: its state is ignored
    assert off.judge is None and off.step == engine.step


def test_engine_applies_the_tangential_part_of_the_predicted_displacement_only():
    cfg = eager_config()
    cfg.max_predict_steps, cfg.bandit.arms, cfg.bandit.cooldown_steps = 1, [0, 1], 0
    cfg.bandit.alpha, cfg.bandit.dormant_after = 100.0, 0  # a phase whenever one may start
    cfg.divergence.rollback_tolerance, cfg.corrector.weight_correction = 10.0, False
    cfg.predictor, cfg.dynamics.tangential = "null", True  # the name validates; FixedStep predicts
    model, opt, engine = make(config=cfg.validate(), dynamics=FixedStep(4, 1))
    moved = 0
    for s in range(120):
        before = params_of(model)
        if run(model, opt, engine, s, s + 1).phases[0] == "PREDICT":
            moved += 1
            for a, b in zip(params_of(model), before):
                d, w = (a - b).reshape(-1), b.reshape(-1)
                assert abs(float(d @ w)) <= 1e-5 * float(w.norm()) * max(float(d.norm()), 1e-12)
                torch.testing.assert_close(d, 0.01 - float(0.01 * w.sum() / (w @ w)) * w, atol=1e-6, rtol=0)
    assert moved >= 3
