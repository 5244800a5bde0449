"""A CLI that explains itself: ``saeft --version``; help in plain text that lists every command and
ends each command's page with a worked example that parses; --track and --threads only on the
commands that take them; and every command line the workflow plans parses with today's parser."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from saeft import cli

ROOT = Path(__file__).resolve().parents[1]


def registered_commands() -> dict[str, argparse.ArgumentParser]:
    """The subcommands as build_parser registers them, by name."""
    parser = cli.build_parser()
    return next(action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction))


COMMANDS = sorted(registered_commands())


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_version_is_the_installed_package_version():
    result = subprocess.run([sys.executable, "-m", "saeft.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"saeft {importlib.metadata.version('saeft')}"


def test_top_level_help_lists_every_command_in_plain_text(capsys):
    text = help_text([], capsys)
    overview, _, listing = text.partition("positional arguments:")
    for name in COMMANDS:
        assert re.search(rf"[ ,]{re.escape(name)}(,|$)", overview, re.M), f"{name} missing from the overview"
        assert re.search(rf"^ +{re.escape(name)}( |$)", listing, re.M), f"{name} missing from the command list"
    assert "``" not in text and "saeft --help" not in text
    assert "snakemake -n -p prints the exact command of every job of a study" in text


@pytest.mark.parametrize("name", COMMANDS)
def test_help_is_plain_text_and_ends_with_an_example_that_parses(name, capsys):
    text = help_text([name], capsys)
    assert "``" not in text and not re.search(r":[a-z]+:`", text), "reStructuredText in the help"
    last = text.replace("\\\n", " ").rstrip().splitlines()[-1].strip()  # continuation lines joined
    assert last.startswith(f"saeft {name} ") or last == f"saeft {name}", f"no worked example at the end:\n{text}"
    args = cli.build_parser().parse_args(shlex.split(last)[1:])
    assert args.command == name


@pytest.mark.parametrize("name", COMMANDS)
def test_track_and_threads_only_where_they_act(name):
    options = registered_commands()[name]._option_string_actions
    assert ("--track" in options) == (name in cli.TRACKED)
    assert ("--threads" in options) == (name in cli.THREADED)


@pytest.mark.parametrize("argv", [["schema"], ["export", "--run", "r", "--out", "o"], ["sync-tracking"],
                                  ["init-tracking", "--experiment", "e"], ["worker", "--socket", "s"]])
def test_commands_outside_the_workflow_reject_track(argv, capsys):
    assert cli.build_parser().parse_args(argv).track is None  # complete without it
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args([*argv, "--track", "{}"])
    assert info.value.code == 2
    assert "unrecognized arguments: --track" in capsys.readouterr().err


def planned_commands(tmp_path: Path, *args: str) -> list[tuple[list[str], bool]]:
    """Each ``saeft`` command a dry run of the workflow plans, as argv after ``saeft``, and whether
    its job waits on a checkpoint (``input: <TBD>``: its input lists are still unknown)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow" / "Snakefile"), "-n", "-p", "--cores", "1",
                             "-d", str(tmp_path), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    planned = []
    for block in re.split(r"\n\s*\n", result.stdout + "\n" + result.stderr):
        match = re.search(r"^Shell command: (saeft .*)$", block, re.M)
        if match:
            command = re.sub(r"\s*>\s*\S+\s+2>&1\s*$", "", match.group(1))  # the job's log redirection
            planned.append((shlex.split(command)[1:], bool(re.search(r"^\s*input: <TBD>", block, re.M))))
    return planned


@pytest.mark.parametrize("study", [[], ["--configfile", "config/paper_vitb16.yaml", "--config", "data_root=/nonexistent"]],
                         ids=["default", "paper_vitb16"])
def test_every_command_the_workflow_plans_parses(study, tmp_path):
    planned = planned_commands(tmp_path, *study)
    assert {"prepare", "head", "cache", "train-sae", "finetune", "evaluate", "aggregate"} <= {argv[0] for argv, _ in planned}
    commands, parser = registered_commands(), cli.build_parser()
    for argv, awaits_checkpoint in planned:
        if awaits_checkpoint:  # its lists are empty for now: every option must still be one it takes
            unknown = [word for word in argv if word.startswith("--") and word not in commands[argv[0]]._option_string_actions]
            assert not unknown, f"saeft {argv[0]} takes no {unknown}"
        else:
            assert parser.parse_args(argv).command == argv[0]


def test_threads_set_the_jobs_torch_threads(monkeypatch):
    """--threads of a THREADED stage sets torch's thread count for the job, also where torch is
    already imported (a warm worker)."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("SAEFT_THREADS", "0")
    omp = os.environ.get("OMP_NUM_THREADS")
    try:
        cli.apply_threads(1)
        assert torch.get_num_threads() == 1 and os.environ["SAEFT_THREADS"] == "1"
        assert os.environ.get("OMP_NUM_THREADS") == omp  # would cap `nproc` for later commands
    finally:
        torch.set_num_threads(before)
