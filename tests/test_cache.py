"""The HDF5 embedding cache: declared layout, provenance attributes, resume, bad files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from saeft.data.registry import get_dataset
from saeft.nn.embeddings import read_cache
from saeft.nn.models import load_clip, preprocess_for
from saeft.stages import cache


def test_layout_and_attrs(tiny_world, clip_file, tmp_path):
    out = tmp_path / "train.h5"
    info = cache.run(clip_file, "shapes", "train", tiny_world, cache.CacheConfig(batch_size=7), out, {"pretrained": "x"})
    n = tiny_world.split_size("train")
    assert info == {"count": n, "dim": 128, "resumed_rows": 0}
    with h5py.File(out, "r") as handle:
        assert handle["embeddings"].shape == (n, 128) and handle["embeddings"].dtype == np.float32
        assert handle["embeddings"].chunks[1] == 128 and handle["embeddings"].compression is None
        assert handle["labels"].dtype == np.int64 and handle["index"][:].tolist() == list(range(n))
        attrs = dict(handle.attrs)
    for key in ("schema_version", "model", "pretrained", "dataset", "split", "preprocessing", "count",
                "dim", "dtype", "saeft_version", "config_hash", "created"):
        assert key in attrs, key
    assert attrs["split"] == "train" and attrs["count"] == n and attrs["pretrained"] == "x"
    assert "rows_done" not in attrs
    assert not out.with_name("train.h5.partial").exists()


def test_embeddings_match_the_model(tiny_world, clip_file, tmp_path):
    out = tmp_path / "val.h5"
    cache.run(clip_file, "shapes", "val", tiny_world, cache.CacheConfig(), out)
    embeddings, labels, _ = read_cache(out)
    clip, _ = load_clip(clip_file)
    data = get_dataset("shapes").load("val", preprocess_for(clip), tiny_world)
    images = torch.stack([data[i][0] for i in range(3)])
    with torch.no_grad():
        expected = clip.encode_image(images).numpy()
    np.testing.assert_allclose(embeddings[:3], expected, rtol=1e-5, atol=1e-5)
    assert labels[:3].tolist() == [data[i][1] for i in range(3)]


def test_resumes_a_partial_cache(tiny_world, clip_file, tmp_path):
    full = tmp_path / "full.h5"
    cache.run(clip_file, "shapes", "train", tiny_world, cache.CacheConfig(batch_size=8), full)
    out = tmp_path / "resumed.h5"
    partial = out.with_name("resumed.h5.partial")
    # Simulate a job killed after 16 rows: the same file with rows_done = 16 and garbage after.
    import shutil

    shutil.copy(full, partial)
    with h5py.File(partial, "a") as handle:
        handle["embeddings"][16:] = 0.0
        handle.attrs["rows_done"] = 16
        del handle.attrs["created"]
    info = cache.run(clip_file, "shapes", "train", tiny_world, cache.CacheConfig(batch_size=8), out)
    assert info["resumed_rows"] == 16
    a, _, _ = read_cache(full)
    b, _, _ = read_cache(out)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_unfinished_or_foreign_files_are_rejected(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ValueError, match="foreign.h5: not a saeft cache"):
        read_cache(foreign)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="junk.h5: not a readable HDF5"):
        read_cache(junk)


def test_default_device_is_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cache.default_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cache.default_device() == torch.device("cpu")


class _Logged(torch.utils.data.Dataset):
    """Items i -> (image of value i, label i), logging every load."""

    def __init__(self, n, events):
        self.n, self.events = n, events

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.events.append(("load", i))
        return torch.full((3, 2, 2), float(i)), i


class _Encoder(torch.nn.Module):
    """encode_image: the device it was given and the per-image mean, logging every forward."""

    def __init__(self, events):
        super().__init__()
        self.events, self.devices = events, []

    def encode_image(self, images):
        self.devices.append(images.device)
        self.events.append(("forward", len(self.devices) - 1))
        if images.device.type == "meta":  # no values on the meta device: the batch's number instead
            return torch.full((len(images), 4), float(len(self.devices) - 1))
        return images.flatten(1).mean(1, keepdim=True).expand(-1, 4)


class _Progress:
    def __init__(self, events):
        self.events = events

    def update(self, row):
        self.events.append(("write", row))


def test_rows_go_to_the_device_and_the_next_batch_loads_before_the_last_is_written(tmp_path):
    events: list = []
    encoder = _Encoder(events)
    loader = torch.utils.data.DataLoader(_Logged(6, events), batch_size=2)
    with h5py.File(tmp_path / "x.h5", "w") as handle:
        cache._create_layout(handle, 6, 4, {})
        cache._embed_rows(encoder, loader, handle, 0, 1, _Progress(events), torch.device("meta"))
        rows = handle["embeddings"][:]
        assert handle["labels"][:].tolist() == list(range(6)) and handle.attrs["rows_done"] == 6
    assert encoder.devices == [torch.device("meta")] * 3
    np.testing.assert_array_equal(rows[:, 0], [0, 0, 1, 1, 2, 2])  # batch b's rows hold forward b
    # Batch b+1 is loaded while batch b's forward runs, before b is written (GPU kernels are asynchronous).
    assert [e for e in events if e[0] != "load" or e[1] % 2] == [
        ("load", 1), ("forward", 0), ("load", 3), ("write", 2), ("forward", 1), ("load", 5), ("write", 4),
        ("forward", 2), ("write", 6)]


def test_embedding_on_an_explicit_device_matches_the_default(tiny_world, clip_file, tmp_path):
    cache.run(clip_file, "shapes", "val", tiny_world, cache.CacheConfig(batch_size=5), tmp_path / "a.h5")
    cache.run(clip_file, "shapes", "val", tiny_world, cache.CacheConfig(batch_size=5), tmp_path / "b.h5", device="cpu")
    a, _, attrs = read_cache(tmp_path / "a.h5")
    b, _, _ = read_cache(tmp_path / "b.h5")
    np.testing.assert_array_equal(a, b)
    assert attrs["env.device"] == "cpu"
