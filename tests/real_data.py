"""A tiny data root in the real on-disk layouts of every dataset saeft reads from ``data_root``.

Each class gets ``per_class`` small images (or array rows); :func:`build_data_root` returns the
image count of every split, for the config's ``data.<dataset>.expected_images``.
"""

from __future__ import annotations

import csv
import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from saeft.data import imagenet, smallsets, wilds

WNIDS = [f"n{index:08d}" for index in range(1000)]
"""Stand-in WordNet ids: only their sorted order matters."""


def _png(color: tuple[int, int, int], size: int = 12, border: int = 0) -> bytes:
    image = Image.new("RGB", (size, size), color)
    if border:
        framed = Image.new("RGB", (size + 2 * border, size + 2 * border), (255, 0, 0))
        framed.paste(image, (border, border))
        image = framed
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _folders(root: Path, names: list[str], per_class: int, suffix: str = ".JPEG", border: int = 0) -> int:
    for i, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        data = _png(((37 * i) % 256, 90, 160), border=border)
        for j in range(per_class):
            (folder / f"img_{j}{suffix}").write_bytes(data)
    return len(names) * per_class


def _pickle_batch(path: Path, images: np.ndarray, labels: list[int], key: str) -> None:
    # The CIFAR python format: a dict with bytes keys, 'data' (N, 3072) uint8 channel-first rows.
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    path.write_bytes(pickle.dumps({b"batch_label": b"fixture", key.encode(): labels, b"data": rows}, protocol=2))


def _cifar_arrays(n_classes: int, per_class: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    labels = [c for c in range(n_classes) for _ in range(per_class)]
    return rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels


def build_data_root(root: Path, per_class: int = 1) -> dict[str, dict[str, int]]:
    """Write every dataset's layout under ``root``; returns {dataset: {split: image count}}."""
    counts: dict[str, dict[str, int]] = {}
    f = imagenet.FOLDERS
    sub_r = WNIDS[:200]  # any 200 sorted ids stand for the R/A classes
    counts["imagenet"] = {
        "train": _folders(root / f["train"], WNIDS, per_class),
        "val": _folders(root / f["val"], WNIDS, per_class),
        "imagenet_v2": _folders(root / f["imagenet_v2"], [str(i) for i in range(1000)], per_class, ".jpeg"),
        "imagenet_r": _folders(root / f["imagenet_r"], sub_r, per_class, ".jpg"),
        "imagenet_sketch": _folders(root / f["imagenet_sketch"], WNIDS, per_class),
        "imagenet_a": _folders(root / f["imagenet_a"], sub_r, per_class, ".jpg"),
    }
    objectnet_folders = list(imagenet.objectnet_mapping()[0])
    counts["imagenet"]["objectnet"] = _folders(root / f["objectnet"], objectnet_folders, per_class, ".png", border=imagenet.OBJECTNET_BORDER)
    _folders(root / f["objectnet"], ["air_freshener"], per_class, ".png")  # unmapped: ignored

    # iWildCam: metadata.csv + train/<filename>; a few classes per split.
    base = root / wilds.IWILDCAM_DIR
    (base / "train").mkdir(parents=True)
    rows, counts["iwildcam"] = [], {}
    for split in wilds.SPLITS:
        for c in range(3):
            for j in range(per_class):
                name = f"{split}_{c}_{j}.jpg"
                (base / "train" / name).write_bytes(_png((c * 60, 20, 20)))
                rows.append({"split": split, "location_remapped": c, "y": c + 1, "filename": name})
        counts["iwildcam"][split] = 3 * per_class
    with (base / "metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["split", "location_remapped", "y", "filename"])
        writer.writeheader()
        writer.writerows(rows)

    # FMoW: rgb_metadata.csv rows i -> images/rgb_img_i.png; years place rows in WILDS splits.
    base = root / wilds.FMOW_DIR
    (base / "images").mkdir(parents=True)
    (base / "country_code_mapping.csv").write_text("alpha-3,region\nFRA,Europe\nKEN,Africa\nUSA,Americas\n")
    plan = [("train", 2010, "train"), ("val", 2011, "id_val"), ("test", 2012, "id_test"), ("val", 2014, "val"), ("test", 2017, "test")]
    rows, counts["fmow"] = [], {split: 0 for split in wilds.SPLITS}
    for original, year, split in plan:
        for country in ("FRA", "KEN", "USA", "XXX"):  # XXX: no region -> 'Other'
            for category in ("airport", "dam"):
                for _ in range(per_class):
                    rows.append({"split": original, "img_filename": "x", "category": category, "country_code": country,
                                 "timestamp": f"{year}-06-01T10:00:00Z"})
                    counts["fmow"][split] += 1
    rows.append({"split": "seq", "img_filename": "x", "category": "dam", "country_code": "FRA", "timestamp": "2010-01-01T00:00:00Z"})
    with (base / "rgb_metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["split", "img_filename", "category", "country_code", "timestamp"])
        writer.writeheader()
        writer.writerows(rows)
    for i, row in enumerate(rows):
        if row["split"] != "seq":
            (base / "images" / f"rgb_img_{i}.png").write_bytes(_png((10 * (i % 20), 100, 50)))

    # CIFAR-10/-100 python batches, CIFAR-10.1 (.npy), CIFAR-10.2 (.npz).
    cifar = root / smallsets.PATHS["cifar10"]
    cifar.mkdir(parents=True)
    for b in range(1, 6):
        _pickle_batch(cifar / f"data_batch_{b}", *_cifar_arrays(10, per_class, b), "labels")
    _pickle_batch(cifar / "test_batch", *_cifar_arrays(10, per_class, 9), "labels")
    shift = root / smallsets.PATHS["cifar10_1"]
    shift.mkdir(parents=True)
    images, labels = _cifar_arrays(10, per_class, 11)
    np.save(shift / "cifar10.1_v6_data.npy", images)
    np.save(shift / "cifar10.1_v6_labels.npy", np.asarray(labels, dtype=np.int64))
    shift = root / smallsets.PATHS["cifar10_2"]
    shift.mkdir(parents=True)
    images, labels = _cifar_arrays(10, per_class, 12)
    np.savez(shift / "cifar102_test.npz", images=images, labels=np.asarray(labels, dtype=np.int64))
    counts["cifar10"] = {"train": 50 * per_class, "test": 10 * per_class, "cifar10_1": 10 * per_class, "cifar10_2": 10 * per_class}
    c100 = root / smallsets.PATHS["cifar100"]
    c100.mkdir(parents=True)
    _pickle_batch(c100 / "train", *_cifar_arrays(100, per_class, 13), "fine_labels")
    _pickle_batch(c100 / "test", *_cifar_arrays(100, per_class, 14), "fine_labels")
    counts["cifar100"] = {"train": 100 * per_class, "test": 100 * per_class}

    # STL-10 binary: uint8 (N, 3, 96, 96) column-major per channel; labels 1..10.
    stl = root / smallsets.PATHS["stl10"]
    stl.mkdir(parents=True)
    rng = np.random.default_rng(15)
    for split in ("train", "test"):
        labels = np.repeat(np.arange(1, 11, dtype=np.uint8), per_class)
        images = rng.integers(0, 256, (len(labels), 96, 96, 3), dtype=np.uint8)
        images.transpose(0, 3, 2, 1).tofile(stl / f"{split}_X.bin")
        labels.tofile(stl / f"{split}_y.bin")
        np.save(stl / f"{split}_reference.npy", images)  # what the reader must give back
    counts["stl10"] = {"train": 10 * per_class, "test": 10 * per_class}

    # DTD: images/<class>/<class>_NNNN.jpg and labels/{train,val,test}1.txt.
    dtd = root / smallsets.PATHS["dtd"]
    (dtd / "labels").mkdir(parents=True)
    counts["dtd"] = {}
    for split in ("train", "val", "test"):
        lines = []
        for c, texture in enumerate(smallsets.DTD_CLASSES):
            (dtd / "images" / texture).mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                name = f"{texture}/{texture}_{split}_{j}.jpg"
                (dtd / "images" / name).write_bytes(_png((c * 5, 0, 0)))
                lines.append(name)
        (dtd / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
        counts["dtd"][split] = len(lines)

    # EuroSAT: 2750/<Class>/<Class>_N.jpg; 5 per class so that 1 in 5 is 'test'.
    _folders(root / smallsets.PATHS["eurosat"], list(smallsets.EUROSAT_FOLDERS), 5 * per_class, ".jpg")
    counts["eurosat"] = {"train": 40 * per_class, "test": 10 * per_class}
    return counts


def expected_images_config(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, dict[str, int]]]:
    """The ``data:`` config section that makes check_dataset accept the fixture counts."""
    return {dataset: {"expected_images": splits} for dataset, splits in counts.items()}
