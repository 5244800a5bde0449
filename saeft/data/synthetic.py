"""A procedural image world with the structure of ImageNet and its distribution shifts.

Ten object classes are shapes. Each image is rendered from its own random stream, seeded by
(world seed, split, index), so an image never depends on how many others are generated and the
whole world is reproducible from one integer.

Domains mirror the ImageNet shifts:

* ``photo``: shaded object on a textured, coloured background (the ID domain). In the splits used
  for fine-tuning, the background hue follows the class with probability ``spurious``: a shortcut
  that fine-tuning picks up and that the shifted domains break, as context does for ImageNet.
* ``resampled``: the photo renderer re-sampled with different size, light and noise and a weaker
  shortcut (ImageNet-V2).
* ``sketch``: dark outlines on paper, no colour (ImageNet-Sketch).
* ``rendition``: flat cartoon colours, thick outlines, patterned backgrounds (ImageNet-R).
* ``hard``: occluded photos whose background hue points at a wrong class (ImageNet-A).

The pretraining corpus draws every domain with no shortcut, and captions name class and style,
so the contrastively pretrained model classifies by shape and has zero-shot ability on all domains.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import logging
import zlib
from typing import Literal

import numpy as np

from typing import Annotated

from saeft.config import Fraction, NonNegInt, PositiveInt, Schema, StageConfig
from saeft.data.corpus import PretrainCorpus

logger = logging.getLogger(__name__)

CLASSNAMES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross",
    "ring", "diamond", "hexagon", "crescent", "heart",
)
DOMAINS: tuple[str, ...] = ("photo", "resampled", "sketch", "rendition", "hard")
# Domains of the pretraining corpus: the resampled photos stay unseen, like ImageNet-V2.
PRETRAIN_DOMAINS: tuple[str, ...] = ("photo", "sketch", "rendition", "hard")
# How each domain is named in pretraining captions.
STYLE_WORDS: dict[str, tuple[str, ...]] = {
    "photo": ("photo",),
    "resampled": ("photo",),
    "sketch": ("sketch", "pencil drawing"),
    "rendition": ("cartoon", "painting"),
    "hard": ("occluded photo", "cropped photo"),
}
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {style} of a {c}.",
    "a {style} of the {c}.",
    "a {c} in a {style}.",
    "{style} of a {c}.",
)
# Zero-shot prompts: like OpenAI's ImageNet templates, they span the styles.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a sketch of a {c}.",
    "a cartoon of a {c}.",
    "a painting of the {c}.",
    "an occluded photo of a {c}.",
    "a {c}.",
)
# The background hue each class prefers when the shortcut is on (evenly spread on the wheel).
CLASS_HUES = np.linspace(0.0, 1.0, len(CLASSNAMES), endpoint=False)
# The object colour each class prefers in the pretraining corpus (``pretrain_object_cue``): a
# different assignment from the background hues, half a step off them.
OBJECT_HUES = (CLASS_HUES[np.array([3, 7, 0, 5, 9, 1, 8, 2, 6, 4])] + 0.05) % 1.0

Split = Literal["pretrain", "train", "val", "test", "sae_train", "sae_heldout", "resampled", "sketch", "rendition", "hard"]
# sae_train / sae_heldout: more ID photos (with the training splits' shortcut) for the SAE, which
# needs far more embeddings per latent than the fine-tuning split holds.
SPLIT_DOMAIN: dict[str, str] = {
    "train": "photo", "val": "photo", "test": "photo", "sae_train": "photo", "sae_heldout": "photo",
    "resampled": "resampled", "sketch": "sketch", "rendition": "rendition", "hard": "hard",
}
SPLITS: tuple[str, ...] = ("pretrain", *SPLIT_DOMAIN)


@dataclasses.dataclass
class WorldConfig(StageConfig):
    """The procedural shapes world: dataset 'shapes' and pretrain_clip's corpus (config key
    ``synthetic``)."""

    section = "synthetic"
    seed: NonNegInt = 0
    """Seed of the whole world; every image is a function of (seed, split, index)."""
    image_size: Annotated[int, Schema(minimum=16)] = 32
    """Side of the rendered square images in pixels."""
    train_per_class: PositiveInt = 100
    """ID training images per class (split ``train``)."""
    val_per_class: PositiveInt = 30
    """ID validation images per class (split ``val``), held out for SAE metrics."""
    test_per_class: PositiveInt = 50
    """Images per class in the ID test split and in each shifted test split."""
    pretrain_per_class: PositiveInt = 400
    """Pretraining images per class and domain (split ``pretrain``: every domain but the
    resampled photos, no shortcut)."""
    sae_train_per_class: PositiveInt = 2600
    """ID photos per class the SAE trains on (split ``sae_train``: the training distribution,
    shortcut included, disjoint from every other split)."""
    sae_heldout_per_class: PositiveInt = 1000
    """ID photos per class the SAE is measured on (split ``sae_heldout``: FVU, dead latents)."""
    spurious: Fraction = 0.9
    """Probability that an ID photo's background hue is its class's hue (the shortcut)."""
    spurious_resampled: Fraction = 0.5
    """The same probability in the ``resampled`` shift (ImageNet-V2-like, weaker shortcut)."""
    styleless_captions: Fraction = 0.0
    """Share of pretraining captions that name the class alone ("a circle."), as most web
    captions name no style; the others name class and style. 0 keeps every caption styled."""
    confusable_captions: Annotated[float, Schema(minimum=0, exclusive_maximum=0.5)] = 0.0
    """Share of pretraining captions that name the image's look-alike class instead of its own
    (a ring captioned "circle"), as web captions confuse similar categories: the zero-shot head
    then errs on those pairs in every domain, as CLIP's prompt head does, while labelled ID data
    can correct it. Below 0.5, so a caption still names its own class more often."""
    pretrain_object_cue: Fraction = 0.0
    """Probability that a pretraining image's object is drawn in its class's colour, a cue no
    caption names: web images carry correlations of their own, so zero-shot leans partly on
    features the ID photos (objects of random colour) and the shifts do not share, and that
    differ from the ID shortcut fine-tuning learns. 0 keeps object colours random everywhere."""
    object_scale: Annotated[float, Schema(exclusive_minimum=0, maximum=2)] = 1.0
    """Size of the objects in every domain, relative to the original renderer (1: about a third
    of the image side); larger objects are easier to tell apart at a given resolution."""

    def split_size(self, split: str) -> int:
        """Number of images in ``split``."""
        per_class = {
            "pretrain": self.pretrain_per_class * len(PRETRAIN_DOMAINS),
            "train": self.train_per_class,
            "val": self.val_per_class,
            "sae_train": self.sae_train_per_class,
            "sae_heldout": self.sae_heldout_per_class,
        }.get(split, self.test_per_class)
        return per_class * len(CLASSNAMES)


def split_label_and_domain(split: str, index: int) -> tuple[int, str]:
    """Class label and domain of image ``index`` of ``split`` (labels cycle through classes)."""
    n_classes = len(CLASSNAMES)
    label = index % n_classes
    if split == "pretrain":
        return label, PRETRAIN_DOMAINS[(index // n_classes) % len(PRETRAIN_DOMAINS)]
    return label, SPLIT_DOMAIN[split]


def render_split(cfg: WorldConfig, split: str, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render images ``start:stop`` of ``split``: uint8 (N, S, S, 3) images and int64 labels."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of the shapes world; known: {', '.join(SPLITS)}")
    stop = cfg.split_size(split) if stop is None else stop
    images = np.empty((stop - start, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    labels = np.empty(stop - start, dtype=np.int64)
    for row, index in enumerate(range(start, stop)):
        images[row], labels[row] = render_image(cfg, split, index)
    return images, labels


def render_image(cfg: WorldConfig, split: str, index: int) -> tuple[np.ndarray, int]:
    """Render one image of ``split`` deterministically; returns (uint8 HxWx3, label)."""
    label, domain = split_label_and_domain(split, index)
    rng = np.random.default_rng([cfg.seed, zlib.crc32(split.encode()), index])
    spurious = {"pretrain": 0.0, "resampled": cfg.spurious_resampled}.get(split, cfg.spurious)
    renderer = _RENDERERS[domain]
    cue = cfg.pretrain_object_cue if split == "pretrain" else 0.0
    image = renderer(rng, label, cfg.image_size * _SUPERSAMPLE, spurious, cfg.object_scale, cue)
    return _downsample(image), label


STYLELESS_TEMPLATES: tuple[str, ...] = ("a {c}.", "the {c}.", "a picture of a {c}.", "an image of the {c}.")
"""Captions that name the class alone (``synthetic.styleless_captions``)."""
LOOK_ALIKE_PAIRS: tuple[tuple[str, str], ...] = (
    ("circle", "ring"), ("square", "diamond"), ("star", "cross"), ("hexagon", "heart"), ("triangle", "crescent"))
"""The classes a noisy caption confuses (``synthetic.confusable_captions``), both ways."""
LOOK_ALIKE: dict[int, int] = {CLASSNAMES.index(a): CLASSNAMES.index(b) for pair in LOOK_ALIKE_PAIRS
                              for a, b in (pair, pair[::-1])}
CLASS_INDEX: dict[str, int] = {name: index for index, name in enumerate(CLASSNAMES)}


def caption(label: int, domain: str, rng: np.random.Generator, styleless: float = 0.0, confusable: float = 0.0) -> str:
    """A pretraining caption naming the class and the style of the image; with probability
    ``styleless``, the class alone; with probability ``confusable``, naming the look-alike class
    (no random number is drawn for either at 0)."""
    if confusable > 0 and rng.random() < confusable:
        label = LOOK_ALIKE[label]
    if styleless > 0 and rng.random() < styleless:
        return STYLELESS_TEMPLATES[rng.integers(len(STYLELESS_TEMPLATES))].format(c=CLASSNAMES[label])
    style = STYLE_WORDS[domain][rng.integers(len(STYLE_WORDS[domain]))]
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(style=style, c=CLASSNAMES[label])


def named_class(text: str) -> int:
    """The class a pretraining caption names (which a confusable caption takes from a look-alike)."""
    return next(CLASS_INDEX[word] for word in text.rstrip(".").split() if word in CLASS_INDEX)


STYLELESS_CAPTIONS: frozenset[str] = frozenset(t.format(c=c) for t in STYLELESS_TEMPLATES for c in CLASSNAMES)


def is_styleless(text: str) -> bool:
    """Whether a pretraining caption names the class alone (it then describes every domain)."""
    return text in STYLELESS_CAPTIONS


def pretrain_corpus(cfg: WorldConfig) -> PretrainCorpus:
    """The captioned ``pretrain`` split for ``pretrain_clip``: every domain but the resampled
    photos, no shortcut."""
    images, labels = render_split(cfg, "pretrain")
    domains = np.array([split_label_and_domain("pretrain", i)[1] for i in range(len(labels))])
    return PretrainCorpus(images=images, labels=labels, domains=domains,
                          caption=functools.partial(caption, styleless=cfg.styleless_captions, confusable=cfg.confusable_captions),
                          styleless=is_styleless, named_class=named_class)


# --------------------------------------------------------------------------------------------
# Rendering. Images are drawn at _SUPERSAMPLE x the size and averaged down, which anti-aliases
# the edges; all drawing is float RGB in [0, 1].

_SUPERSAMPLE = 2


def _downsample(image: np.ndarray) -> np.ndarray:
    s = _SUPERSAMPLE
    h, w, c = image.shape
    small = image.reshape(h // s, s, w // s, s, c).mean(axis=(1, 3))
    return np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)


def _shape_mask(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of class ``label`` in object coordinates (unit scale, y up)."""
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    name = CLASSNAMES[label]
    if name == "circle":
        return r < 0.95
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.78
    if name == "triangle":
        w = v + 0.35
        return (w > -0.15) & (np.sqrt(3) * u + v < 0.85) & (-np.sqrt(3) * u + v < 0.85)
    if name == "star":
        return r < 0.42 + 0.58 * ((np.cos(5 * (theta - np.pi / 2)) + 1) / 2) ** 2.5
    if name == "cross":
        return ((np.abs(u) < 0.28) & (np.abs(v) < 0.95)) | ((np.abs(v) < 0.28) & (np.abs(u) < 0.95))
    if name == "ring":
        return (r < 0.95) & (r > 0.55)
    if name == "diamond":
        return np.abs(u) / 0.75 + np.abs(v) < 1.0
    if name == "hexagon":
        angles = np.arange(6) * np.pi / 3
        proj = np.max([u * np.cos(a) + v * np.sin(a) for a in angles], axis=0)
        return proj < 0.82
    if name == "crescent":
        return (r < 0.95) & (np.hypot(u - 0.45, v + 0.1) > 0.75)
    if name == "heart":
        x, y = u * 1.15, v * 1.15 + 0.15
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 < 0
    raise AssertionError(name)


def _geometry(rng: np.random.Generator, size: int, scale_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, float]:
    """Object coordinates (u, v) of every pixel for a random position, scale and rotation."""
    scale = rng.uniform(*scale_range) * size
    cx, cy = rng.uniform(0.5 * size - 0.18 * size, 0.5 * size + 0.18 * size, size=2)
    # Small rotations only: a square turned by 45 degrees would be a diamond.
    angle = rng.uniform(-0.3, 0.3)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = (xs - cx) / scale, -(ys - cy) / scale
    cos, sin = np.cos(angle), np.sin(angle)
    return cos * dx + sin * dy, -sin * dx + cos * dy, scale


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _background_hue(rng: np.random.Generator, label: int, spurious: float, *, wrong: bool = False) -> float:
    if wrong:
        other = (label + rng.integers(1, len(CLASSNAMES))) % len(CLASSNAMES)
        return CLASS_HUES[other] + rng.normal(0, 0.02)
    if rng.random() < spurious:
        return CLASS_HUES[label] + rng.normal(0, 0.02)
    return rng.random()


def _photo_background(rng: np.random.Generator, size: int, hue: float, noise: float) -> np.ndarray:
    """A lit, textured background of one hue: a linear gradient plus blurred noise."""
    top = _hsv(hue, rng.uniform(0.45, 0.8), rng.uniform(0.55, 0.9))
    bottom = _hsv(hue + rng.normal(0, 0.03), rng.uniform(0.45, 0.8), rng.uniform(0.3, 0.6))
    direction = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / size
    t = np.clip(0.5 + (xs - 0.5) * np.cos(direction) + (ys - 0.5) * np.sin(direction), 0, 1)
    image = top * (1 - t[..., None]) + bottom * t[..., None]
    coarse = rng.normal(0, noise, size=(size // 8, size // 8, 1))
    return image + np.kron(coarse, np.ones((8, 8, 1)))


def _object_hue(rng: np.random.Generator, label: int, cue: float) -> float:
    """A random hue, or with probability ``cue`` the class's object hue (no draw at 0)."""
    if cue > 0 and rng.random() < cue:
        return OBJECT_HUES[label] + rng.normal(0, 0.02)
    return rng.random()


def _shaded_object(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, u: np.ndarray, v: np.ndarray,
                   label: int = 0, cue: float = 0.0) -> np.ndarray:
    """A shaded object of random hue, either light on a darkened background or dark on a
    lightened one: the shape always stands out by its value (as objects do in photos), which a
    small ViT needs to learn shapes from photos in a few thousand contrastive steps."""
    light = rng.random() < 0.5
    colour = _hsv(_object_hue(rng, label, cue), rng.uniform(0.4, 1.0), rng.uniform(0.85, 1.0) if light else rng.uniform(0.05, 0.25))
    shade = np.clip(1.0 + 0.25 * (u * rng.normal() + v * rng.normal()) / 2, 0.5, 1.3)
    shaded = np.clip(colour * shade[..., None], 0, 1)
    background = image * 0.55 if light else np.clip(image * 0.6 + 0.4, 0, 1)
    return np.where(mask[..., None], shaded, background)


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its border (erosion by shifts)."""
    eroded = mask.copy()
    for _ in range(width):
        shrunk = eroded.copy()
        shrunk[1:, :] &= eroded[:-1, :]
        shrunk[:-1, :] &= eroded[1:, :]
        shrunk[:, 1:] &= eroded[:, :-1]
        shrunk[:, :-1] &= eroded[:, 1:]
        eroded = shrunk
    return mask & ~eroded


def _render_photo(rng: np.random.Generator, label: int, size: int, spurious: float, scale: float = 1.0, cue: float = 0.0) -> np.ndarray:
    u, v, _ = _geometry(rng, size, (0.24 * scale, 0.36 * scale))
    hue = _background_hue(rng, label, spurious)
    image = _photo_background(rng, size, hue, noise=0.06)
    image = _shaded_object(image, _shape_mask(label, u, v), rng, u, v, label, cue)
    return np.clip(image + rng.normal(0, 0.03, size=image.shape), 0, 1)


def _render_resampled(rng: np.random.Generator, label: int, size: int, spurious: float, scale: float = 1.0, cue: float = 0.0) -> np.ndarray:
    # Same renderer, re-collected: smaller objects, harsher light, more sensor noise.
    u, v, _ = _geometry(rng, size, (0.2 * scale, 0.3 * scale))
    hue = _background_hue(rng, label, spurious)
    image = _photo_background(rng, size, hue, noise=0.09) * rng.uniform(0.7, 1.15)
    image = _shaded_object(image, _shape_mask(label, u, v), rng, u, v, label, cue)
    return np.clip(image + rng.normal(0, 0.05, size=image.shape), 0, 1)


def _render_sketch(rng: np.random.Generator, label: int, size: int, spurious: float, scale: float = 1.0, cue: float = 0.0) -> np.ndarray:
    u, v, _ = _geometry(rng, size, (0.24 * scale, 0.36 * scale))
    paper = rng.uniform(0.85, 1.0)
    image = np.full((size, size, 3), paper) + rng.normal(0, 0.02, size=(size, size, 1))
    mask = _shape_mask(label, u, v)
    ink = rng.uniform(0.05, 0.35)
    image[_outline(mask, int(rng.integers(1, 4)))] = ink
    # Sparse hatching strokes inside the shape, as pencil shading.
    hatch = ((np.arange(size)[:, None] + np.arange(size)[None, :]) % int(rng.integers(5, 9)) == 0)
    image[mask & hatch & (rng.random((size, size)) < 0.6)] = ink + 0.3
    return np.clip(image, 0, 1)


def _render_rendition(rng: np.random.Generator, label: int, size: int, spurious: float, scale: float = 1.0, cue: float = 0.0) -> np.ndarray:
    u, v, _ = _geometry(rng, size, (0.24 * scale, 0.36 * scale))
    ys, xs = np.mgrid[0:size, 0:size]
    period = int(rng.integers(6, 14))
    if rng.random() < 0.5:
        pattern = ((xs // period + ys // period) % 2).astype(bool)
    else:
        pattern = (((xs + ys) // period) % 2).astype(bool)
    c1, c2 = _hsv(rng.random(), 0.5, 0.95), _hsv(rng.random(), 0.5, 0.8)
    image = np.where(pattern[..., None], c1, c2)
    mask = _shape_mask(label, u, v)
    image = np.where(mask[..., None], _hsv(_object_hue(rng, label, cue), 1.0, 1.0), image)
    image[_outline(mask, int(rng.integers(2, 4)))] = 0.0
    return image


def _render_hard(rng: np.random.Generator, label: int, size: int, spurious: float, scale: float = 1.0, cue: float = 0.0) -> np.ndarray:
    u, v, size_px = _geometry(rng, size, (0.24 * scale, 0.36 * scale))
    # Adversarial context: the background hue is another class's shortcut hue.
    hue = _background_hue(rng, label, spurious, wrong=spurious > 0)
    image = _photo_background(rng, size, hue, noise=0.08)
    image = _shaded_object(image, _shape_mask(label, u, v), rng, u, v, label, cue)
    # Occluders: two bars in background-like colours, each hiding a part of the object.
    for _ in range(2):
        w, h = rng.uniform(0.25, 0.6) * size_px * 2, rng.uniform(0.15, 0.3) * size_px * 2
        if rng.random() < 0.5:
            w, h = h, w
        x0, y0 = rng.uniform(0.2, 0.8, size=2) * size - np.array([w, h]) / 2
        x0i, y0i = int(max(x0, 0)), int(max(y0, 0))
        image[y0i:int(y0 + h), x0i:int(x0 + w)] = _hsv(rng.random(), 0.3, rng.uniform(0.3, 0.8))
    return np.clip(image + rng.normal(0, 0.04, size=image.shape), 0, 1)


_RENDERERS = {
    "photo": _render_photo,
    "resampled": _render_resampled,
    "sketch": _render_sketch,
    "rendition": _render_rendition,
    "hard": _render_hard,
}
