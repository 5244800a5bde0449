"""``ldifs``: ``lambda *`` the mean over tapped blocks of the squared distance between the
L2-normalised token features of the tuned and the frozen zero-shot visual tower (channels of a
feature map, or a transformer block's token vectors)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

from saeft.config import ConfigError, NonNegFloat, Schema
from saeft.methods.registry import register
from saeft.methods.base import Method, MethodParams, penalty_weight

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclasses.dataclass
class LdifsParams(MethodParams):
    """LDIFS's hyper-parameters (config key ``methods.ldifs``)."""

    section = "methods.ldifs"
    lam: NonNegFloat = penalty_weight(10.0)
    """Weight of the regulariser R in CE + lambda * R."""
    taps: Annotated[list[Annotated[str, Schema(min_length=1)]], Schema(min_items=1)] | None = None
    """Modules of the visual tower whose outputs are compared (e.g. transformer.resblocks.3,
    layer2); null: every block."""


def ldifs_distance(taps_theta: Sequence[torch.Tensor], taps_0: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over taps of the per-token squared distance of L2-normalised features, averaged over
    batch and tokens. A 4-d tap (B, C, H, W) has its tokens at the spatial positions and its
    features on channels; any other tap has its features on the last dimension."""
    import torch
    import torch.nn.functional as F

    total = []
    for a, b in zip(taps_theta, taps_0, strict=True):
        dim = 1 if a.ndim == 4 else -1
        diff = F.normalize(a.float(), dim=dim) - F.normalize(b.float(), dim=dim)
        total.append(diff.pow(2).sum(dim).mean())
    return torch.stack(total).mean()


def default_taps(visual: nn.Module) -> list[str]:
    """Every block of the visual tower: transformer resblocks (ViT) or ResNet stages."""
    names = dict(visual.named_modules())
    if "transformer.resblocks" in names:
        return [f"transformer.resblocks.{i}" for i in range(len(names["transformer.resblocks"]))]
    stages = [n for n in ("layer1", "layer2", "layer3", "layer4") if n in names]
    if not stages:
        raise ConfigError("methods.ldifs.taps: no default blocks for this visual tower; name modules explicitly")
    return stages


class TapRecorder:
    """Forward hooks that keep the outputs of named modules of the last forward pass."""

    def __init__(self, module: nn.Module, names: Sequence[str]) -> None:
        modules = dict(module.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(f"methods.ldifs.taps: no module(s) {missing} in the visual tower")
        self.names = list(names)
        self.outputs: dict[str, torch.Tensor] = {}
        for name in names:
            modules[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Any:
        def keep(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.outputs[name] = output[0] if isinstance(output, tuple) else output
        return keep

    def taken(self) -> list[torch.Tensor]:
        return [self.outputs[n] for n in self.names]


def setup(ctx: Any) -> None:
    """Taps on the same blocks of the tuned tower and of its frozen copy."""
    names = ctx.params.taps or default_taps(ctx.visual)
    ctx.state["taps"], ctx.state["teacher_taps"] = TapRecorder(ctx.visual, names), TapRecorder(ctx.teacher, names)


def penalty(ctx: Any, batch: Any) -> dict[str, torch.Tensor]:
    """R: the frozen copy runs on the batch, then the distance of the two towers' taps."""
    import torch

    with torch.no_grad():
        ctx.teacher(batch.images)
    return {"total": ldifs_distance(ctx.state["taps"].taken(), ctx.state["teacher_taps"].taken())}


METHOD = register(Method(name="ldifs", label="LDIFS", params=LdifsParams, needs=frozenset({"encoder_copy"}),
                         setup=setup, penalty=penalty,
                         summary="LDIFS: lambda * distance of L2-normalised block features"))
