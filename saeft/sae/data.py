"""Reading activation caches for the SAE: whole ``/embeddings`` (:func:`read_embeddings`),
chunk-wise shuffled batches (:class:`ChunkBatches`) and the :func:`geometric_median` ``b_pre``
may start from."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def read_embeddings(path: str | os.PathLike) -> torch.Tensor:
    """Read ``/embeddings`` (N, d) of an activation cache into a float32 tensor."""
    return read_cache(path)[0]


def read_cache(path: str | os.PathLike, labels: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``/embeddings`` (N, d) as float32 and, with ``labels``, ``/labels`` (N,) as int64 (``None``
    where the cache has none). Non-finite embeddings raise ``ValueError`` naming the file."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such activation cache")
    try:
        with h5py.File(path, "r") as handle:
            dataset = _embeddings_dataset(handle, path)
            array = dataset[...]
            label_array = handle["labels"][...] if labels and "labels" in handle else None
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from exc
    embeddings = torch.from_numpy(array).to(torch.float32)
    if not torch.isfinite(embeddings).all():
        raise ValueError(f"{path}: /embeddings contains NaN or infinite values")
    return embeddings, (None if label_array is None else torch.from_numpy(label_array).long())


def _embeddings_dataset(handle, path):
    import h5py

    dataset = handle.get("embeddings")
    if not isinstance(dataset, h5py.Dataset):
        raise ValueError(f"{path}: no /embeddings dataset")
    if dataset.ndim != 2:
        raise ValueError(f"{path}: /embeddings must be 2-D (N, d), got shape {dataset.shape}")
    return dataset


class ChunkBatches:
    """Batches of an HDF5 cache read whole chunks at a time, never row by row.

    Each epoch visits the chunks in a random order, concatenates up to ``buffer_rows`` rows of
    them, shuffles those in memory and cuts batches (the remainder carries into the next buffer).
    ``shuffle=False`` reads in file order. Uses only ``generator`` for randomness.
    """

    def __init__(self, path: str | os.PathLike, batch_size: int, buffer_rows: int) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such activation cache")
        try:
            self.handle = h5py.File(self.path, "r")
        except OSError as exc:
            raise ValueError(f"{self.path}: not a readable HDF5 file ({exc})") from exc
        self.dataset = _embeddings_dataset(self.handle, self.path)
        self.n, self.d = self.dataset.shape
        self.chunk_rows = self.dataset.chunks[0] if self.dataset.chunks else max(1, (1 << 20) // (4 * max(self.d, 1)))
        self.batch_size = batch_size
        self.buffer_rows = max(buffer_rows, self.chunk_rows, batch_size)

    def close(self) -> None:
        self.handle.close()

    def _read(self, start: int) -> torch.Tensor:
        rows = torch.from_numpy(self.dataset[start : start + self.chunk_rows]).to(torch.float32)
        if not torch.isfinite(rows).all():
            raise ValueError(f"{self.path}: /embeddings contains NaN or infinite values")
        return rows

    def epoch(self, generator: torch.Generator | None, shuffle: bool = True):
        """Yield the batches of one pass (the last one may be smaller)."""
        starts = torch.arange(0, self.n, self.chunk_rows)
        if shuffle:
            starts = starts[torch.randperm(len(starts), generator=generator)]
        pending: list[torch.Tensor] = []
        pending_rows = 0
        carry = torch.empty(0, self.d)
        for i, start in enumerate(starts.tolist()):
            pending.append(self._read(start))
            pending_rows += pending[-1].shape[0]
            if pending_rows < self.buffer_rows and i < len(starts) - 1:
                continue
            buffer = torch.cat([carry, *pending])
            pending, pending_rows = [], 0
            if shuffle:
                buffer = buffer[torch.randperm(buffer.shape[0], generator=generator)]
            full = buffer.shape[0] // self.batch_size * self.batch_size
            if full:  # an empty tensor splits into one empty batch
                yield from buffer[:full].split(self.batch_size)
            carry = buffer[full:]
        if carry.shape[0]:
            yield carry


def geometric_median(x: torch.Tensor, iterations: int = 30, max_rows: int = 8192) -> torch.Tensor:
    """Weiszfeld estimate of the geometric median of the rows of ``x`` (on at most
    ``max_rows`` evenly spaced rows, float64)."""
    step = max(1, x.shape[0] // max_rows)
    points = x[::step].double()
    median = points.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        median = (weights[:, None] * points).sum(dim=0) / weights.sum()
    return median.float()


__all__ = ["ChunkBatches", "geometric_median", "read_cache", "read_embeddings"]
