"""Run ids format and parse in one place (saeft.plan.runs)."""

from __future__ import annotations

import re

import pytest

from saeft.plan.runs import PATTERN, RunId, alpha_tag, wiseft_base, wiseft_name


@pytest.mark.parametrize("text", ["zeroshot", "ft/seed0", "sae_add/seed12", "ft/seed1/alpha0.5", "lpft/seed2/alpha1"])
def test_a_run_id_round_trips_and_matches_the_wildcard(text):
    run = RunId.parse(text)
    assert str(run) == text
    assert re.fullmatch(PATTERN, text)


def test_parts_and_table_rows():
    assert RunId.parse("zeroshot") == RunId() and RunId().zeroshot and RunId().row == "zeroshot"
    wise = RunId.parse("lpft/seed3/alpha0.25")
    assert (wise.method, wise.seed, wise.alpha, wise.trained, wise.row) == ("lpft", 3, 0.25, "lpft/seed3", "wiseft_lpft")
    assert RunId("ft", 1, 0.5).row == "wiseft" and RunId("ft", 1).row == "ft"
    assert str(RunId("ft", 0, 0.50)) == "ft/seed0/" + alpha_tag(0.5) == "ft/seed0/alpha0.5"
    assert wiseft_base(wiseft_name("saeft")) == "saeft" and wiseft_base("ft") is None


@pytest.mark.parametrize("text", ["", "ft", "ft/seed", "ft/seedx", "FT/seed0", "ft/seed0/alpha", "ft/seed0/beta1"])
def test_a_malformed_run_id_is_named(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        RunId.parse(text)
    with pytest.raises(ValueError):
        RunId(method=None, seed=None, alpha=0.5)
