from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hybrid_lightning import HybridConfig, HybridPredictiveTraining
from hybrid_lightning.cli import main
from hybrid_lightning.config_reference import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if "trainer" in yaml.safe_load(p.read_text()))


def test_readme_config_reference_is_generated_from_the_schema():
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- config-reference:start -->")[1].split("<!-- config-reference:end -->")[0]
    assert block.strip() == reference_markdown().strip(), "run: python -m hybrid_lightning.config_reference README.md"
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", block, flags=re.M))
    fields = set(_flatten(HybridConfig().to_dict()))
    assert documented == fields


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def test_standalone_hybrid_config_yaml_loads():
    HybridConfig.from_yaml(ROOT / "configs" / "hybrid.yaml")


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_config_parses(path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(path), "--print_config"])
    assert info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    callbacks = printed["trainer"]["callbacks"]
    assert callbacks[0]["class_path"] == "hybrid_lightning.HybridPredictiveTraining"
    assert printed["trainer"]["strategy"] in ("hybrid", "hybrid_ddp")


def test_a_config_runs_a_short_fit(tmp_path):
    main(["fit", "--config", str(ROOT / "configs" / "mlp.yaml"), "--trainer.max_steps=40",
          "--trainer.val_check_interval=20", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
          f"--trainer.default_root_dir={tmp_path}", "--data.n_train=2048", "--model.width=64"])
    reports = list(tmp_path.rglob("hybrid_report.json"))
    assert len(reports) == 1


def test_unknown_callback_key_is_rejected_by_the_cli(tmp_path):
    bad = yaml.safe_load((ROOT / "configs" / "mlp.yaml").read_text())
    bad["trainer"]["callbacks"][0]["init_args"]["config"]["warmup_stepz"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run([sys.executable, "-m", "hybrid_lightning.cli", "fit", "--config", str(path),
                           "--print_config"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "warmup_stepz" in proc.stderr


def test_callback_rejects_bad_config_types():
    with pytest.raises(TypeError, match="HybridConfig"):
        HybridPredictiveTraining(42)  # type: ignore[arg-type]
