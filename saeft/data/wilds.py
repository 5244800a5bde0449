"""iWildCam and FMoW in the WILDS on-disk layout, read directly (no ``wilds`` package).

iWildCam (``iwildcam_v2.0/``): ``metadata.csv`` lists every image with its ``split`` (train,
id_val, id_test, val, test), label ``y`` and ``filename``; the images lie in ``train/``. The
182 labels are named by ``reference/iwildcam_labels.csv``.

FMoW (``fmow_v1.1/``): ``rgb_metadata.csv`` lists every image with its original ``split``,
``category``, ``country_code`` and ``timestamp``; image ``images/rgb_img_{i}.png`` is row ``i``
of that file. The WILDS splits follow from the year: train/id_val/id_test are the original
train/val/test images before 2013, val (OOD) the val images of 2013-2015, test (OOD) the test
images from 2016 on. Regions come from ``country_code_mapping.csv`` (columns ``alpha-3``,
``region``; unknown countries are 'Other', which the worst-region metric leaves out, as WILDS
does). Imports no torch.
"""

from __future__ import annotations

import csv
import functools
from importlib import resources
from pathlib import Path

import numpy as np

from saeft.data.samples import DatasetLayoutError, RealDataOptions, Samples, require_dir, require_file

IWILDCAM_DIR = "iwildcam_v2.0"
FMOW_DIR = "fmow_v1.1"
SPLITS = ("train", "id_val", "id_test", "val", "test")

IWILDCAM_EXPECTED = {"train": 129_809, "id_val": 7_314, "id_test": 8_154, "val": 14_961, "test": 42_791}
FMOW_EXPECTED = {"train": 76_863, "id_val": 11_483, "id_test": 11_327, "val": 19_915, "test": 22_108}
"""Split sizes of the WILDS releases (iWildCam v2.0, FMoW v1.1)."""

FMOW_REGIONS = ("Asia", "Europe", "Africa", "Americas", "Oceania", "Other")
FMOW_EXCLUDED_REGION = "Other"
FMOW_OOD_VAL_YEAR = 2013
FMOW_OOD_TEST_YEAR = 2016

FMOW_CATEGORIES = (
    "airport", "airport_hangar", "airport_terminal", "amusement_park", "aquaculture", "archaeological_site", "barn",
    "border_checkpoint", "burial_site", "car_dealership", "construction_site", "crop_field", "dam", "debris_or_rubble",
    "educational_institution", "electric_substation", "factory_or_powerplant", "fire_station", "flooded_road", "fountain",
    "gas_station", "golf_course", "ground_transportation_station", "helipad", "hospital", "impoverished_settlement",
    "interchange", "lake_or_pond", "lighthouse", "military_facility", "multi-unit_residential", "nuclear_powerplant",
    "office_building", "oil_or_gas_facility", "park", "parking_lot_or_garage", "place_of_worship", "police_station", "port",
    "prison", "race_track", "railway_bridge", "recreational_facility", "road_bridge", "runway", "shipyard", "shopping_mall",
    "single-unit_residential", "smokestack", "solar_farm", "space_facility", "stadium", "storage_tank", "surface_mine",
    "swimming_pool", "toll_booth", "tower", "tunnel_opening", "waste_disposal", "water_treatment_facility", "wind_farm", "zoo",
)
"""The 62 FMoW categories in WILDS label order."""


@functools.cache
def iwildcam_classnames() -> tuple[str, ...]:
    """The 182 iWildCam class names (English), in label order."""
    text = (resources.files("saeft") / "data" / "reference" / "iwildcam_labels.csv").read_text()
    rows = [row for row in csv.DictReader(text.splitlines()) if int(row["y"]) < 99999]
    rows.sort(key=lambda row: int(row["y"]))
    if [int(row["y"]) for row in rows] != list(range(len(rows))):
        raise ValueError("reference/iwildcam_labels.csv: labels y are not 0..N-1")
    return tuple(row["english"] for row in rows)


def fmow_classnames() -> tuple[str, ...]:
    return tuple(c.replace("_", " ") for c in FMOW_CATEGORIES)


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    require_file(path, "the WILDS metadata CSV")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetLayoutError(f"{path}: missing column(s) {', '.join(missing)}")
        return list(reader)


def _check_files(files: list[Path], source: str) -> None:
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DatasetLayoutError(
            f"{source}: {len(missing)} image(s) listed in the metadata are missing, e.g. {missing[0]}"
        )


def read_iwildcam(split: str, options: RealDataOptions) -> Samples:
    """The samples of WILDS split ``split`` of iWildCam."""
    if split not in SPLITS:
        raise ValueError(f"iwildcam has no split {split!r}; splits: {', '.join(SPLITS)}")
    root = require_dir(options.root / IWILDCAM_DIR, "iWildCam v2.0 in the WILDS layout: metadata.csv and train/")
    rows = [r for r in _read_csv(root / "metadata.csv", ("split", "y", "filename")) if r["split"] == split]
    images = require_dir(root / "train", "the iWildCam images named in metadata.csv")
    files = [images / r["filename"] for r in rows]
    _check_files(files, str(root))
    labels = np.asarray([int(r["y"]) for r in rows], dtype=np.int64)
    n_classes = len(iwildcam_classnames())
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DatasetLayoutError(f"{root / 'metadata.csv'}: label y outside 0..{n_classes - 1}")
    return Samples(labels=labels, files=files, source=f"{root}[{split}]")


def _year(timestamp: str, path: Path) -> int:
    try:
        return int(timestamp[:4])
    except ValueError:
        raise DatasetLayoutError(f"{path}: timestamp {timestamp!r} does not start with a year") from None


def read_fmow(split: str, options: RealDataOptions) -> Samples:
    """The samples of WILDS split ``split`` of FMoW, with their region as group."""
    if split not in SPLITS:
        raise ValueError(f"fmow has no split {split!r}; splits: {', '.join(SPLITS)}")
    root = require_dir(options.root / FMOW_DIR, "FMoW v1.1 in the WILDS layout: rgb_metadata.csv, country_code_mapping.csv, images/")
    metadata = root / "rgb_metadata.csv"
    rows = _read_csv(metadata, ("split", "category", "country_code", "timestamp"))
    region_of = {r["alpha-3"]: r["region"] for r in _read_csv(root / "country_code_mapping.csv", ("alpha-3", "region"))}
    original = {"train": "train", "id_val": "val", "id_test": "test", "val": "val", "test": "test"}[split]
    files, labels, groups = [], [], []
    images = require_dir(root / "images", "rgb_img_<row>.png for each row of rgb_metadata.csv")
    for index, row in enumerate(rows):
        if row["split"] != original:
            continue
        year = _year(row["timestamp"], metadata)
        period = "test" if year >= FMOW_OOD_TEST_YEAR else "val" if year >= FMOW_OOD_VAL_YEAR else "id"
        wanted = {"train": "id", "id_val": "id", "id_test": "id", "val": "val", "test": "test"}[split]
        if period != wanted:
            continue
        if row["category"] not in FMOW_CATEGORIES:
            raise DatasetLayoutError(f"{metadata}: row {index}: unknown category {row['category']!r}")
        region = region_of.get(row["country_code"], FMOW_EXCLUDED_REGION)
        if region not in FMOW_REGIONS:
            raise DatasetLayoutError(f"{root / 'country_code_mapping.csv'}: unknown region {region!r}")
        files.append(images / f"rgb_img_{index}.png")
        labels.append(FMOW_CATEGORIES.index(row["category"]))
        groups.append(FMOW_REGIONS.index(region))
    _check_files(files, str(root))
    return Samples(labels=np.asarray(labels, dtype=np.int64), files=files, groups=np.asarray(groups, dtype=np.int64),
                   group_names=FMOW_REGIONS, source=f"{root}[{split}]")
