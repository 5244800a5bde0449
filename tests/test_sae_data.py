"""The SAE's own data: many ID embeddings (its splits), AuxK's dead threshold scaled to the data,
and metrics per evaluation split in sae.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from saeft.data import fashion_mnist as fm
from saeft.data import synthetic
from saeft.data.registry import get_dataset
from saeft.sae import SAETrainConfig, Trainer, run, sweep_configs
from saeft.config import ConfigError
from test_fashion_mnist_data import fake_root, small  # noqa: F401  (fixture)
from test_sae_training import _sparse_data, _write_cache


def test_shapes_sae_splits_are_id_photos_of_their_own():
    spec = get_dataset("shapes")
    assert spec.sae_splits("id") == ("sae_train", "sae_heldout")
    assert spec.sae_splits("pretrain") == ("pretrain", "sae_heldout")
    assert {"sae_train", "sae_heldout", "pretrain"} <= set(spec.splits)
    world = synthetic.WorldConfig(sae_train_per_class=3, sae_heldout_per_class=2)
    assert world.split_size("sae_train") == 30 and world.split_size("sae_heldout") == 20
    assert synthetic.split_label_and_domain("sae_train", 7) == (7, "photo")
    sae_images, _ = synthetic.render_split(world, "sae_train", 0, 10)
    train_images, _ = synthetic.render_split(world, "train", 0, 10)
    assert not any(np.array_equal(a, b) for a, b in zip(sae_images, train_images))  # other images


def test_sae_splits_carry_the_id_shortcut():
    """The SAE split is the fine-tuning distribution: the background hue follows the class as
    often as in the training split (an ID sample), unlike the pretraining corpus."""
    world = synthetic.WorldConfig(sae_train_per_class=20, spurious=1.0)
    images, labels = synthetic.render_split(world, "sae_train", 0, 200)
    corner_hues = np.array([_hue(image[:3, :3].reshape(-1, 3).mean(0)) for image in images])
    expected = synthetic.CLASS_HUES[labels]
    distance = np.minimum(abs(corner_hues - expected), 1 - abs(corner_hues - expected))
    assert np.median(distance) < 0.06


def _hue(rgb: np.ndarray) -> float:
    import colorsys

    return colorsys.rgb_to_hsv(*(rgb / 255.0))[0]


def test_a_dataset_without_a_corpus_refuses_sae_data_pretrain():
    spec = get_dataset("cifar10")
    assert spec.sae_splits("id") == (spec.train_split, spec.heldout_split)
    with pytest.raises(ValueError, match="sae.data"):
        spec.sae_splits("pretrain")


def test_fashion_mnist_sae_splits_come_from_the_back_disjoint_from_the_rest(fake_root):
    cfg = small(fake_root, sae_train_per_class=6, sae_heldout_per_class=4)
    labels = fm.read_part(str(fake_root), "train")[1]
    rows = {split: set(fm.source_indices(cfg, split, labels).tolist()) for split in ("train", "val", "pretrain", "sae_train", "sae_heldout")}
    for a in rows:
        for b in rows:
            if a < b:
                assert not rows[a] & rows[b], (a, b)
    assert len(rows["sae_train"]) == 60 and len(rows["sae_heldout"]) == 40
    # Changing the pretraining keys leaves the SAE's images alone.
    more = small(fake_root, sae_train_per_class=6, sae_heldout_per_class=4, pretrain_per_class=1)
    assert set(fm.source_indices(more, "sae_train", labels).tolist()) == rows["sae_train"]
    with pytest.raises(ValueError, match="too few"):
        fm.source_indices(small(fake_root, sae_train_per_class=20, sae_heldout_per_class=4), "sae_train", labels)


def test_dead_after_zero_means_one_epoch_of_the_training_data():
    assert Trainer("a", SAETrainConfig(expansion=2, k=2), 8, total_steps=10, n_train=1234).dead_after == 1234
    assert Trainer("b", SAETrainConfig(expansion=2, k=2, dead_after=50), 8, total_steps=10, n_train=1234).dead_after == 50
    with pytest.raises(ConfigError, match="sae.data"):
        SAETrainConfig(data="test")
    assert sweep_configs({"sweep": [{"name": "x", "data": "pretrain"}]})["x"].data == "pretrain"
    with pytest.raises(ConfigError, match=r"sae.sweep.0.data"):
        sweep_configs({"sweep": [{"name": "x", "data": "test"}]})


def test_sweep_entries_train_on_their_own_data(tmp_path):
    """A sweep entry with `data: pretrain` trains on the pretraining cache, the others on the ID
    one, in one job; a missing cache is named."""
    from saeft.sae import run_sweep

    data = _sparse_data(1000, d=16, seed=2)
    labels = np.zeros(len(data), dtype=np.int64)
    _write_cache(tmp_path / "id.h5", data[:300], labels[:300])
    _write_cache(tmp_path / "pretrain.h5", data[300:800], labels[300:800])
    _write_cache(tmp_path / "heldout.h5", data[800:], labels[800:])
    section = {"expansion": 2, "k": 2, "epochs": 1, "batch_size": 64, "warmup_steps": 0,
               "sweep": [{"name": "photos"}, {"name": "corpus", "data": "pretrain"}]}
    caches = {"id": tmp_path / "id.h5", "pretrain": tmp_path / "pretrain.h5"}
    flat = run_sweep(caches, tmp_path / "heldout.h5", tmp_path / "out", sweep_configs(section))
    assert flat["photos.n_train"] == 300 and flat["corpus.n_train"] == 500
    record = json.loads((tmp_path / "out" / "corpus" / "sae.json").read_text())
    assert record["train_cache"] == str(tmp_path / "pretrain.h5") and record["config"]["data"] == "pretrain"
    with pytest.raises(ValueError, match="sae.data 'pretrain': no training cache"):
        run_sweep({"id": tmp_path / "id.h5"}, tmp_path / "heldout.h5", tmp_path / "out2", sweep_configs(section))


def test_sae_json_reports_metrics_per_eval_split(tmp_path):
    data = _sparse_data(900, d=16, seed=1)
    labels = (data[:, 0] > 0).astype(np.int64)
    _write_cache(tmp_path / "train.h5", data[:600], labels[:600])
    _write_cache(tmp_path / "heldout.h5", data[600:700], labels[600:700])
    _write_cache(tmp_path / "test.h5", data[700:800], labels[700:800])
    _write_cache(tmp_path / "shift.h5", 3.0 * data[800:] + 1.0, labels[800:])  # far off the training data
    cfg = SAETrainConfig(expansion=4, k=3, epochs=3, batch_size=64, warmup_steps=0, lr=3e-3)
    run(tmp_path / "train.h5", tmp_path / "heldout.h5", tmp_path / "sae.safetensors", tmp_path / "sae.json", cfg,
        evals={"test": tmp_path / "test.h5", "shift": tmp_path / "shift.h5"})
    metrics = json.loads((tmp_path / "sae.json").read_text())["metrics"]
    assert set(metrics["splits"]) == {"test", "shift"}
    for split in ("test", "shift"):
        assert {"fvu", "l0", "dead_fraction"} <= set(metrics["splits"][split])
    assert metrics["splits"]["test"]["fvu"] < metrics["splits"]["shift"]["fvu"]
    assert metrics["n_heldout"] == 100


def test_sae_data_pretrain_plans_the_sae_on_the_pretraining_corpus(tmp_path):
    """`sae.data: pretrain` swaps the SAE's training cache for the pretraining split; the
    held-out split stays the ID one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent
    config = yaml.safe_load((root / "tests" / "data" / "tiny_study.yaml").read_text())
    plans = {}
    for data in ("id", "pretrain"):
        config.setdefault("sae", {})["data"] = data
        (tmp_path / f"{data}.yaml").write_text(yaml.safe_dump(config))
        result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(root / "workflow" / "Snakefile"), "-d", str(tmp_path / data),
                                 "--replace-workflow-config", "--configfile", str(tmp_path / f"{data}.yaml"), "-n", "-p", "--until", "train_sae"],
                                capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        plans[data] = next(line for line in (result.stdout + result.stderr).splitlines() if "saeft train-sae " in line)
    assert "--train results/tiny/cache/saeft-tiny-rn/shapes/sae_train.h5" in plans["id"]
    assert "--train results/tiny/cache/saeft-tiny-rn/shapes/pretrain.h5" in plans["pretrain"]
    for plan in plans.values():
        assert "--heldout results/tiny/cache/saeft-tiny-rn/shapes/sae_heldout.h5" in plan
        assert "sketch=results/tiny/cache/saeft-tiny-rn/shapes/sketch.h5" in plan
    # A sweep entry may train on the other data: the sweep job gets one cache per data value.
    config["sae"]["data"] = "id"
    config["sae"]["sweep"] = [{"name": "corpus", "data": "pretrain"}, {"name": "photos", "k": 2}]
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(root / "workflow" / "Snakefile"), "-d", str(tmp_path / "sweep"),
                             "--replace-workflow-config", "--configfile", str(tmp_path / "sweep.yaml"), "-n", "-p", "--until", "train_sae_sweep"],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = next(line for line in (result.stdout + result.stderr).splitlines() if "saeft train-sae-sweep " in line)
    assert ("--train id=results/tiny/cache/saeft-tiny-rn/shapes/sae_train.h5 "
            "pretrain=results/tiny/cache/saeft-tiny-rn/shapes/pretrain.h5") in plan
