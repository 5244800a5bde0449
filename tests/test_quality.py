"""The pretrained model's quality record and the gate that refuses a failed pretraining."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from saeft.config import ConfigError
from saeft.nn import quality
from saeft.nn.models import create_clip

ROOT = Path(__file__).resolve().parent.parent


def test_linear_probe_separates_separable_data_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=-1)
    labels = torch.arange(400) % 4
    x = torch.nn.functional.normalize(centres[labels] + 0.1 * torch.randn(400, 16, generator=generator), dim=-1)
    assert quality.linear_probe_accuracy((x[:300], labels[:300]), (x[300:], labels[300:]), 4) > 0.95
    shuffled = labels[torch.randperm(400, generator=generator)]
    assert quality.linear_probe_accuracy((x[:300], shuffled[:300]), (x[300:], shuffled[300:]), 4) < 0.5


def test_measure_records_every_split(tiny_world):
    record = quality.measure(create_clip("saeft-tiny-vit", None), "saeft-tiny-vit", "shapes", tiny_world)
    assert set(record["zeroshot_top1"]) == {"val", "test", "resampled", "sketch", "rendition", "hard"}
    assert all(0.0 <= v <= 1.0 for v in record["zeroshot_top1"].values())
    assert 0.0 <= record["linear_probe_top1"] <= 1.0 and record["chance"] == pytest.approx(0.1)
    assert record["heldout_split"] == "val" and record["id_eval"] == "test"


def test_gate_names_key_value_and_split(tmp_path):
    path = tmp_path / "quality.json"
    path.write_text(json.dumps({"dataset": "shapes", "heldout_split": "val", "chance": 0.1,
                                "zeroshot_top1": {"val": 0.123}}))
    with pytest.raises(ConfigError) as caught:
        quality.check(path, 0.5)
    message = str(caught.value)
    assert message.startswith("pretrain.min_zeroshot_acc:") and "0.123" in message and "shapes/val" in message
    assert quality.check(path, 0.12)["zeroshot_top1"]["val"] == 0.123


@pytest.mark.slow
def test_workflow_stops_before_any_study_job_on_a_failed_pretraining(tmp_path):
    config = yaml.safe_load((ROOT / "tests" / "data" / "tiny_study.yaml").read_text())
    config["pretrain"]["min_zeroshot_acc"] = 0.99  # 20 pretraining steps cannot reach it
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow" / "Snakefile"), "-d", str(tmp_path),
                             "--replace-workflow-config", "--configfile", str(tmp_path / "study.yaml"), "--cores", "2"],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode != 0
    base = tmp_path / "results" / config["study"]
    record = json.loads((base / "pretrain" / config["model"]["name"] / "quality.json").read_text())
    value = record["zeroshot_top1"]["val"]
    log = next((tmp_path / "logs").rglob("prepare_model/*.log")).read_text()
    assert "pretrain.min_zeroshot_acc" in log and f"{value:.3f}" in log and "0.99" in log
    assert not (base / "models").exists() and not (base / "finetune").exists()
    assert "prepare_model" in result.stdout + result.stderr  # Snakemake names the failed rule
