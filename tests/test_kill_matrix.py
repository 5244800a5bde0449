"""Kill matrix: every stage killed with SIGKILL at several points (``SAEFT_KILL_AT``), then rerun,
ends with outputs equal to an uninterrupted run; no truncated file is ever left under an output's
name, and finished work (cached rows, epochs, steps) is not redone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from saeft import cli
from saeft.infra.io import load_tensors

pytestmark = pytest.mark.slow

SAE = {"expansion": 2, "k": 4, "epochs": 3, "batch_size": 16, "lr": 0.001}
FINETUNE = {"method": "saeft", "method_params": {"lambda": 10.0}, "epochs": 2, "batch_size": 8, "lr": 0.001, "warmup_steps": 1, "seed": 0}


def saeft(*args: str, kill: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SAEFT_KILL_AT", None)
    if kill:
        env["SAEFT_KILL_AT"] = kill
    threads = ["--threads", "1"] if args[0] in cli.THREADED else []
    command = [sys.executable, "-m", "saeft.cli", *args, *threads]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if kill:
        assert result.returncode == -signal.SIGKILL, f"not killed at {kill}:\n{result.stderr[-3000:]}"
    else:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_tensors(a)[0], load_tensors(b)[0]
    return ta.keys() == tb.keys() and all(np.array_equal(ta[k].numpy(), tb[k].numpy()) for k in ta)


def no_temporaries(folder: Path) -> None:
    """Nothing but finished files under output names (temporaries are hidden ``.name.*.tmp``)."""
    for path in folder.rglob("*"):
        assert not path.name.endswith(".tmp") or path.name.startswith("."), path


@pytest.fixture(scope="module")
def inputs(clip_file, head_file, tiny_world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    world = json.dumps(tiny_world.to_dict())
    for split in ("train", "val"):
        saeft("cache", "--model", str(clip_file), "--dataset", "shapes", "--dataset-options", world, "--split", split,
              "--config", '{"batch_size": 8}', "--out", str(folder / f"{split}.h5"))
    saeft("train-sae", "--train", str(folder / "train.h5"), "--heldout", str(folder / "val.h5"), "--config", json.dumps(SAE),
          "--out-weights", str(folder / "sae.safetensors"), "--out-json", str(folder / "sae.json"))
    return {"folder": folder, "world": world, "clip": clip_file, "head": head_file}


def test_pretraining_resumes_from_its_step_checkpoint(tiny_world, tmp_path):
    config = json.dumps({"steps": 6, "checkpoint_every": 2, "warmup_steps": 1, "lr": 0.003})

    def args(out: Path) -> tuple[str, ...]:
        return ("pretrain", "--arch", "saeft-tiny-rn", "--dataset-options", json.dumps(tiny_world.to_dict()),
                "--config", config, "--out", str(out / "model.safetensors"), "--quality", str(out / "quality.json"))

    saeft(*args(tmp_path / "whole"))
    killed = tmp_path / "killed"
    saeft(*args(killed), kill="checkpoint:2")  # after step 4 of 6
    assert not (killed / "model.safetensors").exists() and (killed / "checkpoint.pt").exists()
    assert "resuming from" in saeft(*args(killed)).stderr
    assert same_tensors(killed / "model.safetensors", tmp_path / "whole" / "model.safetensors")
    assert json.loads((killed / "quality.json").read_text())["zeroshot_top1"] == json.loads((tmp_path / "whole" / "quality.json").read_text())["zeroshot_top1"]
    no_temporaries(tmp_path)


def test_cache_resumes_at_the_rows_it_had_written(inputs, tmp_path):
    out = tmp_path / "train.h5"
    args = ("cache", "--model", str(inputs["clip"]), "--dataset", "shapes", "--dataset-options", inputs["world"],
            "--split", "train", "--config", '{"batch_size": 8}', "--out", str(out))
    saeft(*args, kill="cache_rows:3")
    assert not out.exists() and out.with_name("train.h5.partial").exists()
    resumed = saeft(*args)
    assert "resuming" in resumed.stderr and "at row 24" in resumed.stderr
    with h5py.File(out) as a, h5py.File(inputs["folder"] / "train.h5") as b:
        assert np.array_equal(a["embeddings"][:], b["embeddings"][:]) and np.array_equal(a["labels"][:], b["labels"][:])
    # Killed while moving the finished file into place: the output is absent, never truncated.
    out.unlink()
    saeft(*args, kill="rename:1")
    assert not out.exists()
    assert "at row 40" in saeft(*args).stderr  # the finished partial file is taken as it is
    no_temporaries(tmp_path)


def test_sae_training_resumes_from_its_epoch_checkpoint(inputs, tmp_path):
    folder = inputs["folder"]
    args = ("train-sae", "--train", str(folder / "train.h5"), "--heldout", str(folder / "val.h5"), "--config", json.dumps(SAE),
            "--out-weights", str(tmp_path / "sae.safetensors"), "--out-json", str(tmp_path / "sae.json"))
    saeft(*args, kill="checkpoint:2")
    assert not (tmp_path / "sae.safetensors").exists() and (tmp_path / "checkpoint.pt").exists()
    resumed = saeft(*args)
    assert "resuming from" in resumed.stderr
    assert same_tensors(tmp_path / "sae.safetensors", folder / "sae.safetensors")
    assert not (tmp_path / "checkpoint.pt").exists()


def _finetune_args(inputs, out: Path) -> tuple[str, ...]:
    folder = inputs["folder"]
    return ("finetune", "--model", str(inputs["clip"]), "--head", str(inputs["head"]), "--sae", str(folder / "sae.safetensors"),
            "--teacher-cache", str(folder / "train.h5"), "--dataset", "shapes", "--dataset-options", inputs["world"],
            "--config", json.dumps(FINETUNE), "--out-model", str(out / "model.safetensors"), "--out-json", str(out / "train.json"))


@pytest.fixture(scope="module")
def finetuned(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft_reference")
    saeft(*_finetune_args(inputs, out))
    return out


@pytest.mark.parametrize("kill", ["checkpoint:1", "train_step:9", "rename:2"])
def test_finetune_killed_anywhere_ends_with_the_same_weights(inputs, finetuned, tmp_path, kill):
    # 40 training images / batch 8 = 5 steps an epoch: step 9 is inside epoch 2, after the
    # epoch-1 checkpoint; rename 2 is the output model (rename 1 is the epoch-1 checkpoint).
    args = _finetune_args(inputs, tmp_path)
    saeft(*args, kill=kill)
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "train.json").exists()
    resumed = saeft(*args)
    assert "resuming from" in resumed.stderr  # epoch 1 was not trained again
    assert same_tensors(tmp_path / "model.safetensors", finetuned / "model.safetensors")
    history = [json.loads((d / "train.json").read_text())["history"] for d in (tmp_path, finetuned)]
    assert [e["loss"] for e in history[0]] == [e["loss"] for e in history[1]]
    no_temporaries(tmp_path)


def test_evaluate_and_aggregate_never_leave_a_partial_output(inputs, tmp_path):
    def evaluate_args(out: Path) -> tuple[str, ...]:
        return ("evaluate", "--model", str(inputs["clip"]), "--head", str(inputs["head"]), "--dataset", "shapes",
                "--dataset-options", inputs["world"], "--split", "test", "sketch", "--out", str(out),
                "--identity", json.dumps({"study": "k", "model": "m", "method": "zeroshot", "seed": 0}))

    whole = tmp_path / "whole" / "evals.json"
    saeft(*evaluate_args(whole))
    out = tmp_path / "eval" / "evals.json"
    # Killed after scoring the first eval set, and with the bundle written but not yet in place:
    # no output (no eval set's result alone); the rerun equals the uninterrupted run.
    for kill in ("evalset:1", "rename:1"):
        saeft(*evaluate_args(out), kill=kill)
        assert not out.exists()
    saeft(*evaluate_args(out))
    assert json.loads(out.read_text())["evals"] == json.loads(whole.read_text())["evals"]
    no_temporaries(tmp_path / "eval")
    evals = [str(out)]
    reference = tmp_path / "reference"
    saeft("aggregate", "--evals", *evals, "--tables", str(reference / "tables"), "--figures", str(reference / "figures"))
    killed = tmp_path / "killed"
    args = ("aggregate", "--evals", *evals, "--tables", str(killed / "tables"), "--figures", str(killed / "figures"))
    saeft(*args, kill="rename:2")
    written = sorted(p.name for p in (killed / "tables").iterdir() if not p.name.startswith("."))
    assert len(written) == 1  # the first table only; the second died in its temporary file
    saeft(*args)
    for name in ("shifts.csv", "shifts.md", "shifts.tex", "robustness.tex"):
        assert (killed / "tables" / name).read_text() == (reference / "tables" / name).read_text()
    no_temporaries(killed)
