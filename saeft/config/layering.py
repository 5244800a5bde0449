"""How a study's config is layered, the Snakemake way, and the two rules that keep it safe.

The workflow loads the default study (``config/config.yaml``); ``--configfile`` files merge over
it key by key, then ``--config`` (Snakemake's ``update_config``); the schema fills what no layer
sets. Two rules on top:

- **A study lists its own methods.** A config file that sets ``methods`` replaces the default
  study's methods whole (``--config`` entries still merge over the file's): merging would add the
  default study's baselines and grids to every study.
- **A changed study needs a name.** Config files that change the default study but name no
  ``study`` are refused: their results would overwrite ``results/default/``.

Plain Python (yaml only), so the Snakefile can import it.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import yaml

from saeft.config.base import ConfigError

REPLACED_WHOLE = ("methods",)
"""Top-level sections that a config file replaces instead of merging into."""


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A config file as a mapping; a syntax error names the file, line and column."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections (study, seeds, ...), got {type(data).__name__}")
    return data


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``config`` as dotted key -> leaf value (lists and empty mappings are leaves)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat(value, name + "."))
        else:
            out[name] = value
    return out


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Dotted keys whose value differs between two configs (added and removed ones too)."""
    a, b = flat(before), flat(after)
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))


def replace_listed_sections(config: dict[str, Any], files: dict[str, dict[str, Any]], overrides: dict[str, Any]) -> None:
    """Where a config file sets a section of :data:`REPLACED_WHOLE`, the merged ``config`` keeps
    only what the files and ``--config`` (``overrides``: Snakemake's merge of both) give it."""
    for section in REPLACED_WHOLE:
        if any(section in data for data in files.values()):
            config[section] = copy.deepcopy(overrides[section])


def check_study_named(config: dict[str, Any], default: dict[str, Any], files: dict[str, dict[str, Any]],
                      overrides: dict[str, Any]) -> None:
    """Refuse config files that change the default study without naming a study of their own.

    ``--config`` alone may change the default study (Snakemake then reruns the jobs whose keys
    changed); a file is a study, and writing it over ``results/<default>/`` is never meant."""
    if not files or "study" in overrides or config.get("study") != default.get("study"):
        return
    changed = changed_keys(default, config)
    if not changed:
        return
    shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
    names = ", ".join(files)
    raise ConfigError(f"study: {names} change(s) the default study ({shown}) but name no study, so the run would "
                      f"rerun and overwrite results/{default.get('study')}/. Add 'study: <name>' to {names} "
                      f"(or pass --config study=<name>).")
