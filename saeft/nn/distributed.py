"""Several processes (``torchrun``, ``WORLD_SIZE`` > 1) training one model with torch DDP on the
same global batches as one process: every rank draws the same batch order and takes its share of
each batch (:class:`RankShare`), its loss is weighted by its share so that the all-reduced gradient
is that of the global batch mean, and with ``batchnorm: train`` BatchNorm is synchronised on GPU
(SyncBatchNorm: the statistics of the global batch; frozen BatchNorm needs no synchronisation)."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from torch import nn

from saeft.config import ConfigError
from saeft.config.finetune import FinetuneConfig
from saeft.methods import get_method

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Distributed:
    """This process's place in a DDP run (``torchrun`` sets the environment)."""

    rank: int = 0
    """Global rank; rank 0 writes outputs and checkpoints."""
    local_rank: int = 0
    """Rank on this node: the GPU index among the visible ones."""
    world: int = 1
    """Number of processes."""

    @classmethod
    def from_env(cls) -> Distributed:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    @property
    def main(self) -> bool:
        return self.rank == 0


def distributed_setup(cfg: FinetuneConfig, dist_info: Distributed) -> torch.device:
    """The device of this process, with the process group up when there are several."""
    cuda = torch.cuda.is_available()
    if dist_info.world == 1:
        return torch.device("cuda" if cuda else "cpu")
    if not get_method(cfg.method).ddp:
        raise ConfigError(f"methods.{cfg.method}: multi-process (DDP) training is not supported; run it on one GPU")
    if cfg.compile:
        raise ConfigError("finetune.compile: not supported with multi-process (DDP) training")
    import torch.distributed as dist

    if cuda:
        torch.cuda.set_device(dist_info.local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    logger.info("DDP rank %d of %d (%s)", dist_info.rank, dist_info.world, "nccl" if cuda else "gloo")
    return torch.device(f"cuda:{dist_info.local_rank}") if cuda else torch.device("cpu")


def distributed_teardown() -> None:
    """Wait for every rank, then take the process group down."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


class RankShare(torch.utils.data.Sampler):
    """Each global batch of ``batches``, cut into ``world`` contiguous parts; yields part ``rank``."""

    def __init__(self, batches: torch.utils.data.BatchSampler, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        for batch in self.batches:
            size = len(batch)
            start, stop = self.rank * size // self.world, (self.rank + 1) * size // self.world
            yield batch[start:stop]


def global_share(n_local: int, world: int, device: torch.device) -> float:
    """This rank's fraction of the global batch (the last batch may split unevenly)."""
    import torch.distributed as dist

    n = torch.tensor([float(n_local)], device=device)
    dist.all_reduce(n)
    return n_local / float(n.item())


def sum_over_ranks(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """``sums`` added over every rank."""
    import torch.distributed as dist

    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, values.tolist(), strict=True))


def sync_batchnorm_for(cfg: FinetuneConfig, trained: nn.Module, world: int, device: torch.device) -> nn.Module:
    """``trained`` with SyncBatchNorm (statistics of the global batch) when ``world`` GPU processes
    train with ``batchnorm: train``; otherwise unchanged: frozen BatchNorm normalises by its
    running statistics, which need no synchronisation (and gloo on CPU has no SyncBatchNorm)."""
    if world > 1 and device.type == "cuda" and cfg.batchnorm == "train":
        return nn.SyncBatchNorm.convert_sync_batchnorm(trained)
    return trained


def without_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Plain BatchNorm2d in place of SyncBatchNorm (same state), so the saved classifier loads
    and runs in one process."""
    if isinstance(module, nn.SyncBatchNorm):
        plain = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        plain.load_state_dict(module.state_dict())
        return plain
    for name, child in module.named_children():
        setattr(module, name, without_sync_batchnorm(child))
    return module
