"""Fashion-MNIST with shifted test sets: the real-image offline study (docs/fashion_mnist.md).

The images come from Debian's ``dataset-fashion-mnist`` (gzipped idx files, 60k train and 10k
test 28x28 grey images, 10 classes), read from a configurable folder and never downloaded. Every
image is resized to ``image_size`` and turned into RGB. The splits:

* ``pretrain``: captioned images for ``pretrain_clip``, drawn from the training file, disjoint from
  the fine-tuning images. Its domains are the clean images, each ``pretrain_corruptions`` family
  (ImageNet-C corruptions of the ``imagecorruptions`` package, at a severity drawn from
  ``pretrain_severities``) and each of ``pretrain_styles`` (inversion, edge-map sketch).
* ``train`` and ``val`` (held out): clean images of the training file, the ID domain.
* ``test``: clean images of the test file (ID evaluation).
* ``corrupted``: the same test images under the ``heldout_corruptions`` families, which
  pretraining never saw, cycling through families and ``severities`` so each class gets each.
* ``inverted`` and ``sketch``: the same test images inverted, or as dark edge maps on white.

Every image is a function of (seed, split, index): the partition of the files is a seeded
permutation per class, and each corruption draws from its own generator seeded by the row, so an
image never depends on how many others are made. ``impulse_noise`` is not offered: in
imagecorruptions 1.1.2 it draws from an unseeded generator, so it cannot be reproduced; and
``glass_blur``, ``gaussian_blur`` and ``fog`` fail on NumPy 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import logging
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np

from saeft.config import NonNegInt, PositiveInt, Schema, StageConfig, require
from saeft.data.corpus import PretrainCorpus

if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
APT_PACKAGE = "dataset-fashion-mnist"
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Images of each class in each file of the published dataset.
PER_CLASS = {"train": 6000, "t10k": 1000}

CLASSNAMES: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
# The ImageNet-C families of imagecorruptions 1.1.2 that work on NumPy 2 and are reproducible
# from a seed, each with the words a caption uses for it.
CORRUPTION_WORDS: dict[str, tuple[str, ...]] = {
    "gaussian_noise": ("noisy photo",),
    "shot_noise": ("grainy photo",),
    "speckle_noise": ("speckled photo",),
    "defocus_blur": ("blurry photo", "defocused photo"),
    "motion_blur": ("motion-blurred photo",),
    "zoom_blur": ("zoom-blurred photo",),
    "snow": ("snowy photo",),
    "frost": ("frosted photo",),
    "spatter": ("splashed photo",),
    "brightness": ("bright photo", "overexposed photo"),
    "contrast": ("faded photo", "low-contrast photo"),
    "saturate": ("saturated photo",),
    "elastic_transform": ("warped photo",),
    "pixelate": ("pixelated photo",),
    "jpeg_compression": ("compressed photo", "jpeg photo"),
}
UNUSABLE_CORRUPTIONS: dict[str, str] = {
    "impulse_noise": "draws from an unseeded generator in imagecorruptions 1.1.2 (not reproducible)",
    "glass_blur": "fails on NumPy 2 in imagecorruptions 1.1.2",
    "gaussian_blur": "fails on NumPy 2 in imagecorruptions 1.1.2",
    "fog": "fails on NumPy 2 in imagecorruptions 1.1.2",
}
STYLE_WORDS: dict[str, tuple[str, ...]] = {
    "clean": ("photo", "picture"),
    "inverted": ("negative photo", "negative"),
    "sketch": ("sketch", "line drawing"),
}
STYLES: tuple[str, ...] = ("inverted", "sketch")
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {style} of a {c}.",
    "a {style} of the {c}.",
    "a {c} in a {style}.",
    "{style} of a {c}.",
)
# Zero-shot prompts span the styles, like OpenAI's ImageNet templates.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a noisy photo of a {c}.",
    "a negative photo of a {c}.",
    "a sketch of a {c}.",
    "a {c}.",
)
ID_SPLITS: tuple[str, ...] = ("train", "val", "test")
SHIFT_SPLITS: tuple[str, ...] = ("corrupted", "inverted", "sketch")
SPLITS: tuple[str, ...] = ("pretrain", *ID_SPLITS, *SHIFT_SPLITS, "sae_train", "sae_heldout")
# Splits drawn from the training file (the others from the test file).
TRAIN_FILE_SPLITS: tuple[str, ...] = ("pretrain", "train", "val", "sae_train", "sae_heldout")


Severities = Annotated[list[Annotated[int, Schema(minimum=1, maximum=5)]], Schema(min_items=1, unique_items=True)]
"""ImageNet-C severities, 1 to 5."""


@dataclasses.dataclass
class FashionMNISTConfig(StageConfig):
    """Fashion-MNIST (Debian dataset-fashion-mnist) and its shifted test sets: dataset
    'fashion_mnist'; pretrain.dataset fashion_mnist pretrains on its captioned corpus (config key
    ``fashion_mnist``)."""

    section = "fashion_mnist"
    root: Annotated[str, Schema(min_length=1)] = DEFAULT_ROOT
    """Folder of the four gzipped idx files (Debian: ``apt-get install dataset-fashion-mnist``)."""
    seed: NonNegInt = 0
    """Seed of the partition into splits and of every corruption."""
    image_size: Annotated[int, Schema(minimum=16)] = 32
    """Side of the RGB images the 28x28 grey originals are resized to (the model's input size)."""
    train_per_class: PositiveInt = 100
    """ID fine-tuning images per class (split ``train``, from the training file)."""
    val_per_class: PositiveInt = 30
    """Held-out ID images per class (split ``val``, from the training file)."""
    test_per_class: PositiveInt = 100
    """Test-file images per class; the ID test split and every shifted split use these images."""
    pretrain_per_class: PositiveInt = 100
    """Pretraining images per class and pretraining domain (split ``pretrain``), disjoint from
    ``train`` and ``val``."""
    sae_train_per_class: PositiveInt = 2600
    """ID images per class the SAE trains on (split ``sae_train``, clean, from the training file,
    disjoint from every other split)."""
    sae_heldout_per_class: PositiveInt = 1000
    """ID images per class the SAE is measured on (split ``sae_heldout``)."""
    pretrain_corruptions: list[str] = dataclasses.field(
        default_factory=lambda: ["gaussian_noise", "defocus_blur", "contrast", "jpeg_compression"])
    """Corruption families seen in pretraining (each its own captioned domain)."""
    pretrain_severities: Severities = dataclasses.field(default_factory=lambda: [1, 2, 3])
    """Severities a pretraining image's corruption is drawn from."""
    pretrain_styles: Annotated[list[Literal["inverted", "sketch"]], Schema(unique_items=True)] = dataclasses.field(default_factory=lambda: list(STYLES))
    """Style changes seen in pretraining (``inverted``, ``sketch``); the others stay unseen."""
    heldout_corruptions: list[str] = dataclasses.field(
        default_factory=lambda: ["shot_noise", "motion_blur", "zoom_blur", "frost", "spatter", "elastic_transform", "pixelate"])
    """Corruption families of the ``corrupted`` test split, held out from pretraining."""
    severities: Severities = dataclasses.field(default_factory=lambda: [1, 2, 3])
    """Severities of the ``corrupted`` test split (1 to 5), cycled over its images."""

    def validate(self) -> None:
        for key in ("pretrain_corruptions", "heldout_corruptions"):
            families = getattr(self, key)
            for family in families:
                if family in UNUSABLE_CORRUPTIONS:
                    require(False, f"fashion_mnist.{key}", f"{family!r} {UNUSABLE_CORRUPTIONS[family]}")
                require(family in CORRUPTION_WORDS, f"fashion_mnist.{key}",
                        f"unknown corruption {family!r}; usable: {', '.join(CORRUPTION_WORDS)}")
            require(len(set(families)) == len(families), f"fashion_mnist.{key}", "lists a family twice")
        require(len(self.heldout_corruptions) >= 1, "fashion_mnist.heldout_corruptions", "must list at least one family")
        seen = sorted(set(self.pretrain_corruptions) & set(self.heldout_corruptions))
        require(not seen, "fashion_mnist.heldout_corruptions",
                f"{', '.join(seen)} also in fashion_mnist.pretrain_corruptions: held-out families must be unseen in pretraining")
        needed = (self.train_per_class + self.val_per_class + self.pretrain_per_class * len(self.pretrain_domains)
                  + self.sae_train_per_class + self.sae_heldout_per_class)
        require(needed <= PER_CLASS["train"], "fashion_mnist",
                f"train_per_class + val_per_class + pretrain_per_class x {len(self.pretrain_domains)} pretraining domains"
                f" + sae_train_per_class + sae_heldout_per_class = {needed} images per class, but the training file"
                f" has {PER_CLASS['train']}")
        require(self.test_per_class <= PER_CLASS["t10k"], "fashion_mnist.test_per_class",
                f"the test file has {PER_CLASS['t10k']} images per class, got {self.test_per_class}")

    @property
    def pretrain_domains(self) -> tuple[str, ...]:
        """Domains of the pretraining split: clean, each pretraining corruption, each style."""
        return ("clean", *self.pretrain_corruptions, *self.pretrain_styles)

    def split_size(self, split: str) -> int:
        """Number of images in ``split``."""
        per_class = {
            "pretrain": self.pretrain_per_class * len(self.pretrain_domains),
            "train": self.train_per_class,
            "val": self.val_per_class,
            "sae_train": self.sae_train_per_class,
            "sae_heldout": self.sae_heldout_per_class,
        }.get(split, self.test_per_class)
        return per_class * len(CLASSNAMES)


# --------------------------------------------------------------------------------------------
# Files.

def read_idx(path: str | Path) -> np.ndarray:
    """A gzipped idx file (the MNIST format) as a uint8 array of its declared shape."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: idx element type {data[2]:#04x}, expected 0x08 (unsigned byte)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    count = int(np.prod(shape))
    if len(data) != header + count:
        raise ValueError(f"{path}: header declares shape {shape} ({count} bytes) but {len(data) - header} bytes follow")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def check_files(root: str | Path) -> None:
    """Raise FileNotFoundError naming the folder, the missing files and the Debian package."""
    folder = Path(root)
    missing = [name for pair in FILES.values() for name in pair if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {folder} (config key fashion_mnist.root): missing {', '.join(missing)}."
            f" Install it with 'apt-get install {APT_PACKAGE}' (files in {DEFAULT_ROOT}) or point"
            f" fashion_mnist.root at a folder holding {', '.join(n for pair in FILES.values() for n in pair)}"
        )


@functools.lru_cache(maxsize=4)
def read_part(root: str, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) and labels (N,) of the ``train`` or ``t10k`` file pair, checked."""
    check_files(root)
    images_name, labels_name = FILES[part]
    images = read_idx(Path(root) / images_name)
    labels = read_idx(Path(root) / labels_name).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: {images_name} has shape {images.shape} but {labels_name} has {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSNAMES)):
        raise ValueError(f"{root}/{labels_name}: labels outside 0..{len(CLASSNAMES) - 1}")
    return images, labels


def _class_pools(labels: np.ndarray, seed: int, part: str) -> list[np.ndarray]:
    """Indices of each class's images in a seeded order (the partition draws from the front)."""
    rng = np.random.default_rng([seed, zlib.crc32(part.encode())])
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(CLASSNAMES))]


def source_indices(cfg: FashionMNISTConfig, split: str, labels: np.ndarray) -> np.ndarray:
    """Row -> index into its file for every image of ``split``; ``labels`` are that file's labels.

    Rows cycle through the classes. Per class, the training file's seeded order gives ``train``
    first, then ``val``, then ``pretrain`` (so changing the pretraining keys never changes the
    fine-tuning images), and the SAE's splits from the back (``sae_heldout`` last, ``sae_train``
    before it); the test file's order gives the test images shared by every test split."""
    pools = _class_pools(labels, cfg.seed, "train" if split in TRAIN_FILE_SPLITS else "t10k")
    n_classes = len(CLASSNAMES)
    per_class = cfg.split_size(split) // n_classes
    from_back = {"sae_heldout": cfg.sae_heldout_per_class, "sae_train": cfg.sae_heldout_per_class + cfg.sae_train_per_class}
    front = {"train": 0, "val": cfg.train_per_class, "pretrain": cfg.train_per_class + cfg.val_per_class}
    if split in from_back:
        front_end = cfg.train_per_class + cfg.val_per_class + cfg.split_size("pretrain") // n_classes
        starts = [len(pool) - from_back[split] for pool in pools]
        short = [c for c, start in enumerate(starts) if start < front_end]
    else:
        starts = [front.get(split, 0)] * n_classes
        short = [c for c, pool in enumerate(pools) if len(pool) < starts[c] + per_class]
    if short:
        c = short[0]
        raise ValueError(f"{cfg.root}: class {CLASSNAMES[c]!r} has {len(pools[c])} images, too few: split {split}"
                         f" needs {per_class} per class beside the other splits")
    return np.array([pools[i % n_classes][starts[i % n_classes] + i // n_classes] for i in range(per_class * n_classes)], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Domains.

def row_domain(cfg: FashionMNISTConfig, split: str, index: int) -> tuple[str, int]:
    """Domain (clean, a corruption family or a style) and severity (0: none) of a row."""
    k = index // len(CLASSNAMES)
    if split == "pretrain":
        return cfg.pretrain_domains[k % len(cfg.pretrain_domains)], 0  # severity drawn per image
    if split == "corrupted":
        families = cfg.heldout_corruptions
        return families[k % len(families)], cfg.severities[(k // len(families)) % len(cfg.severities)]
    if split in STYLES:
        return split, 0
    return "clean", 0


@contextlib.contextmanager
def _numpy_global_seed(seed: int) -> Iterator[None]:
    """imagecorruptions draws from NumPy's global generator: seed it, and restore it afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def corrupt(image: np.ndarray, family: str, severity: int, seed: int) -> np.ndarray:
    """``image`` (uint8 HxWx3) under one ImageNet-C corruption, reproducible from ``seed``."""
    try:
        import warnings

        with warnings.catch_warnings():  # its pkg_resources import warns on every setuptools
            warnings.simplefilter("ignore")
            from imagecorruptions import corrupt as imagenet_c
    except ImportError as exc:
        raise ImportError("the Fashion-MNIST shifts need the imagecorruptions package: pip install 'saeft[fashion]'"
                          " (or pip install imagecorruptions 'setuptools<81')") from exc
    with _numpy_global_seed(seed):
        out = imagenet_c(image, severity=severity, corruption_name=family)
    return np.clip(np.rint(np.asarray(out, dtype=np.float64)), 0, 255).astype(np.uint8)


def edge_sketch(grey: np.ndarray) -> np.ndarray:
    """Dark Sobel edges on white paper: a line drawing of a float grey image in [0, 1]."""
    padded = np.pad(grey, 1, mode="edge")
    dx = (padded[:-2, 2:] + 2 * padded[1:-1, 2:] + padded[2:, 2:]) - (padded[:-2, :-2] + 2 * padded[1:-1, :-2] + padded[2:, :-2])
    dy = (padded[2:, :-2] + 2 * padded[2:, 1:-1] + padded[2:, 2:]) - (padded[:-2, :-2] + 2 * padded[:-2, 1:-1] + padded[:-2, 2:])
    magnitude = np.hypot(dx, dy)
    # Normalised per image so faint garments still get visible lines.
    ink = np.clip(magnitude / max(float(np.percentile(magnitude, 98)), 1e-6), 0.0, 1.0)
    return 1.0 - ink


def _resize(image28: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if image28.shape == (size, size):
        return image28
    return np.asarray(Image.fromarray(image28, mode="L").resize((size, size), Image.BILINEAR))


def make_image(cfg: FashionMNISTConfig, split: str, index: int, original: np.ndarray) -> np.ndarray:
    """Row ``index`` of ``split`` from its 28x28 original: resized, RGB, in the row's domain."""
    domain, severity = row_domain(cfg, split, index)
    grey = _resize(original, cfg.image_size)
    if domain == "inverted":
        grey = 255 - grey
    elif domain == "sketch":
        grey = np.rint(edge_sketch(grey.astype(np.float64) / 255.0) * 255.0).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if domain in CORRUPTION_WORDS:
        rng = np.random.default_rng([cfg.seed, zlib.crc32(split.encode()), index])
        if severity == 0:
            severity = int(rng.choice(cfg.pretrain_severities))
        rgb = corrupt(rgb, domain, severity, int(rng.integers(2**32 - 1)))
    return rgb


def render_split(cfg: FashionMNISTConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every image of ``split``: uint8 (N, S, S, 3) images and int64 labels."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of fashion_mnist; known: {', '.join(SPLITS)}")
    originals, file_labels = read_part(cfg.root, "train" if split in TRAIN_FILE_SPLITS else "t10k")
    rows = source_indices(cfg, split, file_labels)
    images = np.empty((len(rows), cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    for i, row in enumerate(rows):
        images[i] = make_image(cfg, split, i, originals[row])
    return images, file_labels[rows].copy()


def caption(label: int, domain: str, rng: np.random.Generator) -> str:
    """A pretraining caption naming the class and the domain's style."""
    words = STYLE_WORDS.get(domain) or CORRUPTION_WORDS[domain]
    style = words[rng.integers(len(words))]
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(style=style, c=CLASSNAMES[label])


def pretrain_corpus(cfg: FashionMNISTConfig) -> PretrainCorpus:
    """The captioned ``pretrain`` split for ``pretrain_clip``."""
    images, labels = render_split(cfg, "pretrain")
    domains = np.array([row_domain(cfg, "pretrain", i)[0] for i in range(len(labels))])
    return PretrainCorpus(images=images, labels=labels, domains=domains, caption=caption)


def options(data: dict[str, Any] | None) -> FashionMNISTConfig:
    """The loader's options from the ``fashion_mnist`` config mapping (validated)."""
    return FashionMNISTConfig.from_dict(data, "fashion_mnist.")


def load_split(split: str, transform: Callable[[Image.Image], torch.Tensor], cfg: FashionMNISTConfig) -> torch.utils.data.Dataset:
    """``split`` as a Dataset of (transformed image, label), for the registry."""
    from saeft.data.arrays import ArrayImageDataset
    from saeft.data.image_cache import cached_split

    files = [Path(cfg.root) / name for pair in FILES.values() for name in pair]
    images, labels = cached_split("fashion_mnist", split, cfg, render_split, sys.modules[__name__], files)
    logger.info("made %d images of fashion_mnist/%s from %s", len(labels), split, cfg.root)
    return ArrayImageDataset(images, labels, transform)
