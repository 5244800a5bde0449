"""Atomic file output and small readers shared by every stage.

Every declared output is written to a temporary file in the same folder and then moved into
place with ``os.replace``, so a crash never leaves a truncated file under the final name.
Imports no torch at module level (the workflow plans with the JSON helpers); the tensor
functions import torch and safetensors when called.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saeft.infra.environment import ENVIRONMENT_KEY, runtime_record
from saeft.infra.faults import maybe_kill

if TYPE_CHECKING:
    import torch


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask() sets as it reads


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it to ``path``, else delete it."""
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as exc:
        raise OSError(exc.errno, f"{final}: cannot write here ({exc.strerror})") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600): give the output the usual umask permissions,
        # so collaborators on a shared cluster can read the results.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        maybe_kill("rename")
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any, environment: bool = True) -> None:
    """Write ``obj`` as indented JSON, atomically.

    A JSON object (every stage output) gets the job's software and device under ``"environment"``
    (:func:`saeft.infra.environment.runtime_record`), unless it has that key or ``environment`` is False.
    """
    if environment and isinstance(obj, dict) and ENVIRONMENT_KEY not in obj:
        obj = {**obj, ENVIRONMENT_KEY: runtime_record()}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, naming the file in the error if it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def save_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Save tensors as safetensors, atomically; ``metadata`` values are stored as JSON strings."""
    from safetensors.torch import save_file

    meta = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    contiguous = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(contiguous, str(tmp), metadata=meta)
        except Exception as exc:  # safetensors reports I/O failures (disk full) as its own error type
            raise OSError(f"{path}: could not be written ({exc})") from exc


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of a safetensors file (no tensor read). Raises ValueError naming the
    path for a file that is not readable safetensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return meta


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file written by :func:`save_tensors`: (tensors, decoded metadata)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such safetensors file")
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    return tensors, meta


def config_hash(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable config, recorded for provenance."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a workflow the worker or the sync process serves)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
