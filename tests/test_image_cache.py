"""Generated splits rendered once and read back (saeft.data.image_cache): the same pixels as a
render, a new entry whenever what determines them changes, never a failed job from the cache."""

from __future__ import annotations

import numpy as np

from saeft.data import synthetic
from saeft.data.image_cache import ENV, cached_split
from saeft.data.registry import get_dataset


def _world(**changes):
    return synthetic.WorldConfig.from_dict({"image_size": 16, "test_per_class": 2, **changes})


def _render(config, split):
    _render.calls += 1
    return synthetic.render_split(config, split)


_render.calls = 0


def test_a_split_is_rendered_once_and_read_back_bit_identical(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path))
    calls = _render.calls
    first = cached_split("shapes", "test", _world(), _render, synthetic)
    again = cached_split("shapes", "test", _world(), _render, synthetic)
    assert _render.calls == calls + 1
    fresh = synthetic.render_split(_world(), "test")
    for got in (first, again):
        assert got[0].dtype == np.uint8 and np.array_equal(got[0], fresh[0]) and np.array_equal(got[1], fresh[1])
    # Another config or split is another entry; the registry's loader goes through the cache.
    cached_split("shapes", "test", _world(seed=1), _render, synthetic)
    cached_split("shapes", "sketch", _world(), _render, synthetic)
    assert _render.calls == calls + 3 and len(list(tmp_path.glob("shapes-*.npz"))) == 3
    data = get_dataset("shapes").load("test", lambda image: np.asarray(image), _world())
    assert _render.calls == calls + 3 and np.array_equal(data[0][0], fresh[0][0])


def test_no_cache_without_the_variable_and_a_torn_entry_is_rendered_again(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(ENV, raising=False)
    calls = _render.calls
    cached_split("shapes", "test", _world(), _render, synthetic)
    assert _render.calls == calls + 1 and not list(tmp_path.iterdir())
    monkeypatch.setenv(ENV, str(tmp_path))
    cached_split("shapes", "test", _world(), _render, synthetic)
    [entry] = tmp_path.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])  # a torn file
    images, _ = cached_split("shapes", "test", _world(), _render, synthetic)
    assert "unreadable" in caplog.text and np.array_equal(images, synthetic.render_split(_world(), "test")[0])
    assert _render.calls == calls + 3
    (tmp_path / "blocked").write_text("")  # a folder that cannot be made: the job still gets its images
    monkeypatch.setenv(ENV, str(tmp_path / "blocked" / "cache"))
    assert np.array_equal(cached_split("shapes", "test", _world(), _render, synthetic)[0], images)
    assert "not written" in caplog.text
