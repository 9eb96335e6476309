from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hybrid_lightning.core.phases import Phase, PhaseLimits, PhaseState, initial_state, next_phase

limits_st = st.builds(
    PhaseLimits,
    warmup_steps=st.integers(0, 30),
    min_full_steps=st.integers(1, 10),
    max_predict_steps=st.integers(0, 12),
    correct_steps=st.integers(1, 4),
    predict_threshold=st.floats(0, 1),
)
step_inputs = st.tuples(st.floats(0, 1), st.booleans(), st.integers(0, 50))


@given(limits_st, st.sampled_from(list(Phase)), st.integers(0, 20), st.integers(0, 12), st.integers(0, 10_000),
       st.floats(0, 1), st.booleans(), st.integers(0, 50))
def test_transition_is_deterministic(limits, phase, steps_in, horizon, step, conf, alarm, proposed):
    state = PhaseState(phase, steps_in, horizon)
    a = next_phase(state, step, conf, alarm, proposed, limits)
    b = next_phase(state, step, conf, alarm, proposed, limits)
    assert a == b


@given(limits_st, st.lists(step_inputs, min_size=1, max_size=300))
def test_every_trajectory_respects_the_machine(limits, inputs):
    state = initial_state(limits)
    phases = [state.phase]
    for step, (conf, alarm, proposed) in enumerate(inputs, start=1):
        prev = state
        state = next_phase(prev, step, conf, alarm, proposed, limits)
        phases.append(state.phase)
        # warmup only at the start and exactly warmup_steps long
        if state.phase is Phase.WARMUP:
            assert step < limits.warmup_steps and all(p is Phase.WARMUP for p in phases)
        # predict is bounded and only entered from full, with a positive horizon
        if state.phase is Phase.PREDICT:
            assert 0 < state.horizon <= limits.max_predict_steps
            assert state.steps_in_phase < state.horizon
            if prev.phase is not Phase.PREDICT:
                assert prev.phase is Phase.FULL and not alarm and conf > limits.predict_threshold
                assert prev.steps_in_phase + 1 >= limits.min_full_steps
        # predict is always followed by correct
        if prev.phase is Phase.PREDICT and state.phase is not Phase.PREDICT:
            assert state.phase is Phase.CORRECT
        if state.phase is Phase.CORRECT:
            assert state.steps_in_phase < limits.correct_steps
        # an alarm outside warmup/predict forces full with a fresh count
        if alarm and prev.phase in (Phase.FULL, Phase.CORRECT):
            assert state == PhaseState(Phase.FULL)
    # no phase other than full runs unbounded
    run, longest = 1, {p: 0 for p in Phase}
    for a, b in zip(phases, phases[1:]):
        run = run + 1 if a is b else 1
        longest[b] = max(longest[b], run)
    assert longest[Phase.PREDICT] <= max(limits.max_predict_steps, 0)
    assert longest[Phase.CORRECT] <= limits.correct_steps
    assert longest[Phase.WARMUP] <= max(limits.warmup_steps, 1)


def test_warmup_then_full_then_predict_then_correct():
    lim = PhaseLimits(warmup_steps=2, min_full_steps=2, max_predict_steps=3, correct_steps=1, predict_threshold=0.5)
    s = initial_state(lim)
    seen = []
    for step in range(1, 12):
        seen.append(s.phase)
        s = next_phase(s, step, 0.9, False, 3, lim)
    assert seen == [Phase.WARMUP, Phase.WARMUP, Phase.FULL, Phase.FULL, Phase.PREDICT, Phase.PREDICT,
                    Phase.PREDICT, Phase.CORRECT, Phase.FULL, Phase.FULL, Phase.PREDICT]


def test_alarm_in_predict_goes_to_correct_and_declined_horizon_restarts_full():
    lim = PhaseLimits(0, 3, 5, 2, 0.1)
    assert next_phase(PhaseState(Phase.PREDICT, 1, 5), 10, 1.0, True, 5, lim) == PhaseState(Phase.CORRECT)
    assert next_phase(PhaseState(Phase.FULL, 2, 0), 10, 1.0, False, 0, lim) == PhaseState(Phase.FULL, 0, 0)
    assert next_phase(PhaseState(Phase.FULL, 0, 0), 10, 1.0, False, 0, lim) == PhaseState(Phase.FULL, 1, 0)
    assert next_phase(PhaseState(Phase.FULL, 7, 0), 10, 0.05, False, 4, lim) == PhaseState(Phase.FULL, 8, 0)
