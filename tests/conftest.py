"""Shared fixtures: a tiny shapes world and a small random CLIP saved like prepare_model does."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARCH = "saeft-tiny-rn"


def pytest_configure(config) -> None:
    """Under pytest-xdist each worker gets its share of the cores for torch's own thread pool.
    Two workers with a pool of all the cores each oversubscribe the machine, and the pools' spin
    waits then make small tensor work about ten times slower (measured: tests/test_finetune.py
    took 10.7 s in one process and its tests 12-15 s each beside a second worker)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and "SAEFT_THREADS" not in os.environ:
        share = max(1, len(os.sched_getaffinity(0)) // int(workers))
        os.environ["SAEFT_THREADS"] = str(share)  # saeft.nn.training.setup_torch's default
        import torch

        torch.set_num_threads(share)


@pytest.fixture(scope="session")
def tiny_world():
    from saeft.data.synthetic import WorldConfig

    return WorldConfig(seed=3, image_size=32, train_per_class=4, val_per_class=2, test_per_class=2, pretrain_per_class=2,
                       sae_train_per_class=8, sae_heldout_per_class=4)


@pytest.fixture(scope="session")
def clip_file(tmp_path_factory):
    """A randomly initialised tiny CLIP in the safetensors format of prepare_model."""
    import torch

    from saeft.nn.models import create_clip, save_clip

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_clip(path, create_clip(ARCH).eval(), ARCH, source=None)
    return path


@pytest.fixture(scope="session")
def head_file(clip_file, tmp_path_factory):
    from saeft.stages.prepare import run_head

    path = tmp_path_factory.mktemp("heads") / "shapes.safetensors"
    run_head(clip_file, "shapes", path)
    return path


@pytest.fixture(autouse=True)
def _tracking_queue_in_tmp(tmp_path, monkeypatch):
    """Tracking calls a test's unreachable store queues go to the test's folder, not the repo."""
    if "SAEFT_MLFLOW_QUEUE" not in os.environ:
        monkeypatch.setenv("SAEFT_MLFLOW_QUEUE", str(tmp_path / "mlflow-queue"))
