"""Fashion-MNIST: idx reading, a deterministic disjoint partition, held-out corruptions, clear errors.

Most tests run on a small fake copy of the dataset that they write themselves (same file names and
idx format), so they need neither the Debian package nor much time.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from saeft.config import ConfigError
from saeft.data import fashion_mnist as fm
from saeft.data.registry import get_dataset

N_CLASSES = len(fm.CLASSNAMES)


def write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped idx file: zero bytes, type 0x08 (unsigned byte), ndim, big-endian dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    """A Fashion-MNIST look-alike: 40 train and 12 test images per class of random garments."""
    root = tmp_path_factory.mktemp("fashion-mnist")
    rng = np.random.default_rng(0)
    for part, per_class in (("train", 40), ("t10k", 12)):
        labels = np.tile(np.arange(N_CLASSES), per_class)
        rng.shuffle(labels)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        images_name, labels_name = fm.FILES[part]
        write_idx(root / images_name, images)
        write_idx(root / labels_name, labels)
    return root


def small(root: Path, **overrides) -> fm.FashionMNISTConfig:
    values = dict(root=str(root), train_per_class=5, val_per_class=3, test_per_class=4, pretrain_per_class=2,
                  sae_train_per_class=3, sae_heldout_per_class=2,
                  pretrain_corruptions=["gaussian_noise", "contrast"], heldout_corruptions=["shot_noise", "pixelate"])
    return fm.FashionMNISTConfig(**{**values, **overrides})


def test_read_idx_round_trips_images_and_labels(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    labels = np.array([7, 0, 9])
    write_idx(tmp_path / "i.gz", images)
    write_idx(tmp_path / "l.gz", labels)
    assert np.array_equal(fm.read_idx(tmp_path / "i.gz"), images.astype(np.uint8))
    assert np.array_equal(fm.read_idx(tmp_path / "l.gz"), labels)
    # The published layout: images after a 16-byte header, labels after 8 bytes.
    with gzip.open(tmp_path / "i.gz", "rb") as handle:
        assert handle.read()[16:16 + 28 * 28] == images[0].astype(np.uint8).tobytes()


def test_read_idx_rejects_a_truncated_or_foreign_file(tmp_path):
    write_idx(tmp_path / "i.gz", np.zeros((2, 4, 4)))
    with gzip.open(tmp_path / "i.gz", "rb") as handle:
        data = handle.read()
    with gzip.open(tmp_path / "short.gz", "wb") as handle:
        handle.write(data[:-5])
    with pytest.raises(ValueError, match="declares shape"):
        fm.read_idx(tmp_path / "short.gz")
    with gzip.open(tmp_path / "foreign.gz", "wb") as handle:
        handle.write(b"\x89PNG" + data[4:])
    with pytest.raises(ValueError, match="magic"):
        fm.read_idx(tmp_path / "foreign.gz")


def test_missing_data_names_the_path_the_key_and_the_package(tmp_path):
    cfg = small(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as info:
        fm.render_split(cfg, "train")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and "fashion_mnist.root" in message
    assert "apt-get install dataset-fashion-mnist" in message and "train-images-idx3-ubyte.gz" in message


def test_splits_are_deterministic_balanced_and_sized(fake_root):
    cfg = small(fake_root)
    for split in fm.SPLITS:
        a_images, a_labels = fm.render_split(cfg, split)
        b_images, b_labels = fm.render_split(cfg, split)
        assert np.array_equal(a_images, b_images) and np.array_equal(a_labels, b_labels), split
        assert a_images.shape == (cfg.split_size(split), 32, 32, 3) and a_images.dtype == np.uint8
        assert np.array_equal(np.bincount(a_labels, minlength=N_CLASSES), np.full(N_CLASSES, cfg.split_size(split) // N_CLASSES))


def test_other_seed_other_partition_and_corruptions(fake_root):
    a, b = small(fake_root), small(fake_root, seed=1)
    _, file_labels = fm.read_part(str(fake_root), "train")
    assert not np.array_equal(fm.source_indices(a, "train", file_labels), fm.source_indices(b, "train", file_labels))
    assert not np.array_equal(fm.render_split(a, "corrupted")[0], fm.render_split(b, "corrupted")[0])


def test_pretrain_train_and_val_images_are_disjoint(fake_root):
    cfg = small(fake_root)
    originals, file_labels = fm.read_part(str(fake_root), "train")
    rows = {split: fm.source_indices(cfg, split, file_labels) for split in ("pretrain", "train", "val")}
    for split, indices in rows.items():
        assert len(set(indices)) == len(indices), split
        assert np.array_equal(file_labels[indices], np.arange(len(indices)) % N_CLASSES), split
    assert not set(rows["pretrain"]) & set(rows["train"])
    assert not set(rows["pretrain"]) & set(rows["val"])
    assert not set(rows["train"]) & set(rows["val"])
    # Changing the pretraining corpus never changes the fine-tuning images.
    other = small(fake_root, pretrain_per_class=3, pretrain_styles=[])
    assert np.array_equal(fm.source_indices(other, "train", file_labels), rows["train"])


def test_shifted_splits_are_the_test_images_changed(fake_root):
    cfg = small(fake_root)
    test, labels = fm.render_split(cfg, "test")
    inverted, inverted_labels = fm.render_split(cfg, "inverted")
    assert np.array_equal(labels, inverted_labels)
    assert np.array_equal(inverted, 255 - test)
    sketch, _ = fm.render_split(cfg, "sketch")
    corrupted, _ = fm.render_split(cfg, "corrupted")
    assert not np.array_equal(sketch, test) and not np.array_equal(corrupted, test)
    # Grey in, grey out (the channels agree) for the styles.
    assert np.array_equal(sketch[..., 0], sketch[..., 2])


def test_corrupted_split_cycles_the_heldout_families_and_severities(fake_root):
    cfg = small(fake_root, test_per_class=12, severities=[2, 5])
    domains = [fm.row_domain(cfg, "corrupted", i) for i in range(cfg.split_size("corrupted"))]
    assert {family for family, _ in domains} == {"shot_noise", "pixelate"}
    assert {severity for _, severity in domains} == {2, 5}
    # Each class sees each (family, severity).
    for label in range(N_CLASSES):
        seen = {domains[i] for i in range(label, len(domains), N_CLASSES)}
        assert seen == {(f, s) for f in ("shot_noise", "pixelate") for s in (2, 5)}


def test_pretraining_corpus_never_shows_a_heldout_family(fake_root):
    cfg = small(fake_root)
    corpus = fm.pretrain_corpus(cfg)
    assert set(corpus.domains) == {"clean", "gaussian_noise", "contrast", "inverted", "sketch"}
    assert not set(corpus.domains) & set(cfg.heldout_corruptions)
    counts = {d: int(np.sum(corpus.domains == d)) for d in set(corpus.domains)}
    assert set(counts.values()) == {cfg.pretrain_per_class * N_CLASSES}
    caption = corpus.caption(9, "gaussian_noise", np.random.default_rng(0))
    assert "ankle boot" in caption and "noisy" in caption


def test_heldout_family_in_pretraining_is_a_config_error(fake_root):
    with pytest.raises(ConfigError, match="fashion_mnist.heldout_corruptions.*shot_noise"):
        small(fake_root, pretrain_corruptions=["shot_noise"], heldout_corruptions=["shot_noise", "frost"])


@pytest.mark.parametrize(("overrides", "key"), [
    ({"heldout_corruptions": ["fog"]}, "fashion_mnist.heldout_corruptions"),
    ({"heldout_corruptions": ["impulse_noise"]}, "fashion_mnist.heldout_corruptions"),
    ({"pretrain_corruptions": ["sharpen"]}, "fashion_mnist.pretrain_corruptions"),
    ({"severities": [0]}, "fashion_mnist.severities"),
    ({"pretrain_styles": ["cartoon"]}, "fashion_mnist.pretrain_styles"),
    ({"test_per_class": 1001}, "fashion_mnist.test_per_class"),
    ({"pretrain_per_class": 2000}, "fashion_mnist"),
])
def test_bad_options_name_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key):
        small(tmp_path, **overrides)


def test_fake_copy_too_small_for_the_split_says_so(fake_root):
    with pytest.raises(ValueError, match="needs"):
        fm.render_split(small(fake_root, train_per_class=39), "val")


def test_corruption_leaves_numpys_global_generator_alone():
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    image = np.full((32, 32, 3), 128, dtype=np.uint8)
    a = fm.corrupt(image, "gaussian_noise", 3, seed=7)
    assert np.array_equal(np.random.random(3), expected)
    assert np.array_equal(a, fm.corrupt(image, "gaussian_noise", 3, seed=7))
    assert not np.array_equal(a, fm.corrupt(image, "gaussian_noise", 3, seed=8))


def test_registry_serves_the_splits_through_the_loader(fake_root):
    spec = get_dataset("fashion_mnist")
    assert spec.eval_splits == ("test", "corrupted", "inverted", "sketch")
    options = spec.options({"root": str(fake_root), "train_per_class": 2, "val_per_class": 1, "test_per_class": 1,
                            "pretrain_per_class": 1})
    data = spec.load("sketch", lambda image: np.asarray(image), options)
    image, label = data[3]
    assert len(data) == N_CLASSES and image.shape == (32, 32, 3) and label == 3
    assert spec.pretrain_corpus is not None


@pytest.mark.skipif(not Path(fm.DEFAULT_ROOT).is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_the_debian_copy_reads_as_published():
    images, labels = fm.read_part(fm.DEFAULT_ROOT, "t10k")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.array_equal(np.bincount(labels), np.full(N_CLASSES, 1000))
    train_images, train_labels = fm.read_part(fm.DEFAULT_ROOT, "train")
    assert train_images.shape == (60000, 28, 28) and np.array_equal(np.bincount(train_labels), np.full(N_CLASSES, 6000))


def test_pretraining_must_name_a_dataset_with_a_corpus():
    from saeft.stages.pretrain import PretrainConfig

    assert PretrainConfig(dataset="fashion_mnist").dataset == "fashion_mnist"
    with pytest.raises(ConfigError, match="pretrain.dataset.*fashion_mnist, shapes"):
        PretrainConfig(dataset="imagenet")


def test_overlapping_families_fail_the_dry_run_naming_the_key(tmp_path):
    import yaml

    from test_workflow import snakemake

    config = yaml.safe_load((Path(__file__).parent / "data" / "fashion_mnist_ci.yaml").read_text())
    config["fashion_mnist"]["heldout_corruptions"] = ["gaussian_noise"]  # also a pretraining family
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(config))
    with pytest.raises(AssertionError, match="fashion_mnist.heldout_corruptions: gaussian_noise also in"):
        snakemake(tmp_path, "-n", "--cores", "1", config=study)
