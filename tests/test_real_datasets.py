"""Real datasets on a fixture data root in their on-disk layouts: readers, checks, hooks, metrics."""

from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_data import build_data_root  # noqa: E402

from saeft.data import imagenet, smallsets  # noqa: E402
from saeft.data.registry import REGISTRY, EvalSet, fill_template, get_dataset  # noqa: E402
from saeft.data.samples import DatasetLayoutError, RealDataOptions  # noqa: E402


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_root")
    counts = build_data_root(root, per_class=2)
    return root, counts


def options(root: Path, counts: dict[str, int] | None = None) -> RealDataOptions:
    return RealDataOptions(data_root=str(root), expected_images=dict(counts or {}))


@pytest.mark.parametrize("dataset", ["imagenet", "iwildcam", "fmow", "cifar10", "cifar100", "stl10", "dtd", "eurosat"])
def test_every_split_checks_and_counts(fixture_root, dataset):
    root, counts = fixture_root
    spec = get_dataset(dataset)
    for split in spec.splits:
        found = spec.check(split, options(root, counts[dataset]))
        assert found["images"] == counts[dataset][split], (dataset, split)
        samples = spec.read(split, options(root))
        assert samples.labels.dtype == np.int64
        assert samples.labels.min() >= 0 and samples.labels.max() < len(spec.evalset_classnames(split))


def test_imagenet_labels_follow_sorted_folders(fixture_root):
    root, _ = fixture_root
    spec = get_dataset("imagenet")
    val = spec.read("val", options(root))
    assert np.array_equal(val.labels, np.repeat(np.arange(1000), 2))
    assert val.files[0].parent.name == "n00000000" and val.files[-1].parent.name == "n00000999"
    v2 = spec.read("imagenet_v2", options(root))
    # Folders 0..999 by number, not by name (sorted as strings, '10' would come before '2').
    assert v2.files[2 * 10].parent.name == "10" and v2.labels[2 * 10] == 10
    r = spec.read("imagenet_r", options(root))
    assert np.array_equal(r.labels, np.repeat(np.arange(200), 2))
    objectnet = spec.read("objectnet", options(root))
    names = imagenet.objectnet_mapping()[0]
    assert len(names) == 113 and len(objectnet) == 226  # the unmapped air_freshener folder is left out
    assert objectnet.files[0].parent.name == names[0] == "alarm_clock"
    assert objectnet.crop_border == 2


def test_objectnet_border_is_cropped(fixture_root):
    from saeft.data.arrays import samples_dataset

    root, _ = fixture_root
    data = samples_dataset(get_dataset("imagenet").read("objectnet", options(root)), transform=np.asarray)
    image, label = data[0]
    assert image.shape == (12, 12, 3)  # 16 px with a 2 px red frame
    assert not (image == [255, 0, 0]).all(axis=-1).any() and label == 0


def test_wilds_splits_labels_and_regions(fixture_root):
    root, _ = fixture_root
    cam = get_dataset("iwildcam").read("test", options(root))
    assert sorted(set(cam.labels.tolist())) == [1, 2, 3] and all(f.name.startswith("test_") for f in cam.files)
    fmow = get_dataset("fmow")
    test = fmow.read("test", options(root))
    # FMoW test (OOD): original 'test' rows from 2016 on; 4 countries x 2 categories x 2 each.
    assert len(test) == 16 and {test.group_names[g] for g in test.groups} == {"Europe", "Africa", "Americas", "Other"}
    assert set(test.labels.tolist()) == {0, 12}  # airport, dam
    id_test = fmow.read("id_test", options(root))
    rows = [int(f.stem.split("_")[-1]) for f in id_test.files]
    assert rows == sorted(rows) and len(rows) == 16  # the 2012 'test' rows, images named by metadata row


def test_cifar_and_stl_arrays_round_trip(fixture_root):
    root, _ = fixture_root
    train = get_dataset("cifar10").read("train", options(root))
    assert train.images.shape == (100, 32, 32, 3) and train.images.dtype == np.uint8
    assert np.array_equal(np.bincount(train.labels), np.full(10, 10))
    stl = get_dataset("stl10").read("test", options(root))
    assert np.array_equal(stl.images, np.load(root / "stl10_binary" / "test_reference.npy"))
    assert np.array_equal(stl.labels, np.repeat(np.arange(10), 2))
    assert len(get_dataset("cifar10").read("cifar10_2", options(root))) == 20


def test_cifar_unpickler_refuses_other_classes(tmp_path):
    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle shutil.rmtree"):
        smallsets.read_cifar_batch(path)
    assert (tmp_path / "victim").is_dir()


def test_eurosat_split_is_disjoint_and_deterministic(fixture_root):
    root, _ = fixture_root
    spec = get_dataset("eurosat")
    train, test = spec.read("train", options(root)), spec.read("test", options(root))
    assert not set(train.files) & set(test.files)
    assert test.files == spec.read("test", options(root)).files


def test_check_names_the_missing_folder(fixture_root, tmp_path):
    root, counts = fixture_root
    spec = get_dataset("imagenet")
    with pytest.raises(DatasetLayoutError, match=r"imagenet-a: missing folder"):
        spec.check("imagenet_a", options(tmp_path))
    copy = tmp_path / "copy"
    shutil.copytree(root / "imagenet-r", copy / "imagenet-r")
    shutil.rmtree(copy / "imagenet-r" / "n00000007")
    with pytest.raises(DatasetLayoutError, match=r"imagenet-r: expected 200 class folders .* found 199"):
        spec.check("imagenet_r", options(copy))
    for image in (copy / "imagenet-r" / "n00000008").iterdir():
        image.unlink()
    shutil.copytree(root / "imagenet-r" / "n00000007", copy / "imagenet-r" / "n00000007")
    with pytest.raises(DatasetLayoutError, match=r"n00000008: class folder holds no images"):
        spec.check("imagenet_r", options(copy))
    shutil.copytree(root / "objectnet-1.0", copy / "objectnet-1.0")
    shutil.rmtree(copy / "objectnet-1.0" / "images" / "banana")
    with pytest.raises(DatasetLayoutError, match=r"missing ObjectNet class folder\(s\) banana"):
        spec.check("objectnet", options(copy))


def test_check_counts_default_to_the_release(fixture_root):
    root, counts = fixture_root
    with pytest.raises(DatasetLayoutError, match=r"holds 400 images, expected 30000 .*expected_images.imagenet_r"):
        get_dataset("imagenet").check("imagenet_r", options(root))
    found = get_dataset("imagenet").check("imagenet_r", options(root, {"imagenet_r": 400}))
    assert found["classes_present"] == found["classes"] == 200


def test_check_names_missing_wilds_images(fixture_root, tmp_path):
    root, counts = fixture_root
    shutil.copytree(root / "fmow_v1.1", tmp_path / "fmow_v1.1")
    (tmp_path / "fmow_v1.1" / "images" / "rgb_img_0.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 image\(s\) listed in the metadata are missing, e.g. .*rgb_img_0.png"):
        get_dataset("fmow").check("train", options(tmp_path, counts["fmow"]))
    (tmp_path / "fmow_v1.1" / "country_code_mapping.csv").unlink()
    with pytest.raises(DatasetLayoutError, match=r"country_code_mapping.csv: missing file"):
        get_dataset("fmow").check("test", options(tmp_path))


def test_hooks_restrict_and_project_logits():
    import torch

    from saeft.nn.metrics import eval_logits

    logits = torch.arange(1000, dtype=torch.float32).repeat(2, 1)
    logits[1, 6] = 5000.0  # class 6 is ImageNet-A's first class
    hooks = get_dataset("imagenet").evalset("imagenet_a")
    masked = eval_logits(logits, hooks)
    assert masked.shape == (2, 200)
    assert masked[0].argmax() == 199 and masked[1].argmax() == 0
    assert get_dataset("imagenet").evalset_classnames("imagenet_a")[0] == imagenet.classnames()[6]
    # ObjectNet: per class the max over its ImageNet classes; 'Alarm clock' = analog (409) or digital (530).
    objectnet = get_dataset("imagenet").evalset("objectnet")
    logits = torch.zeros(1, 1000)
    logits[0, 530] = 3.0
    logits[0, 954] = 2.0  # banana
    projected = eval_logits(logits, objectnet)
    assert projected.shape == (1, 113)
    assert projected[0, 0] == 3.0 and projected[0, 2] == 2.0 and projected[0].argmax() == 0
    toy = EvalSet(projection=((0, 2), (1,)))
    assert eval_logits(torch.tensor([[1.0, 5.0, 7.0]]), toy).tolist() == [[7.0, 5.0]]
    with pytest.raises(ValueError, match="not both"):
        EvalSet(class_subset=(0,), projection=((0,),))


def test_macro_f1_and_worst_region_by_hand():
    from saeft.nn.metrics import group_accuracies, macro_f1, worst_group_accuracy

    target = np.array([0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 3])  # class 3 never occurs: no F1 of its own
    # class 0: tp1 fp0 fn1 -> 2/3; class 1: tp2 fp1 fn0 -> 4/5; class 2: tp0 -> 0.
    assert macro_f1(predicted, target) == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    groups = np.array([0, 0, 1, 1, 2])
    per = group_accuracies(predicted, target, groups, ("Asia", "Europe", "Other", "Africa"))
    assert per == {"Asia": {"accuracy": 0.5, "n": 2}, "Europe": {"accuracy": 1.0, "n": 2}, "Other": {"accuracy": 0.0, "n": 1}}
    assert worst_group_accuracy(per, exclude=("Other",)) == 0.5
    assert worst_group_accuracy(per) == 0.0


def test_registry_is_consistent():
    assert fill_template("a photo of {a_c}.", "owl") == "a photo of an owl."
    for spec in REGISTRY.values():
        if spec.name not in ("imagenet", "iwildcam"):  # their reference name lists repeat a few names
            assert len(set(spec.classnames)) == len(spec.classnames), spec.name
        for split in spec.eval_splits:
            hooks = spec.evalset(split)
            for index in hooks.class_subset or ():
                assert 0 <= index < len(spec.classnames)
            for group in hooks.projection or ():
                assert all(0 <= index < len(spec.classnames) for index in group)
    assert len(smallsets.CIFAR100_CLASSES) == 100 and len(smallsets.DTD_CLASSES) == 47
    assert get_dataset("iwildcam").metric == "macro_f1" and len(get_dataset("iwildcam").classnames) == 182
    assert len(get_dataset("fmow").classnames) == 62


def test_registry_import_stays_torch_free():
    import subprocess

    code = "import sys, saeft.data.registry, saeft.config.study; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_check_data_cli_writes_marker_or_fails_naming_the_path(fixture_root, tmp_path, caplog):
    import json

    from saeft.cli import main

    root, counts = fixture_root
    opts = json.dumps({"data_root": str(root), "expected_images": counts["dtd"]})
    out = tmp_path / "checks" / "dtd" / "test.json"
    assert main(["check-data", "--dataset", "dtd", "--dataset-options", opts, "--split", "test", "--out", str(out)]) == 0
    marker = json.loads(out.read_text())
    assert marker["images"] == counts["dtd"]["test"] and marker["classes_present"] == 47
    missing = json.dumps({"data_root": str(tmp_path / "nowhere")})
    assert main(["check-data", "--dataset", "dtd", "--dataset-options", missing, "--split", "test", "--out", str(tmp_path / "x.json")]) == 2
    assert f"{tmp_path / 'nowhere' / 'dtd'}: missing folder" in caplog.text
    assert not (tmp_path / "x.json").exists()


def test_an_undecodable_image_is_named_by_the_check_and_the_loader(fixture_root, tmp_path):
    root, counts = fixture_root
    copy = tmp_path / "copy"
    shutil.copytree(root / "imagenet-r", copy / "imagenet-r")
    spec = get_dataset("imagenet")
    bad = sorted((copy / "imagenet-r" / "n00000003").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:30])  # a truncated file: its header still opens
    expected = {"imagenet_r": counts["imagenet"]["imagenet_r"]}
    spec.check("imagenet_r", options(copy, expected))  # the default check does not read the pixels
    strict = RealDataOptions(data_root=str(copy), expected_images=expected, verify_images=True)
    with pytest.raises(DatasetLayoutError, match=rf"imagenet/imagenet_r: image files that do not decode: {bad}"):
        spec.check("imagenet_r", strict)
    data = spec.load("imagenet_r", lambda image: image, options(copy, expected))
    index = [str(f) for f in data.files].index(str(bad))
    with pytest.raises(ValueError, match=rf"{bad}: image does not decode"):
        data[index]
