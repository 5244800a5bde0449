"""Fine-tuning: the loss falls, runs are deterministic, resume is exact, WiSE-FT interpolates."""

from __future__ import annotations

import pytest
import torch

from saeft.config import ConfigError
from saeft.infra.io import load_tensors
from saeft.nn.training import CHECKPOINT_NAME
from saeft.nn.weights import interpolate_weights
from saeft.sae import SAETrainConfig
from saeft.sae import run as train_sae
from saeft.stages import cache, finetune


@pytest.fixture(scope="module")
def sae_file(tiny_world, clip_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sae")
    for split in ("train", "val"):
        cache.run(clip_file, "shapes", split, tiny_world, cache.CacheConfig(), folder / f"{split}.h5")
    train_sae(folder / "train.h5", folder / "val.h5", folder / "sae.safetensors", folder / "sae.json",
              SAETrainConfig(expansion=2, k=8, epochs=3, batch_size=16))
    return folder / "sae.safetensors"


def _run(tmp_path, clip_file, head_file, world, sae=None, name="run", **overrides):
    settings = {"method": "ft", "epochs": 3, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "seed": 0, **overrides}
    cfg = finetune.FinetuneConfig.from_dict(settings)
    folder = tmp_path / name
    summary = finetune.run(clip_file, head_file, "shapes", world, cfg, folder / "model.safetensors", folder / "train.json", sae_path=sae)
    return folder, summary


def test_ft_loss_decreases(tmp_path, clip_file, head_file, tiny_world):
    folder, _ = _run(tmp_path, clip_file, head_file, tiny_world, epochs=4)
    import json

    history = json.loads((folder / "train.json").read_text())["history"]
    assert history[-1]["ce"] < history[0]["ce"]
    assert not (folder / CHECKPOINT_NAME).exists()


def test_saeft_runs_with_every_term(tmp_path, clip_file, head_file, tiny_world, sae_file):
    folder, final = _run(tmp_path, clip_file, head_file, tiny_world, sae=sae_file, method="saeft",
                         method_params={"lambda": 5.0})
    for key in ("reg_add", "reg_remove", "reg_align", "reg_total", "ce"):
        assert key in final
    assert final["reg_total"] > 0
    assert final["loss"] == pytest.approx(final["ce"] + 5.0 * final["reg_total"], rel=1e-4)


def test_same_seed_same_weights_other_seed_differs(tmp_path, clip_file, head_file, tiny_world):
    a, _ = _run(tmp_path, clip_file, head_file, tiny_world, name="a", epochs=1)
    b, _ = _run(tmp_path, clip_file, head_file, tiny_world, name="b", epochs=1)
    c, _ = _run(tmp_path, clip_file, head_file, tiny_world, name="c", epochs=1, seed=1)
    wa, wb, wc = (load_tensors(f / "model.safetensors")[0] for f in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_resume_after_a_kill_gives_the_same_weights(tmp_path, clip_file, head_file, tiny_world, sae_file):
    whole, _ = _run(tmp_path, clip_file, head_file, tiny_world, sae=sae_file, name="whole", method="saeft")

    class Killed(Exception):
        pass

    def kill_after_two(record):
        if record["epoch"] == 2:
            raise Killed

    cfg = finetune.FinetuneConfig.from_dict({"method": "saeft", "epochs": 3, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2})
    folder = tmp_path / "killed"
    out_model, out_json = folder / "model.safetensors", folder / "train.json"
    # The kill lands before epoch 2 is checkpointed: the job resumes from epoch 1.
    with pytest.raises(Killed):
        finetune.run(clip_file, head_file, "shapes", tiny_world, cfg, out_model, out_json, sae_path=sae_file, on_epoch=kill_after_two)
    assert (folder / CHECKPOINT_NAME).exists() and not out_model.exists()
    finetune.run(clip_file, head_file, "shapes", tiny_world, cfg, out_model, out_json, sae_path=sae_file)
    wa, wb = load_tensors(whole / "model.safetensors")[0], load_tensors(out_model)[0]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_method_params_are_validated():
    with pytest.raises(ConfigError, match="methods.saeft.lambda_add"):
        finetune.FinetuneConfig(method="saeft", method_params={"lambda_add": -1.0})
    with pytest.raises(ConfigError, match="methods.ft.lambda"):
        finetune.FinetuneConfig(method="ft", method_params={"lambda": 1.0})
    with pytest.raises(ConfigError, match="unknown method 'magic'"):
        finetune.FinetuneConfig(method="magic")
    cfg = finetune.FinetuneConfig(method="saeft", method_params={"lambda": 3.0})
    assert cfg.method_params == {"sae": None, "lambda": 3.0, "lambda_add": 10.0, "lambda_remove": 0.02, "mu": 1.0,
                                 "sae_inputs": "prepared"}


def test_interpolate_weights():
    a = {"w": torch.zeros(3), "n": torch.tensor(1)}
    b = {"w": torch.ones(3) * 2, "n": torch.tensor(5)}
    mixed = interpolate_weights(a, b, 0.25)
    assert torch.allclose(mixed["w"], torch.full((3,), 0.5)) and mixed["n"].item() == 5
    assert torch.equal(interpolate_weights(a, b, 0.0)["w"], a["w"])
    with pytest.raises(ValueError, match="alpha"):
        interpolate_weights(a, b, 1.5)
    with pytest.raises(ValueError, match="differ in keys"):
        interpolate_weights(a, {"w": b["w"]}, 0.5)
