"""The software and hardware a job ran with: one record for every output JSON and MLflow run.

:func:`runtime_record` is the only source of that record. :func:`saeft.infra.io.write_json` adds it to
every stage output JSON under the key ``"environment"``, :mod:`saeft.infra.tracking` sets it as
``env.<key>`` tags on every job's MLflow run, and the embedding cache stores it as ``env.<key>``
HDF5 attributes. It holds no timestamp: two runs on the same machine and install write the same
record, so outputs stay comparable byte for byte across reruns.

torch is imported inside the function, never at module import, so that Snakefile planning (which
imports parts of saeft) does not pay for it.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

ENVIRONMENT_KEY = "environment"
"""The key of the record in output JSON files."""

TAG_PREFIX = "env."
"""The prefix of the record's MLflow tags and HDF5 attributes: ``env.torch``, ``env.device``..."""


def package_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (its pip name), read from the package metadata
    without importing it; None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _device_of(device: Any) -> tuple[str, str | None]:
    """(device name, GPU name or None) of ``device``; None: the CUDA device this process
    initialised and last selected, else the CPU (stages that never touch CUDA compute on it)."""
    import torch

    if device is None:
        if not torch.cuda.is_initialized():  # does not initialise CUDA itself
            return "cpu", None
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        return str(device), None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index}", torch.cuda.get_device_name(index)


def runtime_record(device: Any = None) -> dict[str, Any]:
    """The job's environment as a flat JSON-able dict.

    Keys: ``python``, ``saeft``, ``torch``, ``torch_cuda`` (the CUDA version torch was built for,
    None for a CPU build), ``open_clip``, ``numpy`` (versions as strings), ``torch_threads``
    (``torch.get_num_threads()``, an int), ``device`` (``"cpu"`` or ``"cuda:N"``) and ``gpu``
    (the CUDA device's name, None on the CPU). ``device`` defaults to the CUDA device this
    process initialised, else the CPU; pass the stage's ``torch.device`` to name it explicitly.
    """
    import torch

    import saeft

    device_name, gpu = _device_of(device)
    return {
        "python": platform.python_version(),
        "saeft": saeft.__version__,
        "torch": str(torch.__version__),
        "torch_cuda": torch.version.cuda,
        "open_clip": package_version("open_clip_torch"),  # importing open_clip itself is slow
        "numpy": package_version("numpy"),
        "torch_threads": int(torch.get_num_threads()),
        "device": device_name,
        "gpu": gpu,
    }


def runtime_tags(device: Any = None) -> dict[str, str]:
    """:func:`runtime_record` as string tags ``env.<key>`` (MLflow tags, HDF5 attributes);
    keys whose value is None are left out."""
    return {f"{TAG_PREFIX}{key}": str(value) for key, value in runtime_record(device).items() if value is not None}
