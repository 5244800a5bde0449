"""What a real dataset's layout reader returns, and the checks every reader shares.

A reader turns ``data_root`` plus a split into :class:`Samples` (image files or an in-memory uint8
array, labels, optional group metadata such as FMoW regions) without importing torch, so the same
code serves ``check_dataset`` (layout and counts, before any heavy job) and the loaders (which wrap
the samples in a torch Dataset). Layout problems raise :class:`DatasetLayoutError`, which names the
path and what is missing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from saeft.config import ConfigError, PositiveInt, StageConfig, require

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


class DatasetLayoutError(FileNotFoundError):
    """A dataset under ``data_root`` is missing or incomplete; the message names the path and the
    expected layout."""


@dataclasses.dataclass
class RealDataOptions(StageConfig):
    """Options of a dataset read from disk (built by the workflow from ``data_root`` and
    ``data.<dataset>``)."""

    data_root: str = ""
    """Folder holding every dataset in its documented layout (config key ``data_root``)."""
    expected_images: dict[str, PositiveInt] = dataclasses.field(default_factory=dict)
    """Per split, the image count check_dataset requires instead of the dataset's real count
    (for fixture or partial trees)."""

    verify_images: bool = False
    """check_dataset also opens every image file and fails on any that does not decode (reads
    every file: minutes for ImageNet)."""
    classes: list[str | int] | None = None
    """A class subset (e.g. an ImageNet-100 list): class names as in prompts or label indices of
    the dataset; every split, head and shift keeps only these classes, relabelled in the
    dataset's order (saeft.data.subset; docs/real_data.md, 'Paper studies on a subset'). None: every class."""
    max_images_per_class: PositiveInt | None = None
    """At most this many images of each class in every split (the first in the reader's order:
    file names, metadata rows), for quick iterations. None: every image."""
    templates: PositiveInt | None = None
    """Zero-shot heads (and FLYP's prompts) use only the first N prompt templates of the
    dataset. None: every template."""

    def validate(self) -> None:
        require(bool(self.data_root), "data_root", "is not set: real datasets are read from it (--config data_root=/path)")

    @property
    def reduced(self) -> bool:
        """Whether a class subset, an image cap or a template count is set."""
        return self.classes is not None or self.max_images_per_class is not None or self.templates is not None

    @property
    def root(self) -> Path:
        return Path(self.data_root)


@dataclasses.dataclass
class Samples:
    """One split of a dataset as the loaders see it: files or an array, and labels."""

    labels: np.ndarray
    """int64 (N,) class indices in the dataset's (or eval set's) class order."""
    files: list[Path] | None = None
    """Image files, one per label (or None for array-backed datasets)."""
    images: np.ndarray | None = None
    """uint8 (N, H, W, 3) images (or None for file-backed datasets)."""
    groups: np.ndarray | None = None
    """int64 (N,) group index per sample (FMoW: region), or None."""
    group_names: tuple[str, ...] = ()
    """Names of the groups, indexed by ``groups``."""
    crop_border: int = 0
    """Pixels removed from every side of each image before the transform (ObjectNet: 2)."""
    source: str = ""
    """Where the samples were read from (for messages and the check marker)."""

    def __post_init__(self) -> None:
        if (self.files is None) == (self.images is None):
            raise ValueError("Samples needs exactly one of files and images")
        n = len(self.files) if self.files is not None else len(self.images)
        if len(self.labels) != n or (self.groups is not None and len(self.groups) != n):
            raise ValueError(f"{self.source}: {n} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self, n_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=n_classes)

    def select(self, keep: np.ndarray, labels: np.ndarray | None = None) -> Samples:
        """The samples at the (sorted) indices ``keep``, with new ``labels`` for them if given."""
        return dataclasses.replace(
            self, labels=self.labels[keep] if labels is None else np.asarray(labels, dtype=np.int64),
            files=[self.files[i] for i in keep] if self.files is not None else None,
            images=self.images[keep] if self.images is not None else None,
            groups=self.groups[keep] if self.groups is not None else None)


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a DatasetLayoutError naming it and ``what`` it should hold."""
    if not path.is_dir():
        raise DatasetLayoutError(f"{path}: missing folder ({what})")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: missing file ({what})")
    return path


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)


def class_folders(root: Path, expected: int | None, what: str) -> list[Path]:
    """The class sub-folders of ``root`` in sorted order (their index is the label); with
    ``expected``, exactly that many must exist, since labels follow from the sorted order."""
    require_dir(root, what)
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if expected is not None and len(folders) != expected:
        raise DatasetLayoutError(f"{root}: expected {expected} class folders ({what}), found {len(folders)}")
    return folders


def folder_samples(folders: Sequence[Path], labels: Sequence[int], source: str, crop_border: int = 0) -> Samples:
    """Samples of every image in ``folders``, labelled per folder; an empty folder is an error."""
    files: list[Path] = []
    targets: list[int] = []
    for folder, label in zip(folders, labels):
        found = image_files(folder)
        if not found:
            raise DatasetLayoutError(f"{folder}: class folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files += found
        targets += [label] * len(found)
    return Samples(labels=np.asarray(targets, dtype=np.int64), files=files, source=source, crop_border=crop_border)


def check_count(samples: Samples, expected: int | None, split: str) -> None:
    """The split must hold ``expected`` images (None: any non-zero number)."""
    if len(samples) == 0:
        raise DatasetLayoutError(f"{samples.source}: split {split!r} holds no images")
    if expected is not None and len(samples) != expected:
        raise DatasetLayoutError(
            f"{samples.source}: split {split!r} holds {len(samples)} images, expected {expected} "
            f"(a partial copy? set data.<dataset>.expected_images.{split} to accept it)"
        )


def options_from(data: dict[str, Any] | None) -> RealDataOptions:
    """RealDataOptions from the mapping the workflow passes; errors name the key."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"dataset options must be a mapping, got {type(data).__name__}")
    return RealDataOptions.from_dict(data, "")


def undecodable(files: Sequence[Path], limit: int = 5) -> list[str]:
    """Up to ``limit`` of ``files`` that PIL cannot decode, each with the reason."""
    from PIL import Image

    bad = []
    for path in files:
        try:
            with Image.open(path) as image:
                image.load()  # decodes the pixels: a truncated file fails here, not at open
        except Exception as exc:  # PIL raises OSError, SyntaxError or ValueError for bad files
            bad.append(f"{path} ({exc})")
            if len(bad) >= limit:
                break
    return bad
