"""The study config (``config.yaml``, ``--configfile``, ``--config``): every section's dataclass
composed into one, the schema generated from it, and the checks across sections.

:func:`validate_config` is what the workflow runs before any job: command-line strings typed by
the schema, every schema violation reported by key, Snakemake's own ``validate`` applying the
generated schema (which fills the defaults), then the dataclasses' cross-key checks. The schema
file ``workflow/schemas/config.schema.json`` is written by ``saeft schema`` (a test keeps it in
step with the dataclasses). Imports no torch."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Annotated, Any

from saeft.config.aggregate import AggregateConfig
from saeft.config.base import ConfigError, NonNegInt, Schema, StageConfig, check_schema, require, schema_checked, schema_of
from saeft.config.calibration import CalibrationConfig
from saeft.config.finetune import RUN_KEYS, FinetuneConfig, split_run_params
from saeft.config.stages import (
    PRETRAIN_SOURCE,
    AnalysisConfig,
    CacheConfig,
    EvaluateConfig,
    ModelConfig,
    Name,
    PretrainConfig,
    SAETrainConfig,
    SelectionConfig,
    pretrained_kind,
)
from saeft.data.fashion_mnist import FashionMNISTConfig
from saeft.data.samples import RealDataOptions
from saeft.data.synthetic import WorldConfig

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.json"
"""The generated schema file that the workflow validates with."""

def _dataset_names(on_disk: bool | None = None) -> list[str]:
    from saeft.data.registry import REGISTRY

    return [name for name, spec in REGISTRY.items() if on_disk is None or spec.on_disk == on_disk]


def _datasets_schema() -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string", "enum": _dataset_names()}, "minItems": 1, "uniqueItems": True}


def _data_schema() -> dict[str, Any]:
    options = schema_of(RealDataOptions)
    options["properties"].pop("data_root")
    options.pop("description", None)
    return {"type": "object", "propertyNames": {"enum": _dataset_names(on_disk=True)}, "additionalProperties": options}


def _transfer_schema() -> dict[str, Any]:
    targets = {"type": "array", "items": {"type": "string", "enum": _dataset_names(on_disk=True)}, "uniqueItems": True}
    return {"type": "object", "propertyNames": {"enum": _dataset_names()}, "additionalProperties": targets}


def _methods_schema() -> dict[str, Any]:
    """One property per registered method: its parameters, plus for trained methods per-dataset
    overrides of them (``datasets``) and variants (``grid``, ``variants``: saeft.plan.variants)."""
    from saeft.methods import all_methods

    properties = {}
    for name, method in all_methods().items():
        entry = schema_of(method.params)
        if method.trained:
            overrides = schema_of(method.params, defaults=False)
            overrides.pop("description", None)
            entry["properties"].update(_variant_schemas(overrides, name))
        entry["description"] = method.summary
        properties[name] = entry
    return {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": properties}


def _variant_schemas(params: dict[str, Any], method: str) -> dict[str, Any]:
    """``datasets`` (per-dataset overrides), ``grid`` (values per key) and ``variants`` (named
    parameter sets) of the trained method ``method`` whose parameters have the schema ``params``.
    A grid or a named variant may also set the finetune keys of one run (:data:`RUN_KEYS`, typed
    as in the ``finetune`` section, without defaults so that none is filled in); a method
    parameter of the same name would be ambiguous, and is an error naming it."""
    finetune = schema_of(FinetuneConfig, defaults=False)["properties"]
    clash = sorted(set(RUN_KEYS) & set(params["properties"]))
    if clash:
        raise ValueError(f"methods.{method}: parameter(s) {', '.join(clash)} are also finetune keys a variant may set "
                         "(saeft.config.finetune.RUN_KEYS): rename the method's parameter")
    keys = {**params["properties"], **{key: finetune[key] for key in RUN_KEYS}}
    grid = {key: {"type": "array", "items": prop, "minItems": 1} for key, prop in keys.items()}
    named = {**params, "properties": {"name": {"type": "string", "pattern": "^[a-z0-9_]+$"}, **keys},
             "required": ["name"]}
    return {
        "datasets": {"type": "object", "additionalProperties": params, "description": "per-dataset overrides of these keys"},
        "grid": {"type": "object", "additionalProperties": False, "properties": grid, "minProperties": 1,
                 "description": "values to try per key (the method's parameters, or the finetune keys "
                                f"{', '.join(RUN_KEYS)}): every combination is a variant <method>@<key>=<value>,... "
                                "with its own runs; the reported one is selected on ID validation (selection)"},
        "variants": {"type": "array", "items": named, "minItems": 1,
                     "description": "named variants <method>@<name>, each with its own values of these keys "
                                    f"(or of the finetune keys {', '.join(RUN_KEYS)})"},
    }


@dataclasses.dataclass
class StudyConfig(StageConfig):
    """saeft study configuration. Every section is optional and takes the defaults shown; unknown
    keys are errors."""

    study: Name = "default"
    """Name of the study; outputs go to results/<study>/ and MLflow experiment <study>."""
    seeds: Annotated[list[NonNegInt], Schema(min_items=1, unique_items=True)] = dataclasses.field(default_factory=lambda: [0, 1])
    """Fine-tuning seeds; tables report mean and std over them."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The CLIP model."""
    synthetic: WorldConfig = dataclasses.field(default_factory=WorldConfig)
    """The procedural shapes world (dataset 'shapes' and pretrain_clip's corpus)."""
    fashion_mnist: FashionMNISTConfig = dataclasses.field(default_factory=FashionMNISTConfig)
    """Fashion-MNIST and its shifted test sets."""
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    """Contrastive pretraining (rule pretrain_clip)."""
    datasets: list[str] = dataclasses.field(default_factory=lambda: ["shapes"], metadata={"schema": _datasets_schema})
    """Datasets to fine-tune on; each brings its own evaluation splits (all but shapes and
    fashion_mnist are read from data_root)."""
    data_root: str | None = None
    """Folder holding the real datasets in their documented layouts (docs/real_data.md, 'Real datasets');
    never downloaded by the pipeline; override with --config data_root=/path."""
    data: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={"schema": _data_schema})
    """Per-dataset options of datasets read from data_root."""
    transfer: dict[str, list[str]] = dataclasses.field(default_factory=dict, metadata={"schema": _transfer_schema})
    """Per fine-tuned dataset, datasets whose test split every model of it is also evaluated on,
    through the transfer set's zero-shot text head (role 'transfer', outside the OOD average)."""
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    """Embedding caches (rules cache_activations, cache_views)."""
    sae: SAETrainConfig = dataclasses.field(default_factory=SAETrainConfig)
    """The sparse autoencoder trained on each dataset's zero-shot embeddings (defaults of every
    sweep entry)."""
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    """Fine-tuning settings shared by every method."""
    methods: dict[str, Any] = dataclasses.field(default_factory=lambda: {"ft": {}, "saeft": {}},
                                                metadata={"schema": _methods_schema})
    """Methods to run, each with its own hyper-parameters (per-dataset overrides under
    'datasets'); zero-shot is always evaluated; 'wiseft' adds evaluation-only interpolations."""
    selection: SelectionConfig = dataclasses.field(default_factory=SelectionConfig)
    """How the reported variant of a method with several is chosen."""
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    """Evaluation settings."""
    aggregate: AggregateConfig = dataclasses.field(default_factory=AggregateConfig)
    """Display options of the tables and figures."""
    analysis: AnalysisConfig = dataclasses.field(default_factory=AnalysisConfig)
    """The feature analysis."""
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    """Whether the world reproduces robust fine-tuning's known effects (rule calibrate); the
    comparison gives no reading where a gate criterion fails."""

    def validate(self) -> None:
        _check_methods(self)
        _check_selection(self)
        _check_sae_sizes(self)
        _check_data(self)


def study_schema() -> dict[str, Any]:
    """The JSON schema of a study config (draft 2020-12), generated from :class:`StudyConfig`."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema_of(StudyConfig)}


def schema_text() -> str:
    """The schema file's text: JSON, which Snakemake's ``validate`` reads ten times faster than
    the same schema in YAML."""
    note = {"$comment": "Generated from the config dataclasses by `saeft schema --write`: do not edit by hand."}
    return json.dumps({**note, **study_schema()}, indent=1) + "\n"


def coerce_strings(config: Any, schema: dict[str, Any]) -> Any:
    """``config`` with strings typed where the schema wants a number, an integer, a boolean or
    null: Snakemake reads nested ``--config`` values (``finetune={lr: 0.01}``) as strings."""
    import yaml

    if isinstance(config, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        return {key: coerce_strings(value, props.get(key, extra if isinstance(extra, dict) else {}))
                for key, value in config.items()}
    if isinstance(config, list):  # a nullable list's items are in its anyOf (selection.seeds)
        items = schema.get("items") or next((o["items"] for o in schema.get("anyOf", []) if "items" in o), {})
        return [coerce_strings(value, items) for value in config]
    if isinstance(config, str):
        kinds = schema.get("type", [])
        kinds = {kinds} if isinstance(kinds, str) else set(kinds)
        for option in schema.get("anyOf", []):
            kinds |= {option["type"]} if isinstance(option.get("type"), str) else set(option.get("type", []))
        if kinds & {"number", "integer", "boolean", "null"}:
            try:
                value = yaml.safe_load(config)
            except yaml.YAMLError:
                return config
            if isinstance(value, str) and kinds & {"number"}:
                try:  # YAML 1.1 reads 1e-3 as a string
                    value = float(value)
                except ValueError:
                    return config
            wanted = {"number": (int, float), "integer": (int,), "boolean": (bool,), "null": (type(None),)}
            if any(isinstance(value, wanted[k]) and not (k != "boolean" and isinstance(value, bool))
                   for k in kinds if k in wanted):
                return value
    return config


def load_schema(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The generated schema file (a test keeps it equal to :func:`study_schema`)."""
    with open(path or SCHEMA_PATH) as handle:
        return json.load(handle)


def validate_config(config: dict[str, Any], schema_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check ``config`` in place, fill its defaults and return it; a :class:`ConfigError` names
    every bad key. The schema is the generated file, which Snakemake's ``validate`` applies (and
    which fills the defaults); then the dataclasses run their cross-key checks."""
    from snakemake.utils import validate

    schema = load_schema(schema_path)
    config.update(coerce_strings(config, schema))
    check_schema(config, schema)
    validate(config, str(schema_path or SCHEMA_PATH), set_default=True)
    with schema_checked():
        StudyConfig.from_dict(copy.deepcopy(config))
    return config


def _check_methods(cfg: StudyConfig) -> None:
    """Every variant of every trained method (and its per-dataset overrides, on datasets of the
    study) passes the method's dataclass; ``sae`` names a sweep SAE; WiSE-FT interpolates
    methods or variants the study trains."""
    from saeft.methods import get_method
    from saeft.plan.variants import expand

    trained = [m for m in cfg.methods if get_method(m).trained]
    require(bool(trained), "methods", "lists no trained method (wiseft alone interpolates nothing)")
    sweep = [entry["name"] for entry in cfg.sae.sweep]
    variants: list[str] = []
    for name in trained:
        entry, method = cfg.methods[name], get_method(name)
        overrides = entry.get("datasets", {})
        for dataset in overrides:
            require(dataset in cfg.datasets, f"methods.{name}.datasets.{dataset}", "not a dataset of this study")
        try:
            expanded = expand(name, entry)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        variants += expanded
        for variant, base in expanded.items():
            note = "" if variant == name else f" (variant {variant})"
            for at, values in [(f"methods.{name}", base)] + [(f"methods.{name}.datasets.{d}", {**base, **o}) for d, o in overrides.items()]:
                values = split_run_params(values)[1]  # the finetune keys are typed by the schema
                try:
                    method.params.from_dict(values, at + ".")
                except ConfigError as exc:
                    raise ConfigError(f"{exc}{note}") from None
                sae = values.get("sae")
                require(sae is None or sae in sweep, f"{at}.sae", f"{sae!r} is not in sae.sweep (names: {', '.join(sweep) or 'none'}){note}")
    if "wiseft" in cfg.methods:
        get_method("wiseft").params.from_dict(cfg.methods["wiseft"], "methods.wiseft.")
    for base in cfg.methods.get("wiseft", {}).get("base", []):
        require(base in trained or base in variants, "methods.wiseft.base",
                f"{base!r} is not a trained method or variant of this study (methods: {', '.join(trained)})")


def _check_selection(cfg: StudyConfig) -> None:
    """Selection seeds are seeds of the study."""
    extra = sorted(set(cfg.selection.seeds or []) - set(cfg.seeds))
    require(not extra, "selection.seeds", f"{extra} are not in seeds {cfg.seeds}")


def embed_dim(model_name: str) -> int | None:
    """The embedding width of an open_clip architecture, read from its JSON config without
    importing open_clip; None when the name is not a known architecture."""
    import importlib.util

    assets = Path(__file__).resolve().parents[1] / "assets"
    spec = importlib.util.find_spec("open_clip")
    folders = [assets] + ([Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])] if spec else [])
    for folder in folders:
        path = folder / f"{model_name}.json"
        if path.is_file():
            return int(json.loads(path.read_text())["embed_dim"])
    return None


def _check_sae_sizes(cfg: StudyConfig) -> None:
    """Top-k must fit the dictionary: k <= expansion x the model's embedding width."""
    dim = embed_dim(cfg.model.name)
    if dim is None:
        return
    entries = [("sae", cfg.sae)] + [(f"sae.sweep.{i}", entry) for i, entry in enumerate(cfg.sae.sweep_configs().values())]
    for where, entry in entries:
        features = entry.expansion * dim
        require(entry.k <= features, f"{where}.k", f"{entry.k} is larger than the dictionary "
                f"(expansion {entry.expansion} x {dim}-dim embeddings = {features} features)")


def _check_data(cfg: StudyConfig) -> None:
    """Datasets on disk need ``data_root``; ``data`` and ``transfer`` name datasets of the study;
    a transfer set's name must not shadow an eval split of the dataset it is evaluated from; a
    class subset names classes of its dataset and leaves every split a class."""
    from saeft.data.registry import get_dataset

    on_disk = [d for d in cfg.datasets if get_dataset(d).on_disk]
    for source, targets in cfg.transfer.items():
        require(source in cfg.datasets, f"transfer.{source}", f"not a dataset of this study (datasets: {', '.join(cfg.datasets)})")
        require(source not in targets, f"transfer.{source}", f"lists {source} itself (its own eval splits are evaluated anyway)")
        shadowed = set(targets) & set(get_dataset(source).eval_splits)
        require(not shadowed, f"transfer.{source}", f"{', '.join(sorted(shadowed))} is also an eval split of {source}")
        on_disk += [t for t in targets if get_dataset(t).on_disk]
    require(not on_disk or bool(cfg.data_root), "data_root",
            f"not set, but {', '.join(sorted(set(on_disk)))} are read from it (--config data_root=/path)")
    from saeft.data.subset import check_reductions

    for name, options in cfg.data.items():
        require(name in on_disk, f"data.{name}", "not a dataset (or transfer set) of this study read from data_root")
        check_reductions(name, get_dataset(name), options or {})


__all__ = ["ConfigError", "PRETRAIN_SOURCE", "SCHEMA_PATH", "StudyConfig", "coerce_strings", "embed_dim",
           "pretrained_kind", "schema_text", "study_schema", "validate_config"]
