from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from hybrid_lightning import ConfigError, HybridConfig


def test_defaults_are_valid_and_arms_derive_from_max_predict_steps():
    cfg = HybridConfig().validate()
    assert cfg.horizons == [0, 2, 5, 10, 20]
    assert HybridConfig(max_predict_steps=3).horizons == [0, 1, 3]
    assert HybridConfig(max_predict_steps=0).horizons == [0]


def test_yaml_round_trip(tmp_path):
    cfg = HybridConfig(warmup_steps=7, predict_threshold=0.25)
    cfg.dynamics.hidden_dim = 12
    cfg.bandit.arms = [0, 4]
    path = tmp_path / "c.yaml"
    cfg.save_yaml(path)
    back = HybridConfig.from_yaml(path)
    assert back == cfg


def test_partial_yaml_keeps_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("warmup_steps: 3\ndivergence:\n  loss_sigma: 4.5\n")
    cfg = HybridConfig.from_yaml(path)
    assert cfg.warmup_steps == 3 and cfg.divergence.loss_sigma == 4.5
    assert cfg.min_full_steps == HybridConfig().min_full_steps


@pytest.mark.parametrize(
    "text, needle",
    [
        ("warmup_stepz: 3\n", "unknown key 'warmup_stepz'"),
        ("dynamics:\n  hiden_dim: 3\n", "unknown key 'dynamics.hiden_dim'"),
        ("warmup_steps: many\n", "'warmup_steps'"),
        ("bandit:\n  arms: [0, x]\n", "bandit.arms"),
        ("warmup_steps: [1, 2\n", "not valid YAML"),
        ("- 1\n- 2\n", "expected a mapping"),
    ],
)
def test_bad_yaml_gives_one_clear_error(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        HybridConfig.from_yaml(path)
    assert needle in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        HybridConfig.from_yaml("/nonexistent/hybrid.yaml")


OUT_OF_RANGE = [
    ("warmup_steps", -1),
    ("min_full_steps", 0),
    ("max_predict_steps", -3),
    ("predict_threshold", 1.5),
    ("predict_threshold", float("nan")),
    ("correct_steps", 0),
    ("monitor_every", -1),
    ("predictor", "oracle"),
    ("on_nonfinite", "ignore"),
    ("trajectory.basis_rank", 0),
    ("trajectory.ema_decay", 1.0),
    ("trajectory.stride", 0),
    ("dynamics.hidden_dim", 1),
    ("dynamics.ensemble_size", 0),
    ("dynamics.learning_rate", 0.0),
    ("dynamics.bptt_window", 1),
    ("residuals.capacity", 0),
    ("corrector.max_gain", 0.0),
    ("divergence.window", 2),
    ("divergence.loss_sigma", -1.0),
    ("divergence.grad_explosion_factor", 0.5),
    ("divergence.grad_vanishing_factor", 1.0),
    ("bandit.alpha", -0.1),
    ("bandit.ridge", 0.0),
    ("bandit.cooldown_steps", -5),
    ("bandit.overhead_budget", 0.0),
    ("bandit.overhead_budget", 1.5),
    ("bandit.overhead_budget", float("nan")),
]


@pytest.mark.parametrize("field, value", OUT_OF_RANGE)
def test_each_out_of_range_value_is_named(field, value):
    data: dict = {}
    node = data
    *parents, leaf = field.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    with pytest.raises(ConfigError) as info:
        HybridConfig.from_dict(data)
    msg = str(info.value)
    assert field in msg and repr(value).strip("'") in msg


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="must include 0"):
        HybridConfig(bandit=dataclasses.replace(HybridConfig().bandit, arms=[5, 10])).validate()
    with pytest.raises(ConfigError, match="above max_predict_steps"):
        HybridConfig(max_predict_steps=4, bandit=dataclasses.replace(HybridConfig().bandit, arms=[0, 8])).validate()
    with pytest.raises(ConfigError, match="window"):
        HybridConfig.from_dict({"trajectory": {"basis_rank": 3, "window": 2}})
    with pytest.raises(ConfigError, match="initial_gain"):
        HybridConfig.from_dict({"corrector": {"initial_gain": 3.0, "max_gain": 2.0}})
    with pytest.raises(ConfigError, match="dynamics.tangential"):  # the RSSM predicts no displacement
        HybridConfig.from_dict({"dynamics": {"tangential": True}})
    assert HybridConfig.from_dict({"predictor": "drift", "dynamics": {"tangential": True}}).dynamics.tangential


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        HybridConfig.from_dict({"warmup_steps": -1, "predict_threshold": 7.0})
    assert "warmup_steps" in str(info.value) and "predict_threshold" in str(info.value)


@given(
    warmup=st.integers(0, 10_000),
    min_full=st.integers(1, 1000),
    max_pred=st.integers(0, 200),
    thr=st.floats(0, 1),
    rank=st.integers(1, 4),
)
def test_valid_configs_round_trip_through_yaml(warmup, min_full, max_pred, thr, rank):
    cfg = HybridConfig(warmup_steps=warmup, min_full_steps=min_full, max_predict_steps=max_pred,
                       predict_threshold=thr)
    cfg.trajectory.basis_rank = rank
    cfg.trajectory.window = rank if rank > 1 else 0
    cfg.validate()
    back = HybridConfig.from_dict(OmegaConf.to_container(OmegaConf.create(cfg.to_yaml())))
    assert back == cfg


def test_overhead_budget_can_be_switched_off_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("bandit:\n  overhead_budget: null\n")
    cfg = HybridConfig.from_yaml(path)
    assert cfg.bandit.overhead_budget is None and HybridConfig().bandit.overhead_budget == 0.03
    cfg.save_yaml(tmp_path / "d.yaml")
    assert HybridConfig.from_yaml(tmp_path / "d.yaml") == cfg
