"""Config validation at load time: the default config is valid; bad ones name the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from saeft.config import ConfigError
from saeft.config.study import validate_config

ROOT = Path(__file__).resolve().parent.parent


def default_config():
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def test_default_config_is_valid_and_gets_defaults():
    config = validate_config(default_config())
    assert config["study"] == "default"
    assert len(config["seeds"]) >= 2
    assert config["evaluate"]["batch_size"] >= 1
    assert config["finetune"]["label_smoothing"] == 0.0  # filled from the schema


def test_empty_config_takes_every_default():
    config = validate_config({})
    assert config["model"]["pretrained"] == "pretrain_clip"
    assert set(config["methods"]) == {"ft", "saeft"}


def test_every_method_and_wiseft_defaults_validate():
    from saeft.methods import trained_methods

    config = validate_config({"methods": {**{m: {} for m in trained_methods()}, "wiseft": {}}})
    assert config["methods"]["wiseft"] == {"base": ["ft"], "alphas": [0.0, 0.25, 0.5, 0.75, 1.0], "alpha": 0.5}


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        (("finetune", "lr"), "fast", "finetune.lr"),
        (("finetune", "lr"), -1.0, "finetune.lr"),
        (("finetune", "epochs"), 2.5, "finetune.epochs"),
        (("seeds",), ["a"], "seeds.0"),
        (("seeds",), [0, 1.5], "seeds.1"),
        (("sae", "k"), 0, "sae.k"),
        (("sae", "normalize"), "l1", "sae.normalize"),
        (("methods", "saeft", "lambda_remove"), -0.1, "methods.saeft.lambda_remove"),
        (("methods", "saeft", "lamda"), 1.0, "methods.saeft.lamda"),
        (("methods", "magic"), {}, "methods.magic"),
        (("methods", "zeroshot"), {}, "methods.zeroshot"),
        (("methods", "l2sp", "lambda"), -1.0, "methods.l2sp.lambda"),
        (("methods", "ldifs", "taps"), [], "methods.ldifs.taps"),
        (("methods", "lpft", "lp_epochs"), 0, "methods.lpft.lp_epochs"),
        (("methods", "saeft", "datasets", "shapes", "lambda"), -5, "methods.saeft.datasets.shapes.lambda"),
        (("methods", "wiseft", "alpha"), 1.5, "methods.wiseft.alpha"),
        (("methods", "wiseft", "alphas"), [0.5, -0.1], "methods.wiseft.alphas.1"),
        (("methods", "wiseft", "base"), ["magic"], "methods.wiseft.base"),
        (("methods", "wiseft", "base"), ["lp"], "methods.wiseft.base"),
        (("methods", "saeft", "datasets", "imagenet"), {}, "methods.saeft.datasets.imagenet"),
        (("finetune", "teacher"), "oracle", "finetune.teacher"),
        (("finetune", "precision"), "fp8", "finetune.precision"),
        (("finetune", "augment"), "mixup", "finetune.augment"),
        (("finetune", "crop_scale"), 0, "finetune.crop_scale"),
        (("finetune", "views"), -1, "finetune.views"),
        (("synthetic", "spurious"), 2.0, "synthetic.spurious"),
        (("finetune", "learning_rate"), 0.1, "finetune.learning_rate"),
        (("colour",), "red", "colour"),
        (("datasets",), ["imagenet_typo"], "datasets.0"),
        (("study",), "a b", "study"),
    ],
)
def test_bad_values_name_the_key(path, value, key):
    config = default_config()
    node = config
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    with pytest.raises(ConfigError) as info:
        validate_config(copy.deepcopy(config))
    assert f"{key}:" in str(info.value)


# Through Snakemake, one error of each kind (a bad type, a cross-key check); every other key is
# checked in process above (each case here starts a Snakemake: ~11 s of CI).
@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("finetune: {lr: fast}", "finetune.lr"),
        ("sae: {expansion: 1, k: 500}", "sae.k: 500 is larger than the dictionary"),
    ],
)
def test_snakemake_refuses_a_bad_config_before_any_job(tmp_path, text, key):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text(text + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", "--replace-workflow-config", "--configfile", str(bad), "-d", str(tmp_path / "w")],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert key in result.stdout + result.stderr
    assert not (tmp_path / "w" / "results").exists() and not (tmp_path / "w" / "mlflow.db").exists()


def test_a_method_may_name_an_sae_of_the_sweep():
    config = default_config()
    config["sae"]["sweep"] = [*config["sae"].get("sweep", []), {"name": "x8", "expansion": 8}]
    config["methods"]["saeft"]["sae"] = "x8"
    validate_config(copy.deepcopy(config))
    # A grid may try dictionaries (null: the main sae:); each name must be in the sweep.
    config["methods"]["saeft"]["grid"] = {"lambda": [1], "sae": [None, "x8"]}
    validate_config(copy.deepcopy(config))
    from saeft.plan.variants import expand

    variants = expand("saeft", config["methods"]["saeft"])
    assert variants["saeft@lambda=1,sae=null"]["sae"] is None and variants["saeft@lambda=1,sae=x8"]["sae"] == "x8"
    config["methods"]["saeft"]["grid"] = {"lambda": [1], "sae": ["x16"]}
    with pytest.raises(ConfigError, match=r"methods.saeft.sae: 'x16' is not in sae.sweep .*variant saeft@lambda=1,sae=x16"):
        validate_config(copy.deepcopy(config))
    del config["methods"]["saeft"]["grid"]
    config["methods"]["saeft"]["sae"] = "x16"
    with pytest.raises(ConfigError, match="methods.saeft.sae: 'x16' is not in sae.sweep"):
        validate_config(copy.deepcopy(config))
    config["methods"]["ft"]["sae"] = "x8"
    with pytest.raises(ConfigError, match="methods.ft.sae"):
        validate_config(copy.deepcopy(config))


def test_a_teacher_cache_needs_a_bank_when_views_are_augmented():
    config = default_config()
    config["finetune"].update(teacher="cache", augment="crop_flip", views=0)
    with pytest.raises(ConfigError, match="finetune.teacher: 'cache' needs views a cache can hold"):
        validate_config(copy.deepcopy(config))
    config["finetune"]["views"] = 4
    validate_config(copy.deepcopy(config))


def test_k_larger_than_the_dictionary_fails_at_load():
    config = default_config()  # saeft-vit-p4: 64-dim embeddings
    config["sae"].update(expansion=1, k=65)
    with pytest.raises(ConfigError, match=r"sae.k: 65 is larger than the dictionary \(expansion 1 x 64-dim"):
        validate_config(copy.deepcopy(config))
    config["sae"]["k"] = 64
    kept = config["sae"].get("sweep", [])  # the default study's own entries stay (its grid names them)
    config["sae"]["sweep"] = [*kept, {"name": "wide", "expansion": 4}, {"name": "dense", "k": 1000}]
    with pytest.raises(ConfigError, match=f"sae.sweep.{len(kept) + 1}.k: 1000"):
        validate_config(copy.deepcopy(config))
    config["model"]["name"] = "ViT-B-16"  # 512-dim: k 129 at expansion 1 fits
    config["sae"].update(k=129, sweep=[*kept, {"name": "wide", "expansion": 4}])
    validate_config(copy.deepcopy(config))


def test_the_schema_file_is_generated_from_the_dataclasses():
    """workflow/schemas/config.schema.json is what `saeft schema --write` makes of the config
    dataclasses now: a key added to a dataclass without regenerating it fails here."""
    from saeft.config.study import SCHEMA_PATH, schema_text

    assert SCHEMA_PATH.read_text() == schema_text(), "stale schema: run `saeft schema --write`"


def test_nested_command_line_strings_are_typed_by_the_schema():
    from saeft.config.study import coerce_strings, study_schema

    typed = coerce_strings({"finetune": {"lr": "1e-3", "epochs": "2", "compile": "true"}, "seeds": ["0", "1"],
                            "methods": {"ldifs": {"taps": "null"}}, "study": "123"}, study_schema())
    assert typed == {"finetune": {"lr": 0.001, "epochs": 2, "compile": True}, "seeds": [0, 1],
                     "methods": {"ldifs": {"taps": None}}, "study": "123"}
    with pytest.raises(ConfigError, match="finetune.lr: must be a number, got 'fast'"):
        validate_config({"finetune": {"lr": "fast"}})


@pytest.mark.parametrize("name", ["paper_vitb16", "paper_vitb32", "fashion_mnist"])
def test_shipped_studies_inherit_nothing_they_use_from_the_default_study(name):
    """Merged over config/config.yaml (as the workflow does), each shipped study resolves to what
    its file alone says: only sections it never reads (the shapes world; pretraining, for a study
    on downloaded weights) may differ."""
    from snakemake.utils import update_config

    from saeft.config.layering import changed_keys, load_yaml, replace_listed_sections

    own = {**load_yaml(ROOT / "config" / f"{name}.yaml"), "data_root": "/data"}
    merged = load_yaml(ROOT / "config" / "config.yaml")
    update_config(merged, copy.deepcopy(own))
    replace_listed_sections(merged, {name: own}, own)
    alone, merged = validate_config(copy.deepcopy(own)), validate_config(merged)
    unused = {"synthetic"} | ({"pretrain"} if alone["model"]["pretrained"] != "pretrain_clip" else set())
    leaked = [key for key in changed_keys(alone, merged) if key.split(".")[0] not in unused]
    assert not leaked, f"config/{name}.yaml inherits {leaked} from the default study: set them in the file"


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    from saeft.config.layering import load_yaml

    bad = tmp_path / "bad.yaml"
    bad.write_text("study: x\nfinetune:\n  lr: [1, 2\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line \d+, column \d+: not valid YAML"):
        load_yaml(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml: a config file must be a mapping"):
        load_yaml(listed)
