"""Stage ``cache_activations``: the zero-shot image embeddings of one dataset split, in HDF5.

Layout (docs/stages.md): ``/embeddings`` float32 (N, d) in ~1 MiB row chunks, uncompressed;
``/labels`` int64 (N,); ``/index`` int64 (N,), the row in the source dataset; root attributes
record provenance. A views cache (the teacher of augmented training, :mod:`saeft.nn.views`) holds V
rows per image, row ``image * V + view``, and records its bank in the attributes. The file is filled under a ``.partial`` name beside the output, which records
how many rows are done, so a killed job resumes where it stopped; the finished file is renamed
into place, so the declared output is never truncated.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

import saeft
from saeft.config.stages import CacheConfig
from saeft.data.registry import get_dataset
from saeft.infra.environment import runtime_tags
from saeft.infra.faults import maybe_kill
from saeft.infra.io import config_hash
from saeft.nn.models import load_clip, preprocess_for
from saeft.nn.training import Progress, default_device, setup_torch
from saeft.nn.views import ViewBank, ViewConfig, keep_pil

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CHUNK_BYTES = 1 << 20


def run(
    model_path: str | os.PathLike,
    dataset: str,
    split: str,
    dataset_options: Any,
    cfg: CacheConfig,
    out: str | os.PathLike,
    provenance: dict[str, Any] | None = None,
    views: ViewConfig | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Embed every image of ``dataset``/``split`` with the CLIP at ``model_path`` into ``out``;
    with a bank of ``views``, every view of every image (row ``image * views + view``). The
    encoder runs in float32 on ``device`` (default: the GPU if there is one, as fine-tuning)."""
    setup_torch(0)
    out = Path(out)
    device = torch.device(device) if device is not None else default_device()
    clip, arch = load_clip(model_path)
    clip = clip.to(device)
    spec = get_dataset(dataset, dataset_options)
    if views is not None and views.banked:
        data: torch.utils.data.Dataset = ViewBank(spec.load(split, keep_pil, dataset_options), preprocess_for(clip), views)
        per_image = views.views
    else:
        data, per_image = spec.load(split, preprocess_for(clip), dataset_options), 1
    n, dim = len(data), clip.visual.output_dim
    identity = _identity(clip, arch, model_path, dataset, split, dataset_options, provenance, views, n, dim)
    partial = out.with_name(out.name + ".partial")
    done = _resumable_rows(partial, identity)
    mode = "a" if done else "w"
    with h5py.File(partial, mode) as handle:
        if not done:
            _create_layout(handle, n, dim, identity)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(data, range(done, n)), batch_size=cfg.batch_size, num_workers=cfg.workers,
            pin_memory=device.type == "cuda",
        )
        _embed_rows(clip, loader, handle, done, per_image, Progress(n, f"cache {dataset}/{split}"), device)
        handle.attrs["created"] = dt.datetime.now(dt.timezone.utc).isoformat()
        for key, value in runtime_tags().items():  # env.torch, env.device...: who finished the cache
            handle.attrs[key] = value
        if "rows_done" in handle.attrs:
            del handle.attrs["rows_done"]
    maybe_kill("rename")
    os.replace(partial, out)
    logger.info("cached %d x %d embeddings of %s/%s to %s (%d resumed)", n, dim, dataset, split, out, done)
    return {"count": n, "dim": dim, "resumed_rows": done}


def _identity(clip: torch.nn.Module, arch: str, model_path: str | os.PathLike, dataset: str, split: str,
              dataset_options: Any, provenance: dict[str, Any] | None, views: ViewConfig | None,
              n: int, dim: int) -> dict[str, Any]:
    """The attributes that say what a cache holds (a partial file resumes only if they match)."""
    identity = {
        "schema_version": SCHEMA_VERSION,
        "model": arch,
        "pretrained": (provenance or {}).get("pretrained", ""),
        "dataset": dataset,
        "split": split,
        "preprocessing": repr(preprocess_for(clip)).replace("\n", " "),
        "count": n,
        "dim": dim,
        "dtype": "float32",
        "saeft_version": saeft.__version__,
        "config_hash": config_hash({"model": str(model_path), "options": _options_dict(dataset_options), "provenance": provenance}),
    }
    if views is not None and views.banked:
        identity.update(views=views.views, augment=views.augment, view_seed=views.view_seed, crop_scale=views.crop_scale)
    return identity


@torch.no_grad()
def _embed_rows(clip: torch.nn.Module, loader: torch.utils.data.DataLoader, handle: h5py.File, row: int,
                per_image: int, progress: Progress, device: torch.device = torch.device("cpu")) -> None:
    """Embed the loader's images on ``device`` into the file from ``row`` on, recording progress
    after each batch. A batch's forward is launched before the previous batch is written and the
    next one loaded, so that on a GPU (whose kernels run asynchronously) loading and writing
    overlap the forward instead of leaving the GPU idle."""
    pending: tuple[torch.Tensor, torch.Tensor] | None = None
    for images, labels in loader:  # loads this batch while the GPU runs the previous one
        if pending is not None:
            row = _write_rows(handle, row, per_image, *pending, progress)
        pending = clip.encode_image(images.to(device, non_blocking=True)), labels
    if pending is not None:
        _write_rows(handle, row, per_image, *pending, progress)


def _write_rows(handle: h5py.File, row: int, per_image: int, embeddings: torch.Tensor, labels: torch.Tensor,
                progress: Progress) -> int:
    """Write one batch at ``row`` (waiting for its forward), record it as done; the next row."""
    stop = row + len(labels)
    handle["embeddings"][row:stop] = embeddings.float().cpu().numpy()
    handle["labels"][row:stop] = labels.numpy()
    handle["index"][row:stop] = np.arange(row, stop) // per_image
    handle.attrs["rows_done"] = stop
    handle.flush()
    progress.update(stop)
    maybe_kill("cache_rows")
    return stop


def _create_layout(handle: h5py.File, n: int, dim: int, identity: dict[str, Any]) -> None:
    chunk_rows = max(1, min(n, CHUNK_BYTES // (4 * dim)))
    handle.create_dataset("embeddings", shape=(n, dim), dtype="float32", chunks=(chunk_rows, dim))
    handle.create_dataset("labels", shape=(n,), dtype="int64")
    handle.create_dataset("index", shape=(n,), dtype="int64")
    for key, value in identity.items():
        handle.attrs[key] = value
    handle.attrs["rows_done"] = 0


def _resumable_rows(partial: Path, identity: dict[str, Any]) -> int:
    """Rows already written by an interrupted run with the same identity; 0 to start afresh."""
    if not partial.exists():
        return 0
    try:
        with h5py.File(partial, "r") as handle:
            same = all(handle.attrs.get(k) == v for k, v in identity.items())
            # No rows_done: the file was finished, only its rename was lost.
            rows = int(handle.attrs.get("rows_done", handle.attrs.get("count", 0)))
    except OSError as exc:
        logger.warning("discarding unreadable partial cache %s (%s)", partial, exc)
        rows, same = 0, False
    if not same:
        logger.info("partial cache %s is from another configuration; starting afresh", partial)
        partial.unlink()
        return 0
    logger.info("resuming %s at row %d", partial, rows)
    return rows


def _options_dict(options: Any) -> Any:
    return options.to_dict() if hasattr(options, "to_dict") else options
