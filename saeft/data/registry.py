"""The dataset registry: what each dataset offers the stages, and how to load its splits.

A dataset declares its class names, prompt templates, splits (which one trains, which is held out,
which is the ID evaluation, which are the shifts) and its metric. Stages ask the registry for a
split and get a ``torch.utils.data.Dataset`` of ``(image tensor, label)``. The registry imports
no torch itself, so the Snakefile can read it and dry runs stay fast.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from saeft.data import fashion_mnist, synthetic

if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a dataset declares to the pipeline."""

    name: str
    """Registry key, used in paths and config."""
    classnames: tuple[str, ...]
    """Class names in label order, as they appear in prompts."""
    templates: tuple[str, ...]
    """Zero-shot prompt templates; ``{c}`` is replaced by the class name."""
    train_split: str
    """Split used for fine-tuning and SAE training."""
    heldout_split: str
    """Split held out for SAE metrics and model selection."""
    id_eval: str
    """In-distribution evaluation split."""
    ood_evals: tuple[str, ...]
    """Distribution-shift evaluation splits."""
    metric: str = "top1"
    """Metric reported for every evaluation split."""
    loader: Callable[..., "torch.utils.data.Dataset"] | None = None
    """``loader(split, transform, options) -> Dataset``."""
    options_type: Callable[..., Any] | None = None
    """Builds the loader's options from the dataset's config mapping (validated)."""
    pretrain_corpus: Callable[[Any], Any] | None = None
    """``pretrain_corpus(options) -> saeft.data.corpus.PretrainCorpus``: captioned images that
    ``pretrain_clip`` can train the study's own CLIP on; None if the dataset offers none."""

    @property
    def splits(self) -> tuple[str, ...]:
        """Every split the pipeline may cache or evaluate."""
        return (self.train_split, self.heldout_split, self.id_eval, *self.ood_evals)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """ID evaluation first, then the shifts."""
        return (self.id_eval, *self.ood_evals)

    def role(self, split: str) -> str:
        """'id' for the ID evaluation split, 'ood' for a shift, 'train' otherwise."""
        if split == self.id_eval:
            return "id"
        return "ood" if split in self.ood_evals else "train"

    def options(self, data: dict[str, Any] | None) -> Any:
        """The loader's options from the config mapping that the rule passes."""
        if self.options_type is None:
            return data
        return self.options_type(data or {})

    def load(self, split: str, transform: Callable[[Image.Image], torch.Tensor], options: Any) -> torch.utils.data.Dataset:
        """The split as a Dataset of (transformed image, label)."""
        if split not in self.splits:
            raise ValueError(f"dataset {self.name!r} has no split {split!r}; splits: {', '.join(self.splits)}")
        assert self.loader is not None
        return self.loader(split, transform, options)


def _load_shapes(split: str, transform: Callable[[Image.Image], torch.Tensor], options: synthetic.WorldConfig) -> torch.utils.data.Dataset:
    from saeft.data.arrays import ArrayImageDataset

    images, labels = synthetic.render_split(options, split)
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
    ),
}


def get_dataset(name: str) -> DatasetSpec:
    """The registered dataset ``name``; the error lists the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; registered: {', '.join(sorted(REGISTRY))}") from None


def dataset_names() -> Sequence[str]:
    """Names of every registered dataset."""
    return sorted(REGISTRY)
