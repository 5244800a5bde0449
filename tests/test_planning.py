"""Planning the workflow: thin rules, no heavy import while Snakemake builds the DAG, and typed
nested overrides from the command line (``--config "finetune={lr: 0.005}"``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULE_FILES = [ROOT / "workflow" / "Snakefile", *sorted((ROOT / "workflow" / "rules").rglob("*.smk"))]
# input, output, params, threads, log, benchmark, conda, resources, shell: each directive on a
# line of its own and its values below it, as snakefmt lays them out (tests/test_lint.py)
MAX_RULE_LINES = 20
HEAVY = ("torch", "pandas", "matplotlib")


def rule_blocks() -> dict[str, list[str]]:
    """Every rule's lines, by rule name: from its ``rule`` line to its last indented non-empty line."""
    blocks = {}
    for path in RULE_FILES:
        lines = path.read_text().splitlines()
        for start, line in enumerate(lines):
            match = re.match(r"(\s*)rule (\w+):", line)
            if not match:
                continue
            end = start
            for number in range(start + 1, len(lines)):
                text = lines[number]
                if text.strip() and len(text) - len(text.lstrip()) <= len(match[1]):
                    break
                if text.strip():
                    end = number
            blocks[f"{path.name}:{match[2]}"] = lines[start:end + 1]
    return blocks


def rule_lengths() -> dict[str, int]:
    return {name: len(lines) for name, lines in rule_blocks().items()}


def test_every_rule_is_at_most_20_lines():
    lengths = rule_lengths()
    assert {"finetune", "evaluate_model", "aggregate_tables", "all"} <= {name.split(":")[1] for name in lengths}
    thick = {rule: n for rule, n in lengths.items() if n > MAX_RULE_LINES}
    assert not thick, f"rules over {MAX_RULE_LINES} lines: {thick}"


def test_every_rule_declares_the_threads_its_job_uses():
    # Snakemake gives a job that many cores and sets OMP_NUM_THREADS to it; a profile's
    # set-threads overrides it per rule.
    missing = [where for where, lines in rule_blocks().items()
               if where.split(":")[1] != "all" and not any(line.strip().startswith("threads:") for line in lines)]
    assert not missing, f"rules without threads: {missing}"


def test_each_rule_names_its_log_benchmark_and_tracking_after_itself():
    for where, lines in rule_blocks().items():
        name, block = where.split(":")[1], "\n".join(lines)
        if name == "all":
            continue
        assert f'job_log("{name}"' in block, name
        if "job_settings(" in block:
            assert f'job_settings("{name}",' in block and f'job_benchmark("{name}"' in block, name


def test_settings_flags_take_only_wildcards():
    """Snakemake reruns a job when a param changes unless the param derives from input or output:
    the settings (config-derived flags) must stay a function of the wildcards alone."""
    text = "\n".join(path.read_text() for path in RULE_FILES)
    settings = re.findall(r"^def (?!job_)(\w+_settings)\((.*?)\):", text, re.M)
    assert len(settings) >= 13
    assert all(args == "wildcards" for _, args in settings), settings


def test_rules_take_flags_from_named_functions_and_methods_from_the_registry():
    text = "\n".join(path.read_text() for path in RULE_FILES)
    assert "lambda" not in text  # named functions build the flags (job_files, job_settings)
    # Method sets come from the registry (get_method(m).needs, .trained), run ids from saeft.plan.runs.
    assert not re.search(r"""["'](sae_sparse|sae_add|feat_mse|feat_l1|l2sp|ldifs|flyp|lpft)["']""", text)
    assert ".partition(\"/alpha\")" not in text and ".partition(\"/seed\")" not in text


# Runs Snakemake in this process with __import__ watched: an import of a heavy module made (even
# when already loaded, e.g. pandas by Snakemake's SLURM plugin) while a frame of the workflow or
# of saeft is the nearest importer outside importlib and third-party code is a planning import of
# ours. Snakemake's own imports (its plugins, its validate) are not.
DRIVER = r"""
import builtins, json, os, sys
root, heavy, hits = sys.argv[1], tuple(sys.argv[2].split(",")), []
ours = (os.path.join(root, "saeft") + os.sep, os.path.join(root, "workflow") + os.sep, os.path.join(root, "Snakefile"))
real_import = builtins.__import__

def watched(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name.partition(".")[0] in heavy:
        frame = sys._getframe(1)
        while frame is not None:
            path = frame.f_code.co_filename
            if f"{os.sep}snakemake" in path and not path.startswith(ours):
                break
            if path.startswith(ours):
                hits.append(f"{name} from {path}:{frame.f_lineno}")
                break
            frame = frame.f_back
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = watched
from snakemake.cli import main
try:
    main(sys.argv[3:])
except SystemExit as exit:
    code = exit.code
print("PLANNING " + json.dumps({"code": code, "hits": hits, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def plan(tmp_path: Path, *args: str, snakefile: Path = ROOT / "workflow" / "Snakefile", importtime: bool = False) -> dict:
    """``snakemake -n`` of ``args`` under the import watch (and ``-X importtime``): its exit code,
    the heavy imports of ours, the heavy modules loaded at the end, and the output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", DRIVER, str(ROOT), ",".join(HEAVY),
               "-n", "-p", "--cores", "1", "-s", str(snakefile), "-d", str(tmp_path / "work"), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    found = re.search(r"^PLANNING (.*)$", result.stdout, re.M)
    assert found, f"the driver did not finish:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return {**json.loads(found[1]), "output": result.stdout + result.stderr, "stderr": result.stderr}


def imported_by(importtime: str, module: str) -> list[str]:
    """The chain of modules whose import first loaded ``module`` (``-X importtime`` output)."""
    entries = []
    for line in importtime.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            name = line.split("|", 2)[2]
            entries.append((len(name) - len(name.lstrip()), name.strip()))
    for i, (depth, name) in enumerate(entries):
        if name == module:
            chain = [name]
            for outer_depth, outer in entries[i + 1:]:  # parents are printed after their children
                if outer_depth < depth:
                    chain.append(outer)
                    depth = outer_depth
            return chain
    return []


@pytest.mark.parametrize("args", [(), ("--configfile", "config/paper_vitb16.yaml", "--config", "data_root=/nonexistent")],
                         ids=["default", "paper_vitb16"])
def test_planning_imports_no_torch_pandas_or_matplotlib(tmp_path, args):
    result = plan(tmp_path, *args, importtime=True)
    assert result["code"] == 0, result["output"][-3000:]
    assert re.search(r"^total\s+\d+$", result["output"], re.M)
    assert result["hits"] == [], f"planning imports heavy modules: {result['hits']}"
    # torch and matplotlib are not loaded at all; pandas only by Snakemake itself (its SLURM
    # executor plugin, loaded with every installed plugin at start).
    assert "torch" not in result["loaded"] and "matplotlib" not in result["loaded"]
    for module in HEAVY:
        chain = imported_by(result["stderr"], module)
        assert not any(name.startswith("saeft") for name in chain), f"{module} imported by {' <- '.join(chain)}"


def test_the_import_watch_sees_a_heavy_import_of_saeft(tmp_path):
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text("import saeft.stages.aggregate\n\n\nrule all:\n    shell:\n        'true'\n")
    result = plan(tmp_path, snakefile=snakefile)
    assert result["code"] == 0, result["output"][-3000:]
    assert any(hit.startswith(("pandas", "matplotlib")) for hit in result["hits"]), result["hits"]


def finetune_configs(output: str) -> dict[str, dict]:
    """The --config JSON of each planned finetune job, by method (one seed's)."""
    configs = {}
    for match in re.finditer(r"saeft finetune .*?--config '([^']*)'", output):
        cfg = json.loads(match[1])
        configs[cfg["method"]] = cfg
    return configs


def test_nested_overrides_are_typed_and_merged_into_the_study(tmp_path):
    result = plan(tmp_path, "--config", "finetune={lr: 0.005, epochs: 2}", "methods={saeft: {lambda_add: 5}}", "seeds=[0]",
                  "selection={seeds: [0]}")
    assert result["code"] == 0, result["output"][-3000:]
    configs = finetune_configs(result["output"])
    # Typed: numbers, not the strings Snakemake reads nested values as. SAE-FT's grid sets no lr:
    # it trains at finetune.lr; FT's grid sets its own lr (a variant's finetune keys win).
    assert configs["saeft"]["lr"] == 0.005 and configs["saeft"]["epochs"] == 2 and configs["saeft"]["seed"] == 0
    assert configs["ft"]["lr"] in (1e-4, 3e-4, 1e-3) and configs["ft"]["epochs"] == 2
    assert configs["saeft"]["method_params"]["lambda_add"] == 5
    # Merged key by key into config.yaml: its other finetune keys, saeft's other parameters (its
    # grid: every variant keeps its own lambda) and the methods the override does not name stay.
    assert configs["ft"]["batch_size"] == 32 and configs["saeft"]["method_params"]["lambda_remove"] == 0.02
    assert configs["saeft"]["method_params"]["lambda"] in (1, 10, 100)
    assert "saeft@lambda=100,mu=1" in result["output"] and "flyp@lr=0.0001" in result["output"]


def test_a_partial_config_file_that_names_no_study_is_refused(tmp_path):
    """Merged over the default study, a file that changes it would rerun and overwrite
    results/default/: it must name a study of its own."""
    tweak = tmp_path / "tweak.yaml"
    tweak.write_text("finetune: {epochs: 2}\n")
    result = plan(tmp_path, "--configfile", str(tweak))
    message = f"{result['code']}\n{result['output']}"
    assert result["code"] != 0
    assert re.search(r"^ConfigError: study: .*tweak.yaml change\(s\) the default study \(finetune.epochs\)", message, re.M), message[-3000:]
    assert "results/default/" in message and not (tmp_path / "work" / "results").exists()


def test_a_partial_config_file_merges_over_the_default_study(tmp_path):
    """With a study name, the file's keys merge over config/config.yaml (Snakemake's merge): the
    default study's other finetune keys, methods and grids stay, and results go to the new folder."""
    tweak = tmp_path / "tweak.yaml"
    tweak.write_text("study: tweak\nfinetune: {epochs: 2}\n")
    result = plan(tmp_path, "--configfile", str(tweak))
    assert result["code"] == 0, result["output"][-3000:]
    configs = finetune_configs(result["output"])
    assert configs["ft"]["epochs"] == 2 and configs["ft"]["batch_size"] == 32 and configs["ft"]["lr"] in (1e-4, 3e-4, 1e-3)
    assert {"ft", "lpft", "flyp", "scratch", "feat_mse", "saeft"} <= {name.partition("@")[0] for name in configs}
    assert "results/tweak/finetune/" in result["output"] and "results/default/" not in result["output"]


def test_a_config_file_that_lists_methods_replaces_the_default_studys(tmp_path):
    """A study's methods are its design: the default study's baselines and grids do not leak in;
    --config still merges over the file's methods."""
    study = tmp_path / "only_ft.yaml"
    study.write_text("study: only_ft\nmethods: {ft: {}, saeft: {lambda: 5}}\n")
    result = plan(tmp_path, "--configfile", str(study), "--config", "methods={saeft: {lambda_add: 3}}")
    assert result["code"] == 0, result["output"][-3000:]
    configs = finetune_configs(result["output"])
    assert sorted(configs) == ["ft", "saeft"], sorted(configs)
    assert configs["saeft"]["method_params"]["lambda"] == 5 and configs["saeft"]["method_params"]["lambda_add"] == 3


def test_nested_override_of_a_configfile_study(tmp_path):
    result = plan(tmp_path, "--configfile", "config/fashion_mnist.yaml", "--config", "finetune={lr: 0.005}")
    assert result["code"] == 0, result["output"][-3000:]
    configs = finetune_configs(result["output"])
    # The shared lr reaches the methods without an lr grid; a grid's own lrs stay.
    assert configs["feat_mse"]["lr"] == configs["saeft"]["lr"] == 0.005
    assert configs["ft"]["lr"] in (1e-4, 3e-4, 1e-3) and configs["lpft"]["lr"] in (3e-5, 1e-4)
    assert all(cfg["epochs"] == 3 for cfg in configs.values() if cfg["method"] != "scratch")


# Through Snakemake, a nested method key; typing and unknown keys of nested strings are checked
# in process (tests/test_study_config.py, test_nested_command_line_strings_are_typed_by_the_schema).
@pytest.mark.parametrize("override, key", [("methods={saeft: {lambda: big}}", "methods.saeft.lambda")])
def test_a_bad_nested_override_fails_naming_its_key(tmp_path, override, key):
    result = plan(tmp_path, "--config", override)
    assert result["code"] != 0
    message = f"{result['code']}\n{result['output']}"  # the driver reports Snakemake's exit message as its code
    assert re.search(rf"^ConfigError: {re.escape(key)}:", message, re.M), message[-3000:]
    assert "Traceback" not in message and 'File "' not in message  # the key, not the stack
    assert not (tmp_path / "work" / "results").exists()
