"""``saeft export``: a run's fine-tuned (or WiSE-FT) model as a standalone open_clip model.

A fine-tuning run stores only its classifier (visual tower and head,
``results/<study>/finetune/<model>/<dataset>/<variant>/seed<N>/model.safetensors``). The export
joins that visual tower with the text tower and logit scale of the run's zero-shot CLIP
(``results/<study>/models/<model>/zeroshot/model.safetensors``) into one folder that open_clip
loads without saeft:

- ``open_clip_model.safetensors``: the whole CLIP state dict, which
  ``open_clip.create_model_and_transforms(<arch>, pretrained=<file>)`` loads (also a saeft CLIP
  weight file: ``saeft evaluate --model <file> --head <folder>/head.safetensors``);
- ``open_clip_config.json``: the architecture and the evaluation preprocessing, so that
  ``open_clip.create_model_and_transforms("local-dir:<folder>")`` loads it as well, also for
  saeft's own architectures (``saeft-tiny-*``), which open_clip knows only once
  :func:`saeft.nn.models.open_clip_module` has registered them;
- ``head.safetensors``: the classification head ``weight`` (classes x embedding), its logits
  ``F.normalize(model.encode_image(x), dim=-1) @ weight.T``, with the class names in the metadata;
- ``export.json``: where it came from (files, dataset, method, seed, alpha).

A WiSE-FT export is interpolated exactly as :func:`saeft.nn.models.load_wiseft` does for
evaluation: visual tower and head are ``(1 - alpha) * zero-shot + alpha * fine-tuned``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from saeft.infra.io import atomic_path, read_metadata, save_tensors, write_json

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "open_clip_model.safetensors"
"""The full CLIP state dict (the name open_clip's ``local-dir:`` loading looks for first)."""
CONFIG_NAME = "open_clip_config.json"
"""Architecture and preprocessing, as open_clip's ``local-dir:`` loading reads them."""
HEAD_NAME = "head.safetensors"
"""The classification head beside the checkpoint."""
RECORD_NAME = "export.json"
"""Provenance of the export."""
RUN_MODEL_NAME = "model.safetensors"
"""The classifier file in a fine-tuning run's folder (workflow/rules/finetune.smk)."""
LAYOUT = "results/<study>/finetune/<model>/<dataset>/<variant>/seed<N>"


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """The weight files one export reads."""

    model: Path
    """The run's fine-tuned classifier (visual tower and head)."""
    zeroshot_model: Path
    """The zero-shot CLIP the run was fine-tuned from (text tower, logit scale; WiSE-FT's theta_0)."""
    zeroshot_head: Path | None
    """The dataset's zero-shot head: the head's theta_0 of a WiSE-FT export, and the class names
    of the head's rows (None: unknown; no WiSE-FT then)."""


def run_model_file(run: str | os.PathLike) -> Path:
    """The classifier file of ``run``: a run folder (holding ``model.safetensors``) or that file.
    Raises FileNotFoundError or ValueError naming the path when it is neither."""
    path = Path(run)
    if path.is_dir():
        path = path / RUN_MODEL_NAME
        if not path.is_file():
            raise FileNotFoundError(f"export --run {run}: no {RUN_MODEL_NAME} in this folder; expected a "
                                    f"fine-tuning run folder ({LAYOUT}) or its {RUN_MODEL_NAME}")
    elif not path.is_file():
        raise FileNotFoundError(f"export --run {run}: no such run folder or file (expected {LAYOUT})")
    kind = read_metadata(path).get("kind")
    if kind == "clip":
        raise ValueError(f"export --run {run}: this is a zero-shot CLIP, not a fine-tuned run; "
                         f"it is an open_clip checkpoint already")
    if kind != "classifier":
        raise ValueError(f"export --run {run}: not a saeft fine-tuned classifier (metadata kind {kind!r})")
    return path


def resolve(run: str | os.PathLike, alpha: float | None = None, zeroshot_model: str | os.PathLike | None = None,
            zeroshot_head: str | os.PathLike | None = None) -> RunFiles:
    """The files of an export of ``run`` (see :func:`run_model_file`). The zero-shot model and
    head default to those of the run's study,
    ``results/<study>/models/<model>/zeroshot/{model.safetensors,heads/<dataset>.safetensors}``;
    the head is required with ``alpha`` (WiSE-FT) only, else read for its class names if there."""
    model = run_model_file(run)
    folder = model.parent
    in_layout = len(folder.parents) > 4 and folder.parents[3].name == "finetune"
    zeroshot = folder.parents[4] / "models" / folder.parents[2].name / "zeroshot" if in_layout else None
    if zeroshot_model is None:
        if zeroshot is None:
            raise ValueError(f"export --run {run}: not in the results layout ({LAYOUT}), so the zero-shot model "
                             f"is unknown; give --zeroshot-model")
        zeroshot_model = zeroshot / "model.safetensors"
    if not Path(zeroshot_model).is_file():
        raise FileNotFoundError(f"export: zero-shot model {zeroshot_model} does not exist")
    if zeroshot_head is None and zeroshot is not None:
        zeroshot_head = zeroshot / "heads" / f"{folder.parents[1].name}.safetensors"
    head = None if zeroshot_head is None else Path(zeroshot_head)
    if alpha is not None and (head is None or not head.is_file()):
        raise FileNotFoundError(f"export: WiSE-FT (--alpha {alpha:g}) needs the dataset's zero-shot head, "
                                + (f"{head} does not exist" if head is not None else "give --zeroshot-head"))
    if head is not None and not head.is_file():
        logger.warning("zero-shot head %s not found: the exported head's class names are the dataset's", head)
        head = None
    return RunFiles(model, Path(zeroshot_model), head)


def run(files: RunFiles, out: str | os.PathLike, alpha: float | None = None) -> dict[str, Any]:
    """Write the export of ``files`` (WiSE-FT at ``alpha``, if given) into the folder ``out``;
    returns the export record (also written to ``out/export.json``)."""
    from saeft.nn.models import load_classifier, load_clip, load_wiseft, open_clip_module

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"export --out {out}: exists and is not a folder")
    tuned_meta, zeroshot_arch = read_metadata(files.model), read_metadata(files.zeroshot_model).get("arch")
    if zeroshot_arch != tuned_meta.get("arch"):
        raise ValueError(f"export: {files.model} is a {tuned_meta.get('arch')} model, the zero-shot model "
                         f"{files.zeroshot_model} a {zeroshot_arch}")
    if alpha is None:
        classifier = load_classifier(files.model)[0]
    else:
        if files.zeroshot_head is None:
            raise ValueError("export: WiSE-FT (alpha) needs the zero-shot head")
        classifier = load_wiseft(files.model, files.zeroshot_model, files.zeroshot_head, alpha)
    clip, arch = load_clip(files.zeroshot_model)
    clip.visual.load_state_dict(classifier.visual.state_dict())  # strict: the same architecture
    dataset = tuned_meta.get("dataset")
    record = {"arch": arch, "dataset": dataset, "method": tuned_meta.get("method"), "seed": tuned_meta.get("seed"),
              "alpha": alpha, "model": str(files.model), "zeroshot_model": str(files.zeroshot_model),
              "zeroshot_head": None if files.zeroshot_head is None else str(files.zeroshot_head),
              "files": {"checkpoint": CHECKPOINT_NAME, "config": CONFIG_NAME, "head": HEAD_NAME}}
    open_clip = open_clip_module()
    save_tensors(out / CHECKPOINT_NAME, clip.state_dict(),
                 {"arch": arch, "kind": "clip", "source": f"saeft export of {files.model}", "export": record})
    with atomic_path(out / CONFIG_NAME) as tmp:
        config = {"model_cfg": open_clip.get_model_config(arch), "preprocess_cfg": open_clip.get_model_preprocess_cfg(clip)}
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    weight = classifier.head.weight.detach()
    save_tensors(out / HEAD_NAME, {"weight": weight},
                 {"kind": "classifier_head", "arch": arch, "dataset": dataset, "classnames": _classnames(files.zeroshot_head, dataset, len(weight)),
                  "logits": "F.normalize(model.encode_image(images), dim=-1) @ weight.T"})
    write_json(out / RECORD_NAME, record)
    logger.info("exported %s%s (%s, %d classes) to %s", files.model, "" if alpha is None else f" at alpha {alpha:g}",
                arch, len(weight), out)
    return record


def _classnames(zeroshot_head: Path | None, dataset: str | None, n_classes: int) -> list[str] | None:
    """The class names of the head's rows: those the zero-shot head the run started from records,
    else the registered dataset's, when either has as many; None otherwise."""
    from saeft.data.registry import REGISTRY

    if zeroshot_head is not None:
        names = read_metadata(zeroshot_head).get("classnames")
        if isinstance(names, list) and len(names) == n_classes:
            return [str(name) for name in names]
    spec = REGISTRY.get(dataset) if dataset else None
    if spec is None or len(spec.classnames) != n_classes:
        return None
    return list(spec.classnames)
