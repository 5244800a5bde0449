"""CIFAR-10/-100 and their shifts CIFAR-10.1/-10.2, STL-10, DTD and EuroSAT from their release
formats under ``data_root``. Imports no torch.

The CIFAR python batches are pickles: they are read with :class:`_ArrayUnpickler`, which builds
only builtin containers and numpy arrays and refuses every other class, so a tampered file cannot
run code. CIFAR-10.1/-10.2 are ``.npy``/``.npz`` files read with ``allow_pickle=False``.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from saeft.data.samples import DatasetLayoutError, RealDataOptions, Samples, class_folders, folder_samples, require_dir, require_file

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy", "bridge",
    "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach",
    "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree",
    "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel",
    "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor", "train",
    "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
DTD_CLASSES = (
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched", "crystalline",
    "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid", "grooved", "honeycombed", "interlaced", "knitted",
    "lacelike", "lined", "marbled", "matted", "meshed", "paisley", "perforated", "pitted", "pleated", "polka-dotted", "porous",
    "potholed", "scaly", "smeared", "spiralled", "sprinkled", "stained", "stratified", "striped", "studded", "swirly",
    "veined", "waffled", "woven", "wrinkled", "zigzagged",
)
EUROSAT_FOLDERS = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
                   "Residential", "River", "SeaLake")
EUROSAT_CLASSES = ("annual crop land", "forest", "brushland or shrubland", "highway or road",
                   "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
                   "residential buildings or homes or apartments", "river", "lake or sea")
"""EuroSAT's folders in label order and the class names prompts use for them."""

EUROSAT_TEST_EVERY = 5
"""EuroSAT has no official split: every 5th image of each class (sorted by name) is 'test'."""

PATHS = {
    "cifar10": "cifar-10-batches-py",
    "cifar10_1": "cifar10.1",
    "cifar10_2": "cifar10.2",
    "cifar100": "cifar-100-python",
    "stl10": "stl10_binary",
    "dtd": "dtd",
    "eurosat": "eurosat/2750",
}
"""Folder of each dataset under ``data_root``."""

EXPECTED_IMAGES = {
    "cifar10": {"train": 50_000, "test": 10_000, "cifar10_1": 2_000, "cifar10_2": 2_000},
    "cifar100": {"train": 50_000, "test": 10_000},
    "stl10": {"train": 5_000, "test": 8_000},
    "dtd": {"train": 1_880, "val": 1_880, "test": 1_880},
    "eurosat": {"train": 21_600, "test": 5_400},
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles builtin containers, bytes and numpy arrays only (what the CIFAR batches hold)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}:
            return _reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 stores bytes written by Python 3
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: CIFAR batches hold only arrays and lists")


def _reconstruct(cls: type, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's array-unpickling constructor, for ndarray only."""
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def read_cifar_batch(path: Path) -> dict[str, Any]:
    """One CIFAR python batch as a dict with str keys, read without running pickled code."""
    require_file(path, "a CIFAR python batch")
    data = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    if not isinstance(data, dict):
        raise DatasetLayoutError(f"{path}: not a CIFAR batch (a {type(data).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _cifar_images(batch: dict[str, Any], path: Path) -> np.ndarray:
    data = np.asarray(batch.get("data"), dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetLayoutError(f"{path}: 'data' is not an (N, 3072) uint8 array")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def read_cifar(dataset: str, split: str, options: RealDataOptions) -> Samples:
    """CIFAR-10 (splits train, test, cifar10_1, cifar10_2) or CIFAR-100 (train, test)."""
    if split in ("cifar10_1", "cifar10_2"):
        return _read_cifar10_shift(split, options)
    root = require_dir(options.root / PATHS[dataset], f"the {dataset} python version")
    if dataset == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        key = "labels"
    else:
        names = [split]
        key = "fine_labels"
    images, labels = [], []
    for name in names:
        batch = read_cifar_batch(root / name)
        images.append(_cifar_images(batch, root / name))
        labels.append(np.asarray(batch.get(key, []), dtype=np.int64))
        if len(labels[-1]) != len(images[-1]):
            raise DatasetLayoutError(f"{root / name}: {len(images[-1])} images but {len(labels[-1])} '{key}'")
    return Samples(labels=np.concatenate(labels), images=np.concatenate(images), source=f"{root}[{split}]")


def _read_cifar10_shift(split: str, options: RealDataOptions) -> Samples:
    root = require_dir(options.root / PATHS[split], f"{split} as numpy files")
    if split == "cifar10_1":
        images = np.load(require_file(root / "cifar10.1_v6_data.npy", "CIFAR-10.1 v6 images"), allow_pickle=False)
        labels = np.load(require_file(root / "cifar10.1_v6_labels.npy", "CIFAR-10.1 v6 labels"), allow_pickle=False)
    else:
        with np.load(require_file(root / "cifar102_test.npz", "CIFAR-10.2 test set (images, labels)"), allow_pickle=False) as npz:
            if not {"images", "labels"} <= set(npz.files):
                raise DatasetLayoutError(f"{root / 'cifar102_test.npz'}: needs arrays 'images' and 'labels', has {npz.files}")
            images, labels = npz["images"], npz["labels"]
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
        raise DatasetLayoutError(f"{root}: images must be uint8 (N, 32, 32, 3), got {images.dtype} {images.shape}")
    return Samples(labels=labels.astype(np.int64), images=images, source=f"{root}[{split}]")


def read_stl10(split: str, options: RealDataOptions) -> Samples:
    """STL-10 (binary version): ``{split}_X.bin`` uint8 images stored channel-first, column-major;
    ``{split}_y.bin`` labels 1..10."""
    root = require_dir(options.root / PATHS["stl10"], "STL-10 binary version")
    raw = np.fromfile(require_file(root / f"{split}_X.bin", f"STL-10 {split} images"), dtype=np.uint8)
    labels = np.fromfile(require_file(root / f"{split}_y.bin", f"STL-10 {split} labels"), dtype=np.uint8).astype(np.int64) - 1
    if raw.size != len(labels) * 3 * 96 * 96:
        raise DatasetLayoutError(f"{root}/{split}_X.bin: {raw.size} bytes do not hold {len(labels)} 96x96 RGB images")
    images = raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
    return Samples(labels=labels, images=np.ascontiguousarray(images), source=f"{root}[{split}]")


def read_dtd(split: str, options: RealDataOptions) -> Samples:
    """DTD, partition 1: ``labels/{split}1.txt`` lists ``class/file.jpg`` under ``images/``."""
    root = require_dir(options.root / PATHS["dtd"], "DTD: images/<class>/ and labels/")
    listing = require_file(root / "labels" / f"{split}1.txt", f"the DTD {split} list of partition 1")
    images = require_dir(root / "images", "one folder per texture class")
    files, labels = [], []
    for line in listing.read_text().split():
        texture = line.split("/")[0]
        if texture not in DTD_CLASSES:
            raise DatasetLayoutError(f"{listing}: unknown class {texture!r} in {line!r}")
        files.append(images / line)
        labels.append(DTD_CLASSES.index(texture))
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DatasetLayoutError(f"{listing}: {len(missing)} listed image(s) are missing, e.g. {missing[0]}")
    return Samples(labels=np.asarray(labels, dtype=np.int64), files=files, source=f"{root}[{split}]")


def read_eurosat(split: str, options: RealDataOptions) -> Samples:
    """EuroSAT RGB: ``2750/<Class>/*.jpg``; split by :data:`EUROSAT_TEST_EVERY`."""
    root = options.root / PATHS["eurosat"]
    folders = class_folders(root, len(EUROSAT_FOLDERS), "one folder per EuroSAT class")
    names = [f.name for f in folders]
    if tuple(names) != EUROSAT_FOLDERS:
        raise DatasetLayoutError(f"{root}: class folders {names} differ from {list(EUROSAT_FOLDERS)}")
    samples = folder_samples(folders, range(len(folders)), f"{root}[{split}]")
    assert samples.files is not None
    rank = np.zeros(len(samples), dtype=np.int64)  # position of each image within its class
    for label in range(len(folders)):
        where = np.flatnonzero(samples.labels == label)
        rank[where] = np.arange(len(where))
    keep = (rank % EUROSAT_TEST_EVERY == 0) if split == "test" else (rank % EUROSAT_TEST_EVERY != 0)
    return Samples(labels=samples.labels[keep], files=[f for f, k in zip(samples.files, keep) if k], source=samples.source)
