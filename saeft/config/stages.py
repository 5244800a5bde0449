"""The config section of every stage: one dataclass each, the single definition of its keys,
defaults and checks (field types carry the bounds; ``validate`` the checks across keys).

Imports no torch: the workflow builds the study schema from these while it plans, and each stage
module imports its own config from here."""

from __future__ import annotations

import dataclasses
import os
from typing import Annotated, Any, Literal

from saeft.config.base import (
    Fraction,
    NonNegFloat,
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    Schema,
    StageConfig,
    require,
)

Name = Annotated[str, Schema(pattern="^[A-Za-z0-9_.-]+$")]


@dataclasses.dataclass
class ModelConfig(StageConfig):
    """The CLIP model (config key ``model``)."""

    section = "model"
    name: Name = "saeft-vit-p4"
    """open_clip architecture (saeft registers its own from saeft/assets/*.json)."""
    pretrained: str | None = "pretrain_clip"
    """'pretrain_clip' (the pipeline pretrains the model itself on the corpus of pretrain.dataset),
    an open_clip pretrained tag (e.g. openai), or a path to a local checkpoint (.safetensors, or
    .pt/.pth/.bin read with weights_only=True)."""


CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
PRETRAIN_SOURCE = "pretrain_clip"
"""The ``model.pretrained`` value meaning: weights come from the pipeline's own pretrain_clip rule."""


def pretrained_kind(pretrained: str | None) -> str:
    """Classify a ``model.pretrained`` value: 'pipeline', 'file', 'tag' or 'none'."""
    if pretrained is None:
        return "none"
    if pretrained == PRETRAIN_SOURCE:
        return "pipeline"
    if pretrained.endswith(CHECKPOINT_SUFFIXES) or os.sep in pretrained:
        return "file"
    return "tag"


@dataclasses.dataclass
class PretrainConfig(StageConfig):
    """Contrastive pretraining by rule pretrain_clip (only when model.pretrained is
    'pretrain_clip'; config key ``pretrain``)."""

    section = "pretrain"
    steps: PositiveInt = 600
    """Optimizer steps. Each batch holds one image of every (class, domain) pair, so no two
    captions in a batch say the same thing (duplicates would be false negatives)."""
    domains_per_class: PositiveInt | None = None
    """Images of each class in a batch, each of another domain drawn at random (at most the
    corpus's domains); null: one of every domain. Fewer make the batch contrast classes more than
    styles (with 1, no caption in a batch shares its class with another)."""
    shared_domains: bool = False
    """With ``domains_per_class``: draw the domains once per batch, the same for every class, so
    that the captions of a batch differ by class, never by style alone (with 1, a batch is of one
    style, and telling styles apart never helps to match a caption)."""
    multi_positive: bool = False
    """Match each image with every caption of its batch that describes it, and each caption with
    every image it describes, instead of its own pair alone: a caption that names no style (the
    shapes world's ``synthetic.styleless_captions``) then makes the images of its class in every
    domain positives, not false negatives. False: open_clip's ClipLoss."""
    lr: PositiveFloat = 1e-3
    """Peak AdamW learning rate."""
    weight_decay: NonNegFloat = 0.1
    """AdamW weight decay."""
    warmup_steps: NonNegInt = 50
    """Linear warm-up steps before the cosine decay."""
    seed: NonNegInt = 0
    """Seed of initialisation, batch composition and caption choice."""
    checkpoint_every: PositiveInt = 200
    """Steps between resumable checkpoints (kept beside the output, removed at the end)."""
    dataset: str = "shapes"
    """Registered dataset whose captioned pretraining corpus is used (its config section gives
    its options)."""
    threads: PositiveInt = 1
    """CPU threads the pretraining runs on, even where ``--cores`` gives its job fewer or more:
    the thread count changes the order of sums and so the weights (docs/reproducibility.md), and
    a study's calibration is of one model. Two threads are about 20% faster than one here."""
    min_zeroshot_acc: Fraction = 0.5
    """The gate: prepare_model refuses the pretrained model when its zero-shot top-1 on the
    dataset's ID held-out split (quality.json) is below this. Not a training key: changing it
    never reruns the pretraining."""

    def validate(self) -> None:
        from saeft.data.registry import REGISTRY

        corpora = sorted(name for name, spec in REGISTRY.items() if spec.pretrain_corpus is not None)
        require(self.dataset in corpora, "pretrain.dataset",
                f"{self.dataset!r} offers no pretraining corpus; datasets that do: {', '.join(corpora)}")
        require(not self.shared_domains or self.domains_per_class is not None, "pretrain.shared_domains",
                "true needs pretrain.domains_per_class (the domains a batch shares)")


@dataclasses.dataclass
class CacheConfig(StageConfig):
    """Embedding cache settings (config key ``cache``)."""

    section = "cache"
    batch_size: PositiveInt = 256
    """Images per forward pass."""
    workers: NonNegInt = 0
    """DataLoader worker processes (0: load in the main process)."""


SaeArchitecture = Literal["topk", "batchtopk"]
SaeNormalize = Literal["l2", "none"]
BPreInit = Literal["mean", "median", "zero"]
LrDecay = Literal["cosine", "none"]
SaeData = Literal["id", "pretrain"]


def _sweep_schema() -> dict[str, Any]:
    """``sae.sweep``: entries of overrides on the other ``sae`` keys, each with a name."""
    from saeft.config.base import schema_of

    entry = schema_of(SAETrainConfig, defaults=False, exclude=("sweep",))
    entry["properties"]["name"] = {"type": "string", "pattern": "^[a-z0-9_]+$", "description": "the SAE's name (methods pick it with 'sae')"}
    entry["required"] = ["name"]
    entry.pop("description", None)
    return {"type": "array", "items": entry}


@dataclasses.dataclass
class SAETrainConfig(StageConfig):
    """The sparse autoencoder trained per dataset (config key ``sae``); ``sweep`` entries train
    further SAEs with some keys changed."""

    section = "sae"
    expansion: PositiveInt = 4
    """Dictionary size as a multiple of the embedding dim: n_features = expansion * d."""
    k: PositiveInt = 32
    """Active features per embedding (Top-K), or on average (Batch-Top-K)."""
    architecture: SaeArchitecture = "topk"
    """topk (k per sample) or batchtopk (k x batch over the batch; a learned threshold at
    inference)."""
    normalize: SaeNormalize = "l2"
    """Input normalisation before the SAE: l2 (unit-norm embeddings) or none."""
    relu: bool = False
    """Apply a ReLU to the kept pre-activations (non-negative codes)."""
    encoder_bias: bool = False
    """Learn an encoder bias b_enc (otherwise it stays zero)."""
    b_pre_init: BPreInit = "mean"
    """Initial pre-encoder bias: mean or median (geometric) of the training embeddings, or zero."""
    tied_init: bool = True
    """Start the encoder as the transpose of the (random, unit-norm) decoder."""
    encoder_init_norm: PositiveFloat = 1.0
    """Norm of each encoder row at initialisation under tied_init (decoder columns have norm 1).
    sparsify's nn.Linear init gives rows of norm about 1/sqrt(3) = 0.577, which learns faster in
    the first steps on bench/sae_train.py's synthetic data; 1.0 left fewer latents dead on the
    default study's embeddings (7% against 47% at 0.5)."""
    epochs: PositiveInt = 20
    """Passes over the training embeddings."""
    batch_size: PositiveInt = 256
    """Embeddings per optimiser step."""
    lr: PositiveFloat = 1e-3
    """AdamW peak learning rate."""
    weight_decay: NonNegFloat = 0.0
    """AdamW decoupled weight decay."""
    warmup_steps: NonNegInt = 20
    """Steps of linear learning-rate warm-up."""
    lr_decay: LrDecay = "cosine"
    """Learning rate after warm-up: cosine decay to zero at the last step, or none."""
    auxk_alpha: NonNegFloat = 1 / 32
    """Weight of the AuxK loss on dead latents (0 disables it)."""
    aux_k: NonNegInt = 0
    """Dead latents each sample uses in the AuxK loss; 0 means half the embedding dim."""
    dead_after: NonNegInt = 0
    """A latent that has not fired on this many consecutive training samples counts as dead (and
    feeds the AuxK loss); 0: one epoch of the training embeddings."""
    data: SaeData = "id"
    """What the SAE trains on: id (embeddings of the dataset's ID training distribution, its SAE
    split) or pretrain (the pretraining corpus, which also covers the shifted domains)."""
    shuffle_buffer: PositiveInt = 65536
    """Rows read (whole HDF5 chunks, in random chunk order) and shuffled in memory at a time."""
    seed: NonNegInt = 0
    """Seed of the initialisation and the shuffling (training is deterministic on CPU)."""
    sweep: list[dict[str, Any]] = dataclasses.field(default_factory=list, metadata={"schema": _sweep_schema})
    """Further SAEs per dataset, each a name and overrides of the keys above (rule train_sae_sweep)."""

    def validate(self) -> None:
        names = [entry.get("name") for entry in self.sweep]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        require(not duplicates, "sae.sweep", f"duplicate sweep name(s) {', '.join(map(str, duplicates))}")

    def training_keys(self) -> dict[str, Any]:
        """The keys that train this SAE (the sweep is its own rule's)."""
        return {key: value for key, value in self.to_dict().items() if key != "sweep"}

    def sweep_configs(self) -> dict[str, SAETrainConfig]:
        """The SAEs of the sweep by name: each entry's overrides on the other keys."""
        base = self.training_keys()
        return {entry["name"]: SAETrainConfig.from_dict({**base, **{k: v for k, v in entry.items() if k != "name"}},
                                                        f"sae.sweep.{i}.")
                for i, entry in enumerate(self.sweep)}


Augment = Literal["none", "crop_flip"]
VIEW_KEYS = ("augment", "views", "view_seed", "crop_scale")
"""The ``finetune`` keys that define the training views (and so the views cache)."""


@dataclasses.dataclass
class ViewConfig(StageConfig):
    """Training views (config keys ``finetune.augment``, ``views``, ``view_seed``, ``crop_scale``)."""

    section = "finetune"
    augment: Augment = "none"
    """Training views: none (the evaluation preprocessing, deterministic) or crop_flip (a seeded
    random-resized crop and horizontal flip, then the evaluation preprocessing)."""
    views: NonNegInt = 0
    """With augment: a bank of this many views per image, drawn once and shared by every method
    and seed, whose f_0 the rule cache_views embeds once; 0: a fresh view every epoch (the teacher
    runs live)."""
    view_seed: NonNegInt = 0
    """Seed of the bank's crop and flip parameters."""
    crop_scale: Annotated[float, Schema(exclusive_minimum=0, maximum=1)] = 0.5
    """Smallest crop area of a view, as a fraction of the image."""

    @property
    def deterministic(self) -> bool:
        """Every epoch sees the same view of an image (the plain embedding cache is its teacher)."""
        return self.augment == "none"

    @property
    def banked(self) -> bool:
        """Views come from a finite bank that a views cache can hold."""
        return self.augment != "none" and self.views >= 1

    @classmethod
    def of(cls, finetune: dict[str, Any]) -> ViewConfig:
        """The view keys of a ``finetune`` mapping (other keys ignored)."""
        return cls.from_dict({k: finetune[k] for k in VIEW_KEYS if k in finetune}, "finetune.")


@dataclasses.dataclass
class EvaluateConfig(StageConfig):
    """Evaluation settings (config key ``evaluate``)."""

    section = "evaluate"
    batch_size: PositiveInt = 256
    """Images per forward pass (on the GPU if there is one)."""
    workers: NonNegInt = 0
    """DataLoader worker processes decoding images (0: in the main process)."""


@dataclasses.dataclass
class CardsConfig(StageConfig):
    """Feature cards per dataset and method (config key ``analysis.cards``)."""

    section = "analysis.cards"
    features: PositiveInt = 3
    """Cards per method and direction: the most often added and the most often removed features."""
    images: PositiveInt = 8
    """Top-activating eval images per card."""
    thumbnail: Annotated[int, Schema(minimum=8)] = 64
    """Side in pixels of each image in a card."""


@dataclasses.dataclass
class SelectionConfig(StageConfig):
    """Which variant of a method with several (a grid or named variants) the tables report:
    the best on ID validation, the dataset's held-out ID split in its own metric (config key
    ``selection``; rule select_variants)."""

    section = "selection"
    seeds: Annotated[list[NonNegInt], Schema(min_items=1, unique_items=True)] | None = None
    """Seeds every variant is trained and evaluated on; the selection takes the mean over them,
    and the selected variant then runs on every other seed of ``seeds`` (a grid costs variants x
    these seeds, not variants x seeds). null: the first of ``seeds``."""
    oracle: bool = True
    """Also report the OOD-oracle choice (best OOD average): an upper bound that peeks at the
    shifts, labelled so, never the reported variant."""
    rule: Literal["best", "one_se"] = "best"
    """How the ID validation scores choose: best (the highest mean; ties to the first listed) or
    one_se (the first listed variant whose mean is within one standard error of the best's: the
    binomial SE over its validation images, plus its spread over seeds with two or more). With
    one_se, list the most conservative value first (grid order: e.g. the smallest lr)."""


@dataclasses.dataclass
class AnalysisConfig(StageConfig):
    """What fine-tuning added to and removed from the embeddings, in zero-shot SAE features
    (config key ``analysis``; rules analyze_features, plot_feature_cards, aggregate_features)."""

    section = "analysis"
    enabled: bool = True
    """Run the feature analysis of every fine-tuned model (and WiSE-FT at the reported alpha)."""
    variants: bool = True
    """Also analyse every variant of a gridded method on the selection seeds, not only the
    reported runs (one job per variant and seed)."""
    batch_size: PositiveInt = 256
    """Images per forward pass of the fine-tuned model (on the GPU if there is one)."""
    workers: NonNegInt = 0
    """DataLoader worker processes decoding images (0: in the main process)."""
    top_features: PositiveInt = 10
    """Most often added and most often removed features listed per eval set, class and method."""
    cards: CardsConfig = dataclasses.field(default_factory=CardsConfig)
    """Feature cards per dataset and method."""
