"""The ``finetune`` section and a fine-tuning job's config: the shared keys plus the method, its
parameters (checked by the method's own dataclass in the registry) and the seed. Imports no torch;
apart from :mod:`saeft.config.stages` so that the SAE and model code below the methods never
imports the registry (no import cycle)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from saeft.config.base import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Schema, require
from saeft.config.stages import ViewConfig

RUN_KEYS = ("lr", "epochs", "warmup_steps", "weight_decay", "batch_size", "label_smoothing")
"""``finetune`` keys that a trained method's grid or named variant may set (``methods.<m>.grid``,
``methods.<m>.variants``): the optimisation regime of one run, overriding the ``finetune`` section
for that variant alone. The other keys stay study-wide: the view keys define the teacher caches
every method shares, and the teacher, precision, compile, workers, batchnorm and grad_clip keys
say how jobs run rather than what a variant is."""


def split_run_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(finetune overrides, method parameters) of a variant's parameters: its :data:`RUN_KEYS`,
    which override ``finetune`` in its jobs' config, and the rest, which the method's dataclass
    checks (and would refuse a finetune key). Plain Python: the workflow calls it while it plans."""
    overrides = {key: value for key, value in params.items() if key in RUN_KEYS}
    own = {key: value for key, value in params.items() if key not in RUN_KEYS}
    return overrides, own


@dataclasses.dataclass
class FinetuneConfig(ViewConfig):
    """Fine-tuning (config key ``finetune``; a job adds the method, its parameters and the seed)."""

    section = "finetune"
    epochs: PositiveInt = 10
    """Passes over the training split; the cosine schedule spans exactly these epochs (plus
    the probing epochs of lpft with probe: epochs)."""
    batch_size: PositiveInt = 32
    """Images per step."""
    lr: PositiveFloat = 1e-5
    """Peak AdamW learning rate."""
    weight_decay: NonNegFloat = 0.1
    """AdamW weight decay."""
    warmup_steps: NonNegInt = 500
    """Linear warm-up steps before the cosine decay."""
    grad_clip: NonNegFloat = 1.0
    """Gradient-norm clipping threshold (0 disables clipping)."""
    label_smoothing: Annotated[float, Schema(minimum=0, exclusive_maximum=1)] = 0.0
    """Label smoothing of the cross-entropy."""
    teacher: Literal["auto", "cache", "live"] = "auto"
    """Where f_0 comes from: cache (the HDF5 teacher cache of the training views, required), live
    (a frozen copy of the encoder each step) or auto (the cache when one is given)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast on GPU (auto: bf16); CPU always runs fp32."""
    compile: bool = False
    """torch.compile the loss computation."""
    workers: NonNegInt = 0
    """Data loader worker processes."""
    batchnorm: Literal["frozen", "train"] = "frozen"
    """BatchNorm layers (ResNet towers) while training, for every method: frozen keeps them in eval
    mode (zero-shot running statistics, never updated; affine weights still train), so the tuned
    embedding equals the teacher's at step 0; train uses batch statistics and updates the running
    statistics (SyncBatchNorm under multi-GPU DDP). No effect on towers without BatchNorm (ViT)."""
    method: str = dataclasses.field(default="ft", metadata={"config": False})
    """The method a job trains (a name in the method registry)."""
    method_params: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={"config": False})
    """The method's own hyper-parameters (``methods.<method>``); missing ones take defaults."""
    seed: NonNegInt = dataclasses.field(default=0, metadata={"config": False})
    """Seed of data order and any randomness in training."""

    def validate(self) -> None:
        from saeft.methods import get_method

        method = get_method(self.method)
        params = method.params.from_dict(self.method_params, f"methods.{self.method}.")
        self.method_params = params.to_dict()
        require(not (self.teacher == "cache" and not (self.deterministic or self.banked)), "finetune.teacher",
                "'cache' needs views a cache can hold: set finetune.views >= 1 (a bank of views) or "
                "finetune.augment: none, or use teacher: live")

    @property
    def params(self) -> Any:
        """The method's hyper-parameters as its dataclass."""
        from saeft.methods import get_method

        return get_method(self.method).params.from_dict(self.method_params, f"methods.{self.method}.")

    @property
    def total_epochs(self) -> int:
        """Epochs of the whole run: ``epochs`` plus what the method adds (its ``extra_epochs``
        hook: the probing epochs of lpft with ``probe: epochs``)."""
        from saeft.methods import get_method

        return get_method(self.method).epochs(self.params, self.epochs)

    @property
    def view_config(self) -> ViewConfig:
        """The training views these keys define."""
        return ViewConfig(augment=self.augment, views=self.views, view_seed=self.view_seed, crop_scale=self.crop_scale)
