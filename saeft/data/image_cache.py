"""Generated splits rendered once per study and read back: every job that reads a split of the
shapes world or of the Fashion-MNIST study (an evaluation reads five) otherwise renders it again.

``SAEFT_IMAGE_CACHE`` (the workflow sets ``.snakemake/saeft-images`` in its working directory)
names the folder; unset, nothing is cached. An entry is named by what determines its pixels: the
dataset, the split, the world's config, the source of the module that renders it, NumPy's
version (its random streams) and, for a split made from files, their sizes and modification
times; so a changed config, renderer or input file is a new entry, never a stale one. Entries
are ``.npz`` files (no pickles) written atomically: jobs that render the same split at once
each write a complete, identical file. They are not Snakemake outputs: deleting the folder only
costs the next jobs a render.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ENV = "SAEFT_IMAGE_CACHE"


def cached_split(dataset: str, split: str, config: Any, render: Callable[[Any, str], tuple[np.ndarray, np.ndarray]],
                 renderer: ModuleType, input_files: Sequence[str | os.PathLike] = ()) -> tuple[np.ndarray, np.ndarray]:
    """``render(config, split)`` (uint8 images, int64 labels), read back from the cache when an
    earlier job rendered it; ``renderer`` the module whose code draws the pixels."""
    folder = os.environ.get(ENV)
    if not folder:
        return render(config, split)
    path = Path(folder) / f"{dataset}-{split}-{_key(dataset, split, config, renderer, input_files)}.npz"
    try:
        with np.load(path, allow_pickle=False) as stored:
            images, labels = stored["images"], stored["labels"]
        logger.info("read %d rendered images of %s/%s from %s", len(labels), dataset, split, path)
        return images, labels
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # torn or foreign: render again
        logger.warning("image cache %s unreadable (%s): rendering again", path, exc)
    images, labels = render(config, split)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:  # not saeft.infra.io.atomic_path: a cache entry is no output, and no fault-injection point
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            np.savez(handle, images=images, labels=labels)
        os.replace(temporary, path)
    except OSError as exc:  # a full or read-only disk costs a render, never the job
        logger.warning("image cache %s not written: %s", path, exc)
        with contextlib.suppress(OSError):
            temporary.unlink()
    return images, labels


def _key(dataset: str, split: str, config: Any, renderer: ModuleType, input_files: Sequence[str | os.PathLike]) -> str:
    digest = hashlib.sha256()
    settings = config.to_dict() if hasattr(config, "to_dict") else config
    digest.update(json.dumps({"dataset": dataset, "split": split, "config": settings, "numpy": np.__version__},
                             sort_keys=True, default=str).encode())
    digest.update(Path(renderer.__file__).read_bytes())
    for name in input_files:
        try:
            stat = os.stat(name)
        except FileNotFoundError:  # the render names what is missing
            continue
        digest.update(f"{os.path.abspath(name)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]
