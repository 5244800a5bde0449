"""Class subsets, image caps and template counts of datasets on disk (``data.<dataset>.classes``,
``max_images_per_class``, ``templates``) on the fixture data root in the real layouts: what each
split keeps and how it is relabelled, the 200-class masks and ObjectNet's projection in the
subset's label space, heads and scores of a subset, and the errors that name the key."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_data import build_data_root  # noqa: E402

from saeft.config import ConfigError  # noqa: E402
from saeft.config.study import validate_config  # noqa: E402
from saeft.data import imagenet  # noqa: E402
from saeft.data.registry import get_dataset  # noqa: E402
from saeft.data.samples import RealDataOptions  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "config"
# tench (0) and stingray (6): in ImageNet-R and -A but not ObjectNet; broom (462), wine bottle
# (907), banana (954): in all three.
SUBSET = ["broom", 0, "wine bottle", 6, "Banana"]
LABELS = (0, 6, 462, 907, 954)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_root")
    build_data_root(root, per_class=2)
    return root


def _options(root, **keys):
    return RealDataOptions(data_root=str(root), **keys)


def test_imagenet_subset_relabels_every_split_in_dataset_order(data_root):
    options = _options(data_root, classes=SUBSET)
    spec = get_dataset("imagenet", options)
    full = get_dataset("imagenet")
    assert spec.classnames == tuple(full.classnames[i] for i in LABELS)  # dataset order, not the list's
    assert spec.templates == full.templates
    for split in ("train", "val", "imagenet_v2", "imagenet_sketch"):
        found = spec.read(split, options)
        assert found.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4], split
        everything = full.read(split, options)
        for file, label in zip(found.files, found.labels):  # the same files, labels mapped
            assert everything.labels[everything.files.index(file)] == LABELS[label]
    # ImageNet-R/-A: their 200 classes minus those not chosen; logits restricted to the chosen ones.
    sub_r = imagenet.class_sublist("imagenet_r")
    for split in ("imagenet_r", "imagenet_a"):
        kept = [label for label in imagenet.class_sublist(split) if label in LABELS]
        hooks = spec.evalset(split)
        assert hooks.class_subset == tuple(LABELS.index(label) for label in kept)
        assert spec.evalset_classnames(split) == tuple(full.classnames[label] for label in kept)
        found = spec.read(split, options)
        assert found.labels.tolist() == [j for j in range(len(kept)) for _ in range(2)]
        # fixture folder i of ImageNet-R is the class class_sublist[i]: its files keep their class
        expected_folders = [f"n{sub_r.index(label) if split == 'imagenet_r' else imagenet.class_sublist(split).index(label):08d}" for label in kept]
        assert sorted({f.parent.name for f in found.files}) == expected_folders
    # ObjectNet: the classes mapping to a chosen ImageNet class, projected from those alone.
    hooks = spec.evalset("objectnet")
    assert spec.evalset_classnames("objectnet") == ("Banana", "Broom", "Wine bottle")
    assert hooks.projection == ((4,), (2,), (3,))
    found = spec.read("objectnet", options)
    assert found.labels.tolist() == [0, 0, 1, 1, 2, 2] and found.crop_border == imagenet.OBJECTNET_BORDER


def test_projection_keeps_the_chosen_members_of_a_group():
    from saeft.data.registry import EvalSet
    from saeft.data.subset import _eval_classes

    hooks = EvalSet(projection=((1, 5), (2,), (7, 8)), classnames=("a", "b", "c"))
    kept, reduced = _eval_classes(hooks, (2, 5, 8))
    assert kept == [0, 1, 2] and reduced.projection == ((1,), (0,), (2,)) and reduced.classnames == ("a", "b", "c")
    kept, reduced = _eval_classes(hooks, (5,))
    assert kept == [0] and reduced.projection == ((0,),) and reduced.classnames == ("a",)


def test_image_cap_and_templates(data_root):
    options = _options(data_root, max_images_per_class=1, templates=2)
    spec = get_dataset("imagenet", options)
    assert spec.templates == get_dataset("imagenet").templates[:2] and len(spec.classnames) == 1000
    assert len(spec.read("train", options)) == 1000
    assert len(spec.read("imagenet_r", options)) == 200
    capped = get_dataset("fmow", options).read("test", options)
    full = get_dataset("fmow").read("test", options)
    assert len(full) == 16 and len(capped) == 2  # two categories, one image each
    assert capped.groups.tolist() == full.groups[[0, 1]].tolist()  # the first rows, regions with them
    # Both together: the cap counts images of the subset's classes.
    both = _options(data_root, classes=["cat", "dog"], max_images_per_class=1)
    assert get_dataset("cifar10", both).read("train", both).labels.tolist() == [0, 1]


def test_wilds_and_transfer_sets_keep_their_metric_and_groups(data_root):
    options = _options(data_root, classes=["dam"])
    spec = get_dataset("fmow", options)
    assert spec.classnames == ("dam",) and spec.metric == "worst_region_acc"
    found = spec.read("id_test", options)
    assert set(found.labels.tolist()) == {0} and len(found) == 8 and found.group_names == get_dataset("fmow").read("id_test", options).group_names
    iwildcam = get_dataset("iwildcam", _options(data_root, classes=[2, 1]))
    assert len(iwildcam.classnames) == 2 and iwildcam.read("test", _options(data_root, classes=[2, 1])).labels.tolist() == [0, 0, 1, 1]
    cifar = _options(data_root, classes=["truck", "airplane"])
    spec = get_dataset("cifar10", cifar)
    assert spec.classnames == ("airplane", "truck")
    for split in ("test", "cifar10_1", "cifar10_2"):
        assert spec.read(split, cifar).labels.tolist() == [0, 0, 1, 1]
    assert get_dataset("stl10", _options(data_root, classes=["monkey"])).read("test", _options(data_root, classes=["monkey"])).labels.tolist() == [0, 0]


def test_check_reads_the_whole_split(data_root):
    options = _options(data_root, classes=[0], expected_images={"val": 2000})
    assert get_dataset("imagenet").check("val", options)["images"] == 2000


@pytest.mark.parametrize("classes, message", [
    (["not a class"], r"data.imagenet.classes: 'not a class' is not a class of imagenet \(1000 classes"),
    ([1000], r"data.imagenet.classes: label index 1000 is outside 0..999"),
    (["missile"], r"'missile' names 2 classes of imagenet \(labels 657, 744\); give the label index"),
    ([0, 6], r"data.imagenet.classes: no chosen class is among the classes of imagenet/objectnet"),
    ([], r"data.imagenet.classes: an empty class list keeps nothing"),
])
def test_paper_config_rejects_bad_subsets_naming_the_key(classes, message):
    config = yaml.safe_load((CONFIGS / "paper_vitb32.yaml").read_text())
    config["data_root"] = "/data"
    config["data"] = {"imagenet": {"classes": classes}}
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_paper_config_accepts_a_subset_of_every_dataset():
    config = yaml.safe_load((CONFIGS / "paper_vitb32.yaml").read_text())
    config["data_root"] = "/data"
    config["data"] = {"imagenet": {"classes": SUBSET, "templates": 2}, "iwildcam": {"classes": [0, 1]},
                      "cifar100": {"classes": ["apple"], "max_images_per_class": 3}}
    validate_config(config)
    config["data"]["fmow"] = {"classes": ["castle"]}
    with pytest.raises(ConfigError, match=r"data.fmow.classes: 'castle' is not a class of fmow"):
        validate_config(config)


def test_head_and_scores_of_a_subset(data_root, tmp_path, clip_file):
    """The head has a row per chosen class from the first N templates; ImageNet-R's score is the
    hand-computed one over the chosen classes in its 200."""
    import torch

    from saeft.infra.io import load_tensors
    from saeft.nn.models import classifier_from_zeroshot, load_clip, preprocess_for, zeroshot_head
    from saeft.stages import evaluate
    from saeft.stages.prepare import run_head

    options = _options(data_root, classes=SUBSET, templates=2)
    head = tmp_path / "imagenet.safetensors"
    assert run_head(clip_file, "imagenet", head, options) == {"n_classes": 5, "n_templates": 2}
    weights, meta = load_tensors(head)
    spec = get_dataset("imagenet", options)
    assert weights["weight"].shape[0] == 5 and meta["classnames"] == list(spec.classnames)
    model, arch = load_clip(clip_file)
    expected = zeroshot_head(model, arch, spec.classnames, get_dataset("imagenet").templates[:2])
    assert torch.allclose(weights["weight"], expected)

    out = tmp_path / "evals.json"
    result = evaluate.run(clip_file, head, "imagenet", ["imagenet_r", "objectnet"], options, evaluate.EvaluateConfig(batch_size=8),
                          out, {"study": "t", "model": "m", "method": "zeroshot", "seed": None})
    classifier = classifier_from_zeroshot(clip_file, head)[0]
    data = spec.load("imagenet_r", preprocess_for(classifier.visual), options)
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = np.array([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        logits = classifier(images)[0][:, list(spec.evalset("imagenet_r").class_subset)]
    assert result["imagenet_r"]["n"] == len(labels) == 8
    assert result["imagenet_r"]["value"] == pytest.approx(float((logits.argmax(1).numpy() == labels).mean()))
    assert result["imagenet_r"]["classnames"] == list(spec.evalset_classnames("imagenet_r"))
    assert result["objectnet"]["n"] == 6 and result["objectnet"]["classnames"] == ["Banana", "Broom", "Wine bottle"]
