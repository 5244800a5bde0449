"""Model sources: local checkpoints (.safetensors, .pt with weights_only), tags, bad files."""

from __future__ import annotations

import pytest
import torch

from saeft.nn.models import classifier_from_zeroshot, create_clip, load_clip, pretrained_kind, zeroshot_head
from saeft.stages.prepare import run_model

ARCH = "saeft-tiny-rn"


def test_pretrained_kinds():
    assert pretrained_kind("pretrain_clip") == "pipeline"
    assert pretrained_kind("openai") == "tag"
    assert pretrained_kind("weights/model.pt") == "file"
    assert pretrained_kind("model.safetensors") == "file"
    assert pretrained_kind(None) == "none"


def test_local_pt_checkpoint_round_trips(clip_file, tmp_path):
    reference, _ = load_clip(clip_file)
    checkpoint = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, checkpoint)
    out = tmp_path / "prepared.safetensors"
    run_model(ARCH, str(checkpoint), out)
    prepared, arch = load_clip(out)
    assert arch == ARCH
    assert all(torch.equal(prepared.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_checkpoint_with_missing_keys_is_named(clip_file, tmp_path):
    reference, _ = load_clip(clip_file)
    state = reference.state_dict()
    state.pop("logit_scale")
    checkpoint = tmp_path / "broken.pt"
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match=r"broken\.pt: weights do not fit.*logit_scale"):
        create_clip(ARCH, str(checkpoint))


def test_unknown_tag_and_missing_file_are_explained(tmp_path):
    with pytest.raises(ValueError, match="model.pretrained: 'laion9b' is not an open_clip tag"):
        create_clip(ARCH, "laion9b")
    with pytest.raises(FileNotFoundError, match="model.pretrained: checkpoint .*absent.pt does not exist"):
        create_clip(ARCH, str(tmp_path / "absent.pt"))
    with pytest.raises(ValueError, match="model.name: unknown open_clip architecture"):
        create_clip("no-such-arch")


def test_zeroshot_head_is_scaled_unit_rows(clip_file, head_file):
    clip, arch = load_clip(clip_file)
    head = zeroshot_head(clip, arch, ["circle", "star"], ["a photo of a {c}.", "a sketch of a {c}."])
    norms = head.norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, float(clip.logit_scale.detach().exp())), rtol=1e-5)
    classifier, _ = classifier_from_zeroshot(clip_file, head_file)
    logits, features = classifier(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and features.shape == (2, 128)


def test_loading_a_weight_file_skips_the_random_init_and_restores_it(clip_file, monkeypatch):
    from saeft.infra.io import load_tensors
    from saeft.nn.models import skip_random_init

    calls = []
    for name in ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_"):
        original = getattr(torch.nn.init, name)
        monkeypatch.setattr(torch.nn.init, name, lambda t, *a, _f=original, **k: calls.append(t.shape) or _f(t, *a, **k))
    clip, _ = load_clip(clip_file)
    assert calls == []  # no initialiser ran while building the model
    saved, _ = load_tensors(clip_file)
    assert saved.keys() == clip.state_dict().keys()
    assert all(torch.equal(clip.state_dict()[k], v) for k, v in saved.items())  # every weight is the file's
    with pytest.raises(RuntimeError, match="boom"), skip_random_init():
        raise RuntimeError("boom")
    torch.nn.init.normal_(torch.empty(3))  # restored, even after an error
    assert calls == [(3,)]


def test_the_public_import_path_is_the_models_module():
    # docs/tracking.md and docs/export.md tell users `from saeft.models import ...`
    import saeft.models as public
    import saeft.nn.models as models

    assert public.__all__ and all(getattr(public, name) is getattr(models, name) for name in public.__all__)
    assert {"load_classifier", "open_clip_module"} <= set(public.__all__)
