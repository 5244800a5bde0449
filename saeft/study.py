"""Loading and validating a study config against ``workflow/schemas/config.schema.yaml``.

Used by the Snakefile when it loads (so a bad config fails before any job starts) and by tests.
Errors name the key path, e.g. ``finetune.lr: 'fast' is not of type 'number'``. Defaults from the
schema are filled in, so every stage sees a complete config. Imports no torch: dry runs stay fast.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from saeft.config import ConfigError

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
PRETRAIN_SOURCE = "pretrain_clip"
"""The ``model.pretrained`` value meaning: weights come from the pipeline's own pretrain_clip rule."""

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


def pretrained_kind(pretrained: str | None) -> str:
    """Classify a ``model.pretrained`` value: 'pipeline', 'file', 'tag' or 'none'."""
    if pretrained is None:
        return "none"
    if pretrained == PRETRAIN_SOURCE:
        return "pipeline"
    if pretrained.endswith(CHECKPOINT_SUFFIXES) or os.sep in pretrained:
        return "file"
    return "tag"


def load_schema(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The config JSON schema (draft-07)."""
    return yaml.safe_load(Path(path or SCHEMA_PATH).read_text())


def _with_defaults(validator_class: type) -> type:
    """A validator that also fills in ``default`` values of missing properties (a default must
    stand beside any ``$ref``, not in the referenced definition)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator: Any, properties: dict[str, Any], instance: Any, schema: dict[str, Any]) -> Any:
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def validate_config(config: dict[str, Any], schema_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Validate ``config`` in place, fill defaults, and return it; raise ConfigError naming keys."""
    schema = load_schema(schema_path)
    # First report errors on the config as given, then fill defaults (which are valid).
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{_key(e)}: {_message(e)}" for e in errors]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
    _with_defaults(jsonschema.Draft7Validator)(schema).validate(config)
    _check_methods(config)
    _check_views(config)
    _check_sae_sizes(config)
    _check_data(config)
    return config


ASSETS = Path(__file__).resolve().parent / "assets"


def embed_dim(model_name: str) -> int | None:
    """The embedding width of an open_clip architecture, read from its JSON config without
    importing open_clip (dry runs stay fast); None when the name is not a known architecture."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("open_clip")
    folders = [ASSETS] + [Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])] if spec else [ASSETS]
    for folder in folders:
        path = folder / f"{model_name}.json"
        if path.is_file():
            return int(json.loads(path.read_text())["embed_dim"])
    return None


def _check_sae_sizes(config: dict[str, Any]) -> None:
    """Top-k must fit the dictionary: k <= expansion x the model's embedding width."""
    dim = embed_dim(config.get("model", {}).get("name", ""))
    if dim is None:
        return
    sae = config.get("sae", {})
    entries = [("sae", sae)] + [(f"sae.sweep.{i}", {**sae, **entry}) for i, entry in enumerate(sae.get("sweep", []))]
    for where, entry in entries:
        features = entry["expansion"] * dim
        if entry["k"] > features:
            raise ConfigError(f"{where}.k: {entry['k']} is larger than the dictionary "
                              f"(expansion {entry['expansion']} x {dim}-dim embeddings = {features} features)")


def _check_views(config: dict[str, Any]) -> None:
    """A teacher cache can only hold a finite set of views."""
    finetune = config.get("finetune", {})
    if finetune.get("teacher") == "cache" and finetune.get("augment", "none") != "none" and finetune.get("views", 0) == 0:
        raise ConfigError("finetune.teacher: 'cache' needs views a cache can hold: set finetune.views >= 1 "
                          "(a bank of views) or finetune.augment: none, or use teacher: live")


def _check_data(config: dict[str, Any]) -> None:
    """Datasets on disk need ``data_root``; ``data`` and ``transfer`` name datasets of the study;
    a transfer set's name must not shadow an eval split of the dataset it is evaluated from."""
    from saeft.data.registry import get_dataset

    datasets = config.get("datasets", [])
    on_disk = [d for d in datasets if get_dataset(d).on_disk]
    for source, targets in config.get("transfer", {}).items():
        if source not in datasets:
            raise ConfigError(f"transfer.{source}: not a dataset of this study (datasets: {', '.join(datasets)})")
        if source in targets:
            raise ConfigError(f"transfer.{source}: lists {source} itself (its own eval splits are evaluated anyway)")
        shadowed = set(targets) & set(get_dataset(source).eval_splits)
        if shadowed:
            raise ConfigError(f"transfer.{source}: {', '.join(sorted(shadowed))} is also an eval split of {source}")
        on_disk += [t for t in targets if get_dataset(t).on_disk]
    if on_disk and not config.get("data_root"):
        raise ConfigError(f"data_root: not set, but {', '.join(sorted(set(on_disk)))} are read from it (--config data_root=/path)")
    for name in config.get("data", {}):
        if name not in on_disk:
            raise ConfigError(f"data.{name}: not a dataset (or transfer set) of this study read from data_root")


def _check_methods(config: dict[str, Any]) -> None:
    """Cross-key rules the schema cannot state: WiSE-FT interpolates methods the study trains,
    per-dataset overrides name datasets of the study, a method's ``sae`` names a sweep entry."""
    methods = config.get("methods", {})
    trained = [m for m in methods if m != "wiseft"]
    if not trained:
        raise ConfigError("methods: lists no trained method (wiseft alone interpolates nothing)")
    for base in methods.get("wiseft", {}).get("base", []):
        if base not in trained:
            raise ConfigError(f"methods.wiseft.base: {base!r} is not a trained method of this study (trained: {', '.join(trained)})")
    sweep = [entry["name"] for entry in config.get("sae", {}).get("sweep", [])]
    for method in trained:
        overrides = methods[method].get("datasets", {})
        for dataset in overrides:
            if dataset not in config.get("datasets", []):
                raise ConfigError(f"methods.{method}.datasets.{dataset}: not a dataset of this study")
        for where, entry in [(f"methods.{method}", methods[method])] + [
            (f"methods.{method}.datasets.{d}", o) for d, o in overrides.items()
        ]:
            if "sae" in entry and entry["sae"] not in sweep:
                raise ConfigError(f"{where}.sae: {entry['sae']!r} is not in sae.sweep (names: {', '.join(sweep) or 'none'})")


def _key(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return ".".join(filter(None, [path, extra[0] if len(extra) == 1 else "{" + ",".join(extra) + "}"]))
    return path or "(top level)"


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        return f"unknown key (allowed here: {allowed})"
    return error.message
