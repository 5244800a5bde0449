"""Config machinery (:mod:`saeft.config.base`) and every stage's config dataclass
(:mod:`saeft.config.stages`): the one definition of each config key. Imports no torch."""

from saeft.config.base import (
    ConfigError,
    Fraction,
    NonNegFloat,
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    Schema,
    StageConfig,
    check_schema,
    require,
    schema_of,
)

__all__ = ["ConfigError", "Fraction", "NonNegFloat", "NonNegInt", "PositiveFloat", "PositiveInt", "Schema",
           "StageConfig", "check_schema", "require", "schema_of"]
