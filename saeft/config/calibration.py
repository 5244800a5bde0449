"""The ``calibration`` section: which of robust fine-tuning's known effects a study must reproduce
before its comparison gives a reading (rule ``calibrate``, :mod:`saeft.report.calibration`). Imports no
torch."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from saeft.config.base import Schema, StageConfig, require

CRITERIA = ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8")
"""The phenomena of ``reference/ROBUST_FT_ANCHORS.md`` (saeft.report.calibration.PHENOMENA)."""

ROLE_KEYS = ("lpft", "flyp", "linear_probe", "id_only")
"""Keys naming the method each criterion reads in a role besides the baseline."""

Criterion = Literal["P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8"]


@dataclasses.dataclass
class CalibrationConfig(StageConfig):
    """Whether the study's world reproduces the effects established methods show on CLIP (config
    key ``calibration``; rule calibrate). Judged on the baselines only, never on SAE-FT."""

    section = "calibration"
    enabled: bool = True
    """Measure the calibration table (needs zero-shot, FT on at least two seeds and WiSE-FT of FT in
    the study; LP-FT, FLYP and ID-only models where the study has them)."""
    gate: Annotated[list[Criterion], Schema(unique_items=True)] = dataclasses.field(
        default_factory=lambda: ["P2", "P3", "P5", "P6"])
    """Criteria that must pass for the comparison table and figures to give a reading; when one
    fails they say "world not calibrated: <criterion>" and the study still completes."""
    baseline: str = "ft"
    """The fine-tuned method the criteria call FT (its selected variant; WiSE-FT interpolates it)."""
    lpft: str = "lpft"
    """The method P7 calls LP-FT (probe to convergence, then fine-tune)."""
    flyp: str = "flyp"
    """The method P8 calls FLYP (contrastive fine-tuning)."""
    linear_probe: str = "lp"
    """The method P2 calls the linear probe (else the pretrained model's quality record)."""
    id_only: str = "scratch"
    """The method whose runs (every variant) are the models trained on ID data only (P1's line)."""
    path_alphas: Annotated[list[float], Schema(min_items=1)] = dataclasses.field(
        default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 0.9])
    """Mixing weights along the zero-shot -> FT path where the calibrate job measures the ID
    validation loss (P6's barrier)."""

    @property
    def roles(self) -> dict[str, str]:
        """Method name by the role the criteria give it (besides the baseline)."""
        return {key: getattr(self, key) for key in ROLE_KEYS}

    def validate(self) -> None:
        for alpha in self.path_alphas:
            require(0 < alpha < 1, "calibration.path_alphas", f"{alpha} is not strictly between 0 and 1")
