"""Typed configs: each config key is defined once, as a field of a dataclass.

A field's type hint (with :class:`Schema` constraints in ``Annotated``), its default and its
docstring are the key's whole definition: :func:`schema_of` turns a dataclass into the JSON schema
that Snakemake's ``validate`` applies to the study config (``workflow/schemas/config.schema.json``
is generated from it), and :meth:`StageConfig.from_dict` checks a job's config against the same
schema. ``__post_init__`` holds only the checks a schema cannot state (one key against another).
Errors name the key (``finetune.lr: must be > 0, got -1``). Imports no torch.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import json
import textwrap
import types
import typing
from typing import Annotated, Any, Literal, TypeVar

T = TypeVar("T", bound="StageConfig")


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message names the key."""


def require(condition: bool, key: str, reason: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}: {reason}")


class Schema:
    """JSON-schema keywords that constrain a field, used as ``Annotated[int, Schema(minimum=1)]``
    (Python names ``exclusive_minimum``, ``min_items`` ... become ``exclusiveMinimum``, ``minItems``)."""

    def __init__(self, **keywords: Any) -> None:
        self._items = tuple(sorted((_camel(k), v) for k, v in keywords.items()))

    @property
    def keywords(self) -> dict[str, Any]:
        return dict(self._items)

    def __hash__(self) -> int:
        return hash(repr(self._items))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schema) and self._items == other._items

    def __repr__(self) -> str:
        return f"Schema({', '.join(f'{k}={v!r}' for k, v in self._items)})"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


PositiveInt = Annotated[int, Schema(minimum=1)]
NonNegInt = Annotated[int, Schema(minimum=0)]
PositiveFloat = Annotated[float, Schema(exclusive_minimum=0)]
NonNegFloat = Annotated[float, Schema(minimum=0)]
Fraction = Annotated[float, Schema(minimum=0, maximum=1)]


def key_of(field: dataclasses.Field) -> str:
    """The config key of a field: its name, or ``metadata['key']`` where the key is not a Python
    name (``lambda``)."""
    return field.metadata.get("key", field.name)


def config_fields(cls: type) -> list[dataclasses.Field]:
    """The fields a config file sets (``metadata['config'] = False`` marks job-level fields such
    as the seed, which rules set and a study config does not)."""
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("config", True)]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (and of its dataclass bases), by name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def type_schema(hint: Any) -> dict[str, Any]:
    """The JSON schema of a type hint: scalars, ``Literal``, unions with None, ``list``, ``dict``
    with string keys, nested dataclasses, ``Annotated`` with :class:`Schema` keywords."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        schema = type_schema(args[0])
        for extra in args[1:]:
            if isinstance(extra, Schema):
                schema.update(extra.keywords)
        return schema
    if hint is Any:
        return {}
    if hint is type(None):
        return {"type": "null"}
    if origin is Literal:
        kinds = sorted({_JSON_TYPES[type(a)] for a in args})
        return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [type_schema(a) for a in args]
        if all(set(o) == {"type"} for o in options):
            kinds = [t for o in options for t in ([o["type"]] if isinstance(o["type"], str) else o["type"])]
            return {"type": kinds}
        return {"anyOf": options}
    if origin in (list, tuple):
        return {"type": "array", "items": type_schema(args[0])} if args else {"type": "array"}
    if origin is dict:
        return {"type": "object", "additionalProperties": type_schema(args[1])}
    if dataclasses.is_dataclass(hint):
        return schema_of(hint)
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    raise TypeError(f"no JSON schema for type hint {hint!r}")


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return dataclasses.MISSING
    if dataclasses.is_dataclass(value):
        return {}  # its own fields carry their defaults
    return json.loads(json.dumps(value))


def schema_of(cls: type, defaults: bool = True, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON schema of a config dataclass: an object of its config fields, unknown keys
    refused; each property has the field's constraints, default and docstring (``exclude``: keys
    left out). A field's
    ``metadata['schema']`` (a dict, or a function returning one) replaces the schema of its type."""
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    properties: dict[str, Any] = {}
    required = []
    for field in config_fields(cls):
        if key_of(field) in exclude:
            continue
        override = field.metadata.get("schema")
        prop = dict(override() if callable(override) else override) if override is not None else type_schema(hints[field.name])
        default = _default(field)
        if default is dataclasses.MISSING:
            required.append(key_of(field))
        elif defaults:
            prop["default"] = default
        if field.name in docs:
            prop["description"] = docs[field.name]
        properties[key_of(field)] = prop
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        schema["description"] = " ".join(inspect.cleandoc(cls.__doc__).split())
    return schema


def schema_errors(data: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Every violation of ``schema`` by ``data``, each as ``key: reason`` (keys dotted, prefixed
    with ``where``), in key order."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{_error_key(e, where)}: {_error_reason(e)}" for e in errors]


def check_schema(data: Any, schema: dict[str, Any], where: str = "") -> None:
    """Raise :class:`ConfigError` listing every violation of ``schema`` by ``data``."""
    errors = schema_errors(data, schema, where)
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _error_key(error: Any, where: str) -> str:
    path = where + ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        key = extra[0] if len(extra) == 1 else "{" + ",".join(extra) + "}"
        return f"{path}.{key}" if path and not path.endswith(".") else path + key
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        key = missing[0] if len(missing) == 1 else "{" + ",".join(missing) + "}"
        return f"{path}.{key}" if path and not path.endswith(".") else path + key
    return path.rstrip(".") or "(top level)"


_TYPE_WORDS = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
               "array": "a list", "object": "a mapping", "null": "null"}


def _error_reason(error: Any) -> str:
    got = f"got {error.instance!r}"
    kind = error.validator
    if kind == "additionalProperties":
        return f"unknown key (allowed here: {', '.join(sorted(error.schema.get('properties', {})))})"
    if kind == "enum":
        return f"must be one of {', '.join(str(v) for v in error.validator_value)}, {got}"
    if kind == "type":
        wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return f"must be {' or '.join(_TYPE_WORDS.get(w, w) for w in wanted)}, {got}"
    bounds = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    if kind in bounds:
        return f"must be {bounds[kind]} {error.validator_value}, {got}"
    if kind == "required":
        return "missing (required)"
    if kind == "minItems":
        return f"must list at least {error.validator_value} item(s), {got}"
    return error.message


_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("schema_checked", default=False)
"""True while building configs from data already checked against the whole study's schema."""


@contextlib.contextmanager
def schema_checked() -> Any:
    """Within this block, config construction skips the per-field schema check (the caller has
    checked the data against a schema generated from the same dataclasses); ``validate()`` runs."""
    token = _CHECKED.set(True)
    try:
        yield
    finally:
        _CHECKED.reset(token)


@functools.cache
def _validation_schema(cls: type) -> dict[str, Any]:
    """``schema_of(cls)`` without defaults, plus the job-level fields (checked like the others)."""
    schema = schema_of(cls, defaults=False)
    hints = typing.get_type_hints(cls, include_extras=True)
    for field in dataclasses.fields(cls):
        if field.init and not field.metadata.get("config", True):
            schema["properties"][key_of(field)] = type_schema(hints[field.name])
    return schema


@dataclasses.dataclass
class StageConfig:
    """Base class: construction from a mapping, checked against the class's own schema.

    Construction (``from_dict`` or a plain call) checks every field against the schema of its
    type hint, naming keys under :attr:`section`, then runs :meth:`validate`, where a subclass
    states the checks that relate keys to each other."""

    section: typing.ClassVar[str] = ""
    """The config key of this section (``finetune``), prefixing key names in errors."""

    def __post_init__(self) -> None:
        if _CHECKED.get():
            self.validate()
            return
        # Nested sections checked themselves when they were built.
        nested = {key_of(f) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), StageConfig)}
        schema = dict(_validation_schema(type(self)))
        schema["properties"] = {k: v for k, v in schema["properties"].items() if k not in nested}
        schema.pop("required", None)
        own = {k: v for k, v in self.to_dict().items() if k not in nested}
        check_schema(own, schema, f"{self.section}." if self.section else "")
        self.validate()

    def validate(self) -> None:
        """Checks across keys, which a schema cannot state (none by default)."""

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None, where: str | None = None) -> T:
        """Build the config from ``data`` (config keys; missing ones take their defaults);
        ``where`` prefixes key names in errors (default: the section, e.g. ``sae.``)."""
        data = dict(data or {})
        where = f"{cls.section}." if where is None and cls.section else (where or "")
        if not _CHECKED.get():
            check_schema(data, _validation_schema(cls), where)
        names = {key_of(f): f.name for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            hint = hints[names[key]]
            if dataclasses.is_dataclass(hint) and isinstance(value, dict):
                value = hint.from_dict(value, f"{where}{key}.")
            kwargs[names[key]] = value
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[T], text: str, where: str | None = None) -> T:
        """Build the config from a JSON object string (what rules pass on the command line)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where or cls.section or cls.__name__}: config is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{where or cls.section or cls.__name__}: config must be a JSON object")
        return cls.from_dict(data, where)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-serialisable data, by config key."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, StageConfig):
                value = value.to_dict()
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[key_of(field)] = json.loads(json.dumps(value))
        return out
