"""A full disk or a read-only results folder: the job fails with the path and the reason, and
leaves no partial output (nor temporary file) behind. Needs root to mount a small tmpfs."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from saeft import cli


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _prepare(out: Path, caplog) -> int:
    caplog.set_level(logging.ERROR)
    return cli.main(["prepare", "--arch", "saeft-tiny-rn", "--out", str(out)])  # ~30 MB of weights


def test_a_full_disk_fails_the_job_cleanly(small_disk, caplog):
    out = small_disk / "models" / "model.safetensors"
    assert _prepare(out, caplog) == 2
    assert f"{out}: could not be written" in caplog.text and "No space left on device" in caplog.text
    assert list(out.parent.iterdir()) == []  # neither the output nor its temporary file


def test_a_read_only_results_folder_fails_the_job_cleanly(small_disk, caplog):
    (small_disk / "models").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    out = small_disk / "models" / "model.safetensors"
    assert _prepare(out, caplog) == 2
    assert f"{out}: cannot write here (Read-only file system)" in caplog.text
    assert list(out.parent.iterdir()) == []


def test_outputs_get_the_umask_permissions_not_the_temporary_files_private_ones(tmp_path):
    import os
    import stat

    from saeft.infra.io import atomic_path, write_json

    out = tmp_path / "result.json"
    write_json(out, {"value": 1})
    with atomic_path(tmp_path / "table.csv") as tmp:
        tmp.write_text("a\n")
        assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o600  # private while being written
    umask = os.umask(0)
    os.umask(umask)
    for path in (out, tmp_path / "table.csv"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
