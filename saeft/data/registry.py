"""The dataset registry: what each dataset offers the stages, and how to load its splits.

A dataset declares its class names, prompt templates, splits (which one trains, which is held out,
which is the ID evaluation, which are the shifts), its metric, and per evaluation split the hooks
the evaluator honours (:class:`EvalSet`: a class sub-list, a logit projection, a metric of its own).
Real datasets are read from ``data_root`` by torch-free layout readers (``saeft.data.imagenet``,
``wilds``, ``smallsets``), which also serve ``check_dataset``. Stages ask the registry for a split
and get a ``torch.utils.data.Dataset`` of ``(image tensor, label)``. The registry imports no torch
itself, so the Snakefile can read it and dry runs stay fast.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from saeft.data import fashion_mnist, imagenet, samples, smallsets, subset, synthetic, wilds
from saeft.data.samples import RealDataOptions, Samples

if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

METRICS = ("top1", "macro_f1", "worst_region_acc")
"""Metrics the evaluator computes: top-1 accuracy; macro-F1 over the classes present in the eval
set (WILDS convention); the lowest accuracy over the regions, 'Other' left out (WILDS FMoW)."""


def fill_template(template: str, classname: str) -> str:
    """A prompt: ``{c}`` is the class name, ``{a_c}`` the class name with its indefinite article."""
    article = "an" if classname[:1].lower() in "aeiou" else "a"
    return template.replace("{a_c}", f"{article} {classname}").replace("{c}", classname)


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """How the evaluator scores one evaluation split: which logits, which metric."""

    metric: str = "top1"
    """One of :data:`METRICS`."""
    class_subset: tuple[int, ...] | None = None
    """Head classes the eval set covers, in its label order: the logits are restricted to them
    (ImageNet-A/-R: their 200 classes)."""
    projection: tuple[tuple[int, ...], ...] | None = None
    """Per eval-set class, the head classes whose maximum logit is its logit (ObjectNet)."""
    classnames: tuple[str, ...] | None = None
    """Names of the eval set's classes when they differ from the dataset's."""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; known: {', '.join(METRICS)}")
        if self.class_subset is not None and self.projection is not None:
            raise ValueError("an eval set has a class sub-list or a logit projection, not both")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a dataset declares to the pipeline."""

    name: str
    """Registry key, used in paths and config."""
    classnames: tuple[str, ...]
    """Class names in label order, as they appear in prompts."""
    templates: tuple[str, ...]
    """Zero-shot prompt templates; ``{c}`` is the class name, ``{a_c}`` it with its article."""
    train_split: str
    """Split used for fine-tuning and SAE training."""
    heldout_split: str
    """Split held out for SAE metrics and per-epoch monitoring."""
    id_eval: str
    """In-distribution evaluation split (also the split a transfer evaluation reads)."""
    ood_evals: tuple[str, ...]
    """Distribution-shift evaluation splits."""
    metric: str = "top1"
    """Metric of every evaluation split without an :class:`EvalSet` of its own."""
    loader: Callable[..., "torch.utils.data.Dataset"] | None = None
    """``loader(split, transform, options) -> Dataset`` (the shapes world)."""
    reader: Callable[[str, RealDataOptions], Samples] | None = None
    """``reader(split, options) -> Samples`` of a dataset on disk under ``data_root``."""
    options_type: Callable[..., Any] | None = None
    """Builds the loader's options from the dataset's config mapping (validated)."""
    evalsets: Mapping[str, EvalSet] = dataclasses.field(default_factory=dict)
    """Hooks of evaluation splits that differ from the default (top-1 over every class)."""
    expected_images: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Per split, the image count of the public release, which check_dataset requires unless
    the config overrides it."""
    layout: str = ""
    """The expected folder layout under ``data_root``, for error messages and docs/real_data.md."""
    pretrain_corpus: Callable[[Any], Any] | None = None
    """``pretrain_corpus(options) -> saeft.data.corpus.PretrainCorpus``: captioned images that
    ``pretrain_clip`` can train the study's own CLIP on; None if the dataset offers none."""
    sae_train_split: str | None = None
    """Split of the ID training distribution the SAE trains on (more images than the
    fine-tuning split); None: ``train_split``."""
    sae_heldout_split: str | None = None
    """ID split the SAE's FVU and dead latents are measured on; None: ``heldout_split``."""
    pretrain_split: str | None = None
    """The pretraining corpus as a cacheable split (``sae.data: pretrain``); None if none."""

    @property
    def splits(self) -> tuple[str, ...]:
        """Every split the pipeline may cache or evaluate."""
        optional = (self.sae_train_split, self.sae_heldout_split, self.pretrain_split)
        return tuple(dict.fromkeys((self.train_split, self.heldout_split, self.id_eval, *self.ood_evals,
                                    *(split for split in optional if split))))

    def sae_splits(self, data: str = "id") -> tuple[str, str]:
        """(training, held-out) splits of the SAE: ``data`` 'id' draws both from the ID training
        distribution; 'pretrain' trains on the pretraining corpus (every domain it saw)."""
        heldout = self.sae_heldout_split or self.heldout_split
        if data == "pretrain":
            if self.pretrain_split is None:
                raise ValueError(f"sae.data: dataset {self.name!r} has no pretraining corpus to train the SAE on; use 'id'")
            return self.pretrain_split, heldout
        return self.sae_train_split or self.train_split, heldout

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """ID evaluation first, then the shifts."""
        return (self.id_eval, *self.ood_evals)

    @property
    def val_split(self) -> str | None:
        """The ID validation split that variants are selected on: the held-out split, unless it is
        also an eval split (ImageNet's val is its ID test), when there is none: selecting on it
        would peek at the test."""
        return self.heldout_split if self.heldout_split not in self.eval_splits else None

    @property
    def scored_splits(self) -> tuple[str, ...]:
        """What an evaluation scores: the eval splits, then the ID validation split (if any)."""
        return (*self.eval_splits, self.val_split) if self.val_split else self.eval_splits

    @property
    def on_disk(self) -> bool:
        """Whether the dataset is read from ``data_root`` (and so needs check_dataset)."""
        return self.reader is not None

    def role(self, split: str) -> str:
        """'id' for the ID evaluation split, 'ood' for a shift, 'val' for the ID validation split,
        'train' otherwise."""
        if split == self.id_eval:
            return "id"
        if split == self.val_split:
            return "val"
        return "ood" if split in self.ood_evals else "train"

    def evalset(self, split: str) -> EvalSet:
        """The scoring hooks of evaluation split ``split``."""
        return self.evalsets.get(split, EvalSet(metric=self.metric))

    def evalset_classnames(self, split: str) -> tuple[str, ...]:
        """Class names of ``split`` as the evaluator reports them (after a sub-list or projection)."""
        hooks = self.evalset(split)
        if hooks.classnames is not None:
            return hooks.classnames
        if hooks.class_subset is not None:
            return tuple(self.classnames[i] for i in hooks.class_subset)
        return self.classnames

    def prompts(self, classname: str) -> list[str]:
        """Every prompt of one class."""
        return [fill_template(t, classname) for t in self.templates]

    def options(self, data: dict[str, Any] | None) -> Any:
        """The loader's options from the config mapping that the rule passes."""
        if self.options_type is None:
            return data
        return self.options_type(data or {})

    def _require_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"dataset {self.name!r} has no split {split!r}; splits: {', '.join(self.splits)}")

    def read(self, split: str, options: RealDataOptions) -> Samples:
        """The samples of ``split`` on disk (datasets under ``data_root`` only)."""
        self._require_split(split)
        if self.reader is None:
            raise ValueError(f"dataset {self.name!r} is not read from data_root")
        return self.reader(split, options)

    def check(self, split: str, options: RealDataOptions) -> dict[str, Any]:
        """Verify the layout of ``split`` and its image count (the config's
        ``expected_images`` or the release's); returns what was found, for the check marker.
        Raises :class:`~saeft.data.samples.DatasetLayoutError` naming the path and what is missing."""
        found = self.read(split, options)
        expected = options.expected_images.get(split, self.expected_images.get(split))
        samples.check_count(found, expected, split)
        if options.verify_images and found.files is not None:
            bad = samples.undecodable(found.files)
            if bad:
                raise samples.DatasetLayoutError(f"{self.name}/{split}: image files that do not decode: " + "; ".join(bad))
        n_classes = len(self.evalset_classnames(split))
        counts = found.class_counts(n_classes)
        return {"dataset": self.name, "split": split, "source": found.source, "images": len(found),
                "expected_images": expected, "classes": n_classes, "classes_present": int((counts > 0).sum())}

    def load(self, split: str, transform: Callable[[Image.Image], torch.Tensor], options: Any) -> torch.utils.data.Dataset:
        """The split as a Dataset of (transformed image, label); an FMoW-like split also carries
        ``groups`` and ``group_names`` (per-sample region)."""
        self._require_split(split)
        if self.reader is not None:
            from saeft.data.arrays import samples_dataset

            found = self.reader(split, options)
            logger.info("read %d images of %s/%s from %s", len(found), self.name, split, found.source)
            return samples_dataset(found, transform)
        assert self.loader is not None
        return self.loader(split, transform, options)


def _load_shapes(split: str, transform: Callable[[Image.Image], torch.Tensor], options: synthetic.WorldConfig) -> torch.utils.data.Dataset:
    from saeft.data.arrays import ArrayImageDataset
    from saeft.data.image_cache import cached_split

    images, labels = cached_split("shapes", split, options, synthetic.render_split, synthetic)
    logger.info("rendered %d images of shapes/%s", len(labels), split)
    return ArrayImageDataset(images, labels, transform)


REGISTRY: dict[str, DatasetSpec] = {
    "shapes": DatasetSpec(
        name="shapes",
        classnames=synthetic.CLASSNAMES,
        templates=synthetic.PROMPT_TEMPLATES,
        train_split="train",
        heldout_split="val",
        id_eval="test",
        ood_evals=("resampled", "sketch", "rendition", "hard"),
        loader=_load_shapes,
        options_type=lambda data: synthetic.WorldConfig.from_dict(data, "synthetic."),
        sae_train_split="sae_train",
        sae_heldout_split="sae_heldout",
        pretrain_split="pretrain",
        pretrain_corpus=synthetic.pretrain_corpus,
    ),
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        classnames=fashion_mnist.CLASSNAMES,
        templates=fashion_mnist.PROMPT_TEMPLATES,
        train_split="train",
        heldout_split="val",
        id_eval="test",
        ood_evals=fashion_mnist.SHIFT_SPLITS,
        loader=fashion_mnist.load_split,
        options_type=fashion_mnist.options,
        pretrain_corpus=fashion_mnist.pretrain_corpus,
        sae_train_split="sae_train",
        sae_heldout_split="sae_heldout",
        pretrain_split="pretrain",
    ),
}


PHOTO_TEMPLATES = ("a photo of {a_c}.", "a blurry photo of {a_c}.", "a low resolution photo of {a_c}.",
                   "a photo of the {c}.", "a close-up photo of {a_c}.", "a photo of the small {c}.")
"""saeft's prompts for the small photo datasets (CIFAR, STL-10)."""
DTD_TEMPLATES = ("a photo of a {c} texture.", "a photo of a {c} pattern.", "a photo of a {c} thing.",
                 "a photo of a {c} object.")
EUROSAT_TEMPLATES = ("a centered satellite photo of {c}.", "a satellite photo of {c}.", "an aerial photo of {c}.")


def _imagenet_spec() -> DatasetSpec:
    names = imagenet.classnames()
    objectnet_folders, objectnet_names, objectnet_groups = imagenet.objectnet_mapping()
    return DatasetSpec(
        name="imagenet", classnames=names, templates=imagenet.templates(),
        train_split="train", heldout_split="val", id_eval="val",
        ood_evals=("imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a", "objectnet"),
        reader=imagenet.read_split, options_type=samples.options_from,
        evalsets={
            "imagenet_r": EvalSet(class_subset=imagenet.class_sublist("imagenet_r")),
            "imagenet_a": EvalSet(class_subset=imagenet.class_sublist("imagenet_a")),
            "objectnet": EvalSet(projection=objectnet_groups, classnames=objectnet_names),
        },
        expected_images=imagenet.EXPECTED_IMAGES,
        layout=", ".join(f"{split}: {folder}/" for split, folder in imagenet.FOLDERS.items()),
    )


def _small_spec(name: str, classnames: Sequence[str], templates: Sequence[str], reader: Callable[[str, RealDataOptions], Samples],
                train: str = "train", heldout: str = "test", ood: tuple[str, ...] = ()) -> DatasetSpec:
    return DatasetSpec(
        name=name, classnames=tuple(c.replace("_", " ") for c in classnames), templates=tuple(templates),
        train_split=train, heldout_split=heldout, id_eval="test", ood_evals=ood,
        reader=reader, options_type=samples.options_from,
        expected_images=smallsets.EXPECTED_IMAGES[name],
        layout=smallsets.PATHS[name] + "/" + "".join(f", {split}: {smallsets.PATHS[split]}/" for split in ood),
    )


def _register_real() -> None:
    REGISTRY["imagenet"] = _imagenet_spec()
    REGISTRY["iwildcam"] = DatasetSpec(
        name="iwildcam", classnames=wilds.iwildcam_classnames(), templates=tuple(_reference_templates("iwildcam")),
        train_split="train", heldout_split="id_val", id_eval="id_test", ood_evals=("test",), metric="macro_f1",
        reader=wilds.read_iwildcam, options_type=samples.options_from, expected_images=wilds.IWILDCAM_EXPECTED,
        layout=f"{wilds.IWILDCAM_DIR}/metadata.csv, {wilds.IWILDCAM_DIR}/train/<filename>",
    )
    REGISTRY["fmow"] = DatasetSpec(
        name="fmow", classnames=wilds.fmow_classnames(), templates=tuple(_reference_templates("fmow")),
        train_split="train", heldout_split="id_val", id_eval="id_test", ood_evals=("test",), metric="worst_region_acc",
        reader=wilds.read_fmow, options_type=samples.options_from, expected_images=wilds.FMOW_EXPECTED,
        layout=f"{wilds.FMOW_DIR}/rgb_metadata.csv, {wilds.FMOW_DIR}/country_code_mapping.csv, {wilds.FMOW_DIR}/images/rgb_img_<row>.png",
    )
    REGISTRY["cifar10"] = _small_spec("cifar10", smallsets.CIFAR10_CLASSES, PHOTO_TEMPLATES,
                                      lambda split, o: smallsets.read_cifar("cifar10", split, o), ood=("cifar10_1", "cifar10_2"))
    REGISTRY["cifar100"] = _small_spec("cifar100", smallsets.CIFAR100_CLASSES, PHOTO_TEMPLATES,
                                       lambda split, o: smallsets.read_cifar("cifar100", split, o))
    REGISTRY["stl10"] = _small_spec("stl10", smallsets.STL10_CLASSES, PHOTO_TEMPLATES, smallsets.read_stl10)
    REGISTRY["dtd"] = _small_spec("dtd", smallsets.DTD_CLASSES, DTD_TEMPLATES, smallsets.read_dtd, heldout="val")
    REGISTRY["eurosat"] = _small_spec("eurosat", smallsets.EUROSAT_CLASSES, EUROSAT_TEMPLATES, smallsets.read_eurosat)


def _reference_templates(name: str) -> list[str]:
    import json

    return json.loads((imagenet.REFERENCE / "prompt_templates.json").read_text())[name]


_register_real()


def get_dataset(name: str, options: Any = None) -> DatasetSpec:
    """The registered dataset ``name``; the error lists the known ones. With the loader
    ``options`` of a dataset on disk that set a class subset, an image cap or a template count
    (``data.<dataset>``), the dataset as reduced by them (:func:`saeft.data.subset.restrict`)."""
    try:
        spec = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; registered: {', '.join(sorted(REGISTRY))}") from None
    if isinstance(options, RealDataOptions) and options.reduced:
        return subset.restrict(spec, options)
    return spec


def dataset_names() -> Sequence[str]:
    """Names of every registered dataset."""
    return sorted(REGISTRY)
