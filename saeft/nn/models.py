"""CLIP models: creation from open_clip, the safetensors weight files the stages exchange, and
the image classifier (visual tower + zero-shot-initialised head) that fine-tuning trains.

Weight files are safetensors with the architecture name and its source in the metadata, so every
stage after ``prepare_model`` rebuilds the model offline from one local file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from saeft.config.stages import pretrained_kind
from saeft.infra.io import load_tensors, save_tensors
from saeft.nn.weights import interpolate_weights

logger = logging.getLogger(__name__)

_registered = False


def open_clip_module() -> Any:
    """Import open_clip with saeft's own architectures (``saeft/assets/*.json``) registered."""
    global _registered
    import open_clip

    if not _registered:
        open_clip.add_model_config(Path(str(resources.files("saeft") / "assets")))
        _registered = True
    return open_clip


def create_clip(name: str, pretrained: str | None = None) -> nn.Module:
    """Create the open_clip model ``name`` with weights from an open_clip tag, a local
    checkpoint (``.safetensors`` or a ``.pt`` loaded with ``weights_only=True``), or none."""
    open_clip = open_clip_module()
    if name not in open_clip.list_models():
        raise ValueError(f"model.name: unknown open_clip architecture {name!r}")
    kind = pretrained_kind(pretrained)
    if kind == "tag":
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ValueError(
                f"model.pretrained: {pretrained!r} is not an open_clip tag of {name} "
                f"(known: {', '.join(tags) or 'none'}); give a local checkpoint path instead"
            )
        return open_clip.create_model(name, pretrained=pretrained)
    model = open_clip.create_model(name, pretrained=None)
    if kind == "file":
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained: checkpoint {path} does not exist")
        if path.suffix == ".safetensors":
            state, _ = load_tensors(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            state = {k.removeprefix("module."): v for k, v in state.items()}
        load_state(model, state, path)
    return model


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Load ``state`` strictly, naming ``source`` and the offending keys on mismatch."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not fit the architecture "
            f"(missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''})"
        )


def save_clip(path: str | os.PathLike, model: nn.Module, name: str, source: str | None) -> None:
    """Save a whole CLIP model as safetensors with its architecture name and source."""
    save_tensors(path, model.state_dict(), {"arch": name, "source": source, "kind": "clip"})


@contextlib.contextmanager
def skip_random_init() -> Iterator[None]:
    """Build modules without ``torch.nn.init``'s random initialisation (parameters keep whatever
    memory they were given), for a model whose every weight is then loaded strictly from a file:
    initialising a ViT-B only to overwrite it costs seconds of CPU per stage."""
    names = [name for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")
             and callable(getattr(nn.init, name))]
    saved = {name: getattr(nn.init, name) for name in names}

    def keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    try:
        for name in names:
            setattr(nn.init, name, keep)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def load_clip(path: str | os.PathLike) -> tuple[nn.Module, str]:
    """Load a CLIP model saved by :func:`save_clip`; returns (model in eval mode, arch name)."""
    state, meta = load_tensors(path)
    if meta.get("kind") != "clip" or "arch" not in meta:
        raise ValueError(f"{path}: not a saeft CLIP weight file (metadata {meta})")
    with skip_random_init():  # every weight comes from the file (load_state is strict)
        model = open_clip_module().create_model(meta["arch"], pretrained=None)
    load_state(model, state, path)
    return model.eval(), meta["arch"]


def tokenizer_for(name: str) -> Any:
    """The open_clip tokenizer of architecture ``name`` (its BPE vocabulary ships offline)."""
    return open_clip_module().get_tokenizer(name)


def preprocess_for(model: nn.Module) -> Any:
    """The evaluation image transform of ``model`` (resize, centre crop, normalise)."""
    open_clip = open_clip_module()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = open_clip.get_model_preprocess_cfg(model)
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def zeroshot_head(
    model: nn.Module, name: str, classnames: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """Zero-shot head (C, d): per class the normalised mean of its normalised prompt
    embeddings, scaled by the model's logit scale. In a template ``{c}`` is the class name and
    ``{a_c}`` the class name with its article."""
    from saeft.data.registry import fill_template

    open_clip = open_clip_module()
    templates = [lambda c, t=t: fill_template(t, c) for t in templates]
    weights = open_clip.build_zero_shot_classifier(
        model, tokenizer_for(name), classnames, templates, num_classes_per_batch=10, device="cpu"
    )
    return (model.logit_scale.exp().detach() * weights.T).contiguous()


class ImageClassifier(nn.Module):
    """The visual tower and a linear head on its L2-normalised embedding.

    ``forward`` returns the logits and the unnormalised post-projection embedding ``f(x)``, which
    the regularisers compare with the zero-shot model's embedding.
    """

    def __init__(self, visual: nn.Module, head: torch.Tensor) -> None:
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(head.shape[1], head.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(head)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The post-projection image embedding (unnormalised)."""
        return self.visual(images)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(images)
        return self.head(F.normalize(features, dim=-1)), features


def save_classifier(path: str | os.PathLike, classifier: ImageClassifier, arch: str, extra: dict[str, Any]) -> None:
    """Save a classifier (visual tower + head) as safetensors."""
    save_tensors(path, classifier.state_dict(), {"arch": arch, "kind": "classifier", **extra})


def load_classifier(path: str | os.PathLike) -> tuple[ImageClassifier, dict[str, Any]]:
    """Load a classifier saved by :func:`save_classifier`; returns (model in eval mode, metadata)."""
    state, meta = load_tensors(path)
    if meta.get("kind") != "classifier" or "arch" not in meta:
        raise ValueError(f"{path}: not a saeft classifier weight file (metadata {meta})")
    if "head.weight" not in state:
        raise ValueError(f"{path}: classifier weights lack 'head.weight'")
    with skip_random_init():  # every weight of the classifier comes from the file (load_state is strict)
        clip = open_clip_module().create_model(meta["arch"], pretrained=None)
    classifier = ImageClassifier(clip.visual, state["head.weight"])
    load_state(classifier, state, path)
    return classifier.eval(), meta


def classifier_from_zeroshot(model_path: str | os.PathLike, head_path: str | os.PathLike) -> tuple[ImageClassifier, str]:
    """The zero-shot classifier: a saved CLIP's visual tower with a saved zero-shot head."""
    clip, arch = load_clip(model_path)
    head_state, _ = load_tensors(head_path)
    if "weight" not in head_state:
        raise ValueError(f"{head_path}: zero-shot head file lacks 'weight'")
    return ImageClassifier(clip.visual, head_state["weight"]).eval(), arch


# --------------------------------------------------------------------------------------------
# The evaluated model of a run (evaluation and feature analysis)
# --------------------------------------------------------------------------------------------


def load_model(model: str | os.PathLike, head: str | os.PathLike | None) -> ImageClassifier:
    """A fine-tuned classifier file, or a zero-shot CLIP plus ``head``; with both a classifier and
    ``head``, the classifier's visual tower with ``head`` (a transfer evaluation)."""
    from safetensors import safe_open

    if not os.path.isfile(model):
        raise FileNotFoundError(f"{model}: no such model file")
    with safe_open(str(model), framework="pt") as handle:
        kind = (handle.metadata() or {}).get("kind")
    if kind == json.dumps("classifier"):
        classifier = load_classifier(model)[0]
        return with_head(classifier, head) if head is not None else classifier
    if head is None:
        raise ValueError(f"{model}: a zero-shot CLIP needs a head (--head)")
    return classifier_from_zeroshot(model, head)[0]


def with_head(classifier: ImageClassifier, head: str | os.PathLike) -> ImageClassifier:
    """``classifier`` with the zero-shot head file ``head`` in place of its own."""
    weight = load_tensors(head)[0].get("weight")
    if weight is None:
        raise ValueError(f"{head}: zero-shot head file lacks 'weight'")
    return ImageClassifier(classifier.visual, weight).eval()


def load_wiseft(model: str | os.PathLike, zeroshot_model: str | os.PathLike, zeroshot_head: str | os.PathLike, alpha: float) -> ImageClassifier:
    """WiSE-FT: the fine-tuned classifier ``model`` with weights ``(1 - alpha) * theta_0 + alpha *
    theta_ft``, head included; built in memory, never stored."""
    tuned = load_classifier(model)[0]
    zeroshot = classifier_from_zeroshot(zeroshot_model, zeroshot_head)[0]
    tuned.load_state_dict(interpolate_weights(zeroshot.state_dict(), tuned.state_dict(), alpha))
    return tuned.eval()


def load_run_model(
    model: str | os.PathLike,
    head: str | os.PathLike | None,
    wiseft: tuple[str | os.PathLike, str | os.PathLike, float] | None = None,
) -> ImageClassifier:
    """The evaluated classifier: ``model`` (with ``head``, see :func:`load_model`), or its WiSE-FT
    interpolation with ``wiseft`` = (zero-shot model, zero-shot head, alpha)."""
    return load_wiseft(model, *wiseft) if wiseft is not None else load_model(model, head)
