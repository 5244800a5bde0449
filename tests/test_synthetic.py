"""The procedural shapes world: deterministic, balanced, and its domains really differ."""

from __future__ import annotations

import numpy as np
import pytest

from saeft.config import ConfigError
from saeft.data import synthetic
from saeft.data.registry import get_dataset


def test_same_seed_same_images(tiny_world):
    a_images, a_labels = synthetic.render_split(tiny_world, "train")
    b_images, b_labels = synthetic.render_split(tiny_world, "train")
    assert np.array_equal(a_images, b_images) and np.array_equal(a_labels, b_labels)


def test_image_does_not_depend_on_how_many_are_rendered(tiny_world):
    whole, _ = synthetic.render_split(tiny_world, "test")
    part, _ = synthetic.render_split(tiny_world, "test", 5, 8)
    assert np.array_equal(whole[5:8], part)


def test_other_seed_other_images(tiny_world):
    other = synthetic.WorldConfig(**{**tiny_world.to_dict(), "seed": tiny_world.seed + 1})
    a, _ = synthetic.render_split(tiny_world, "train", 0, 10)
    b, _ = synthetic.render_split(other, "train", 0, 10)
    assert not np.array_equal(a, b)


def test_splits_are_balanced_and_sized(tiny_world):
    for split in synthetic.SPLITS:
        images, labels = synthetic.render_split(tiny_world, split)
        assert images.shape == (tiny_world.split_size(split), 32, 32, 3)
        assert images.dtype == np.uint8
        counts = np.bincount(labels, minlength=len(synthetic.CLASSNAMES))
        assert counts.min() == counts.max()


def test_domains_differ_in_pixel_statistics():
    world = synthetic.WorldConfig(test_per_class=6)
    stats = {}
    for split in ("test", "sketch", "rendition", "hard"):
        images, _ = synthetic.render_split(world, split)
        grey = images.mean(axis=-1)
        colourfulness = np.abs(images.astype(float) - images.mean(axis=-1, keepdims=True)).mean()
        stats[split] = (grey.mean(), colourfulness)
    # Sketches are bright paper and grey ink; photos and renditions are colourful.
    assert stats["sketch"][0] > stats["test"][0] + 40
    assert stats["sketch"][1] < 5 < stats["test"][1]
    assert stats["rendition"][1] > stats["sketch"][1] + 20
    # Same-class images of two domains are far apart in pixel space.
    test, _ = synthetic.render_split(world, "test")
    sketch, _ = synthetic.render_split(world, "sketch")
    assert np.abs(test.astype(float) - sketch).mean() > 40


def test_shortcut_follows_the_config():
    """In ID photos the background hue follows the class; in the hard shift it never does."""
    def hue_match(split: str, world: synthetic.WorldConfig) -> float:
        images, labels = synthetic.render_split(world, split)
        import colorsys

        matches = []
        for image, label in zip(images, labels):
            corner = image[:3, :3].reshape(-1, 3).mean(axis=0) / 255.0
            hue = colorsys.rgb_to_hsv(*corner)[0]
            distance = min(abs(hue - synthetic.CLASS_HUES[label]), 1 - abs(hue - synthetic.CLASS_HUES[label]))
            matches.append(distance < 0.05)
        return float(np.mean(matches))

    world = synthetic.WorldConfig(test_per_class=20)
    assert hue_match("test", world) > 0.6
    assert hue_match("hard", world) < 0.2
    assert hue_match("test", synthetic.WorldConfig(test_per_class=20, spurious=0.0)) < 0.3


def test_captions_name_class_and_style():
    rng = np.random.default_rng(0)
    text = synthetic.caption(3, "sketch", rng)
    assert "star" in text and ("sketch" in text or "drawing" in text)


def test_styleless_captions_name_the_class_alone_at_their_share():
    """At 0 the captions (and the random stream) are those of before; at 0.5 about half the
    captions name no style."""
    words = {w for styles in synthetic.STYLE_WORDS.values() for style in styles for w in style.split()}
    plain = np.random.default_rng(1)
    styled = [synthetic.caption(c % 10, "rendition", plain) for c in range(50)]
    corpus = synthetic.pretrain_corpus(synthetic.WorldConfig(pretrain_per_class=1, image_size=16))
    again = np.random.default_rng(1)
    assert [corpus.caption(c % 10, "rendition", again) for c in range(50)] == styled
    mixed = synthetic.pretrain_corpus(synthetic.WorldConfig(pretrain_per_class=1, image_size=16, styleless_captions=0.5))
    rng = np.random.default_rng(2)
    texts = [mixed.caption(c % 10, "sketch", rng) for c in range(400)]
    bare = [t for t in texts if not words & set(t.rstrip(".").split())]
    assert 0.4 < len(bare) / len(texts) < 0.6
    assert all(synthetic.CLASSNAMES[i % 10] in t for i, t in enumerate(texts))


def test_confusable_captions_name_the_look_alike_at_their_share():
    """At 0.3 about 30% of the captions name the look-alike class; named_class reads either back."""
    corpus = synthetic.pretrain_corpus(synthetic.WorldConfig(pretrain_per_class=1, image_size=16, confusable_captions=0.3,
                                                             styleless_captions=0.5))
    rng = np.random.default_rng(3)
    named = np.array([corpus.named_class(corpus.caption(c % 10, "photo", rng)) for c in range(1000)])
    own = np.arange(1000) % 10
    assert 0.25 < np.mean(named != own) < 0.35
    assert all(synthetic.LOOK_ALIKE[o] == n for o, n in zip(own, named) if n != o)
    assert synthetic.CLASSNAMES[synthetic.LOOK_ALIKE[synthetic.CLASSNAMES.index("ring")]] == "circle"
    with pytest.raises(ConfigError, match="synthetic.confusable_captions"):
        synthetic.WorldConfig(confusable_captions=0.5)


def test_bad_world_config_names_the_key():
    with pytest.raises(ConfigError, match="synthetic.spurious"):
        synthetic.WorldConfig(spurious=1.5)
    with pytest.raises(ConfigError, match="synthetic.colour"):
        synthetic.WorldConfig.from_dict({"colour": 1}, "synthetic.")


def test_registry_serves_splits_as_tensors(tiny_world):
    import torch

    spec = get_dataset("shapes")
    data = spec.load("sketch", lambda image: torch.zeros(1), tiny_world)
    assert len(data) == tiny_world.split_size("sketch")
    assert spec.role("test") == "id" and spec.role("sketch") == "ood" and spec.role("train") == "train"
    with pytest.raises(ValueError, match="no split 'pretrainx'"):
        spec.load("pretrainx", None, tiny_world)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet1'"):
        get_dataset("imagenet1")


def test_object_scale_draws_larger_objects_and_keeps_the_default_world():
    """Sketches are ink on paper: the ink's bounding box measures the object. Scale 1 is the
    original renderer's world, image for image."""
    def ink_extent(world):
        images, _ = synthetic.render_split(world, "sketch", 0, 40)
        dark = images.mean(axis=-1) < 128
        rows, cols = dark.any(axis=2), dark.any(axis=1)
        return np.mean([np.ptp(r.nonzero()[0]) + np.ptp(c.nonzero()[0]) for r, c in zip(rows, cols) if r.any()])

    assert ink_extent(synthetic.WorldConfig(object_scale=1.3)) > 1.15 * ink_extent(synthetic.WorldConfig())
    default, _ = synthetic.render_split(synthetic.WorldConfig(), "hard", 0, 5)
    same, _ = synthetic.render_split(synthetic.WorldConfig(object_scale=1.0), "hard", 0, 5)
    assert np.array_equal(default, same)


def test_pretrain_object_cue_colours_pretraining_objects_only():
    """With the cue at 1 every pretraining rendition's object (its fully saturated pixels) has
    its class's object hue; at 0.5 about half do; the splits fine-tuning and evaluation read
    are the same images whatever the cue."""
    import colorsys

    def cue_match(world: synthetic.WorldConfig) -> float:
        images, labels = synthetic.render_split(world, "pretrain", 0, 400)
        _, domains = zip(*(synthetic.split_label_and_domain("pretrain", i) for i in range(400)))
        matches = []
        for image, label, domain in zip(images, labels, domains):
            if domain != "rendition":
                continue
            hsv = np.array([colorsys.rgb_to_hsv(*p) for p in image.reshape(-1, 3) / 255.0])
            hue = float(np.median(hsv[hsv[:, 1] > 0.9, 0]))
            target = synthetic.OBJECT_HUES[label]
            matches.append(min(abs(hue - target), 1 - abs(hue - target)) < 0.05)
        return float(np.mean(matches))

    assert cue_match(synthetic.WorldConfig(pretrain_object_cue=1.0)) > 0.95
    assert 0.3 < cue_match(synthetic.WorldConfig(pretrain_object_cue=0.5)) < 0.75
    assert cue_match(synthetic.WorldConfig()) < 0.3
    for split in ("train", "test", "rendition", "hard"):
        plain, _ = synthetic.render_split(synthetic.WorldConfig(), split, 0, 10)
        cued, _ = synthetic.render_split(synthetic.WorldConfig(pretrain_object_cue=1.0), split, 0, 10)
        assert np.array_equal(plain, cued)
