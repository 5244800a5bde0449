"""ImageNet and its five distribution shifts, read from their folder layouts under ``data_root``.

Class folders are WordNet ids (``n01440764``); their sorted order is the ImageNet label order
(the order of ``reference/imagenet_classnames_openai.json``), so a split must have all 1000 of
them (ImageNet-R and -A: their 200, whose sorted order follows ``imagenet_class_sublists.json``).
ImageNet-V2 folders are the label numbers ``0``..``999``. ObjectNet keeps the 113 classes that map
to ImageNet classes; its images lose a 2-pixel border (the red frame of the release) before the
transform, and its logits are projected from the 1000 ImageNet classes by a max per class.
Imports no torch.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from saeft.data.samples import DatasetLayoutError, RealDataOptions, Samples, class_folders, folder_samples, require_dir

REFERENCE = resources.files("saeft") / "data" / "reference"

FOLDERS = {
    "train": "imagenet/train",
    "val": "imagenet/val",
    "imagenet_v2": "imagenetv2-matched-frequency-format-val",
    "imagenet_r": "imagenet-r",
    "imagenet_sketch": "imagenet-sketch",
    "imagenet_a": "imagenet-a",
    "objectnet": "objectnet-1.0/images",
}
"""Folder of each split under ``data_root``."""

EXPECTED_IMAGES = {
    "train": 1_281_167,
    "val": 50_000,
    "imagenet_v2": 10_000,
    "imagenet_r": 30_000,
    "imagenet_sketch": 50_889,
    "imagenet_a": 7_500,
    "objectnet": 18_574,
}
"""Image counts of the public releases (ObjectNet: the images of its 113 ImageNet-mapped classes)."""

OBJECTNET_BORDER = 2


def _read_json(name: str) -> Any:
    return json.loads((REFERENCE / name).read_text())


@functools.cache
def classnames() -> tuple[str, ...]:
    """The 1000 ImageNet class names (OpenAI's CLIP wording), in label order."""
    return tuple(_read_json("imagenet_classnames_openai.json"))


@functools.cache
def templates() -> tuple[str, ...]:
    """OpenAI's 80 ImageNet prompt templates."""
    return tuple(_read_json("prompt_templates.json")["openai_imagenet"])


@functools.cache
def class_sublist(name: str) -> tuple[int, ...]:
    """ImageNet label indices of the 200 classes of ``imagenet_a`` or ``imagenet_r``, ascending."""
    return tuple(sorted(_read_json("imagenet_class_sublists.json")[name]))


@functools.cache
def objectnet_mapping() -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """ObjectNet's ImageNet-mapped classes: (folder names, class names, ImageNet label indices per
    class), classes in the sorted order of their folders (which is their label order)."""
    folder_of = {label: folder for folder, label in _read_json("objectnet/folder_to_objectnet_label.json").items()}
    to_imagenet = _read_json("objectnet/objectnet_to_imagenet_1k.json")
    # Line i of imagenet_to_label_2012_v2 names the class with ImageNet 2012 id i; the label
    # index of the usual (sorted wnid) order maps to that id through pytorch_to_imagenet_2012_id.
    names_2012 = (REFERENCE / "objectnet" / "imagenet_to_label_2012_v2").read_text().splitlines()
    label_of_id = {int(id_2012): int(label) for label, id_2012 in _read_json("objectnet/pytorch_to_imagenet_2012_id.json").items()}
    label_of_name = {name.strip(): label_of_id[i] for i, name in enumerate(names_2012)}
    classes = []
    for objectnet_name, imagenet_names in to_imagenet.items():
        labels = tuple(sorted(label_of_name[n] for n in imagenet_names.split("; ")))
        classes.append((folder_of[objectnet_name], objectnet_name, labels))
    classes.sort()
    return tuple(c[0] for c in classes), tuple(c[1] for c in classes), tuple(c[2] for c in classes)


def read_split(split: str, options: RealDataOptions) -> Samples:
    """The samples of ``split`` (a key of :data:`FOLDERS`) under ``options.data_root``."""
    if split not in FOLDERS:
        raise ValueError(f"imagenet has no split {split!r}; splits: {', '.join(FOLDERS)}")
    root = options.root / FOLDERS[split]
    source = str(root)
    if split in ("train", "val", "imagenet_sketch"):
        folders = class_folders(root, 1000, "one folder per ImageNet class, named by WordNet id")
        return folder_samples(folders, range(1000), source)
    if split in ("imagenet_r", "imagenet_a"):
        folders = class_folders(root, 200, f"one folder per class of {split}, named by WordNet id")
        return folder_samples(folders, range(200), source)
    if split == "imagenet_v2":
        require_dir(root, "folders 0..999, one per ImageNet label")
        folders = [root / str(label) for label in range(1000)]
        missing = [f.name for f in folders if not f.is_dir()]
        if missing:
            raise DatasetLayoutError(f"{root}: missing label folder(s) {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        return folder_samples(folders, range(1000), source)
    folders_needed, _, _ = objectnet_mapping()
    require_dir(root, "one folder per ObjectNet class, named as in folder_to_objectnet_label.json")
    missing = [name for name in folders_needed if not (root / name).is_dir()]
    if missing:
        raise DatasetLayoutError(f"{root}: missing ObjectNet class folder(s) {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    return folder_samples([root / name for name in folders_needed], range(len(folders_needed)), source, crop_border=OBJECTNET_BORDER)

