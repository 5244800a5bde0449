"""Is the world calibrated? The effects established methods show on CLIP, measured in a study.

A testbed for robust fine-tuning is only as good as its calibration: before SAE-FT is judged in
a world, the world must reproduce what zero-shot CLIP, FT, WiSE-FT, LP-FT and FLYP do on
ImageNet (``reference/ROBUST_FT_ANCHORS.md``). :data:`PHENOMENA` states each effect as a
criterion for a miniature; :func:`assess` measures them from the study's own runs (the paired
bootstrap of :mod:`saeft.report.intervals`, so every number carries its interval) and :func:`gate_failures`
says which gate criteria fail. Only baselines are read here, never SAE-FT.

Each criterion has parts; a part that the study cannot measure (no LP-FT runs, one seed, ...)
is named as such. A criterion **passes** when every measured part passes and it has at least one;
it **fails** when a measured part fails; it is **not measured** otherwise. A threshold on a
difference is met by its point estimate; where the criterion says "resolved" or "interval > 0"
the 95% interval must clear 0 as well.

Pure numpy/pandas: the calibrate job (:mod:`saeft.stages.calibrate`) computes the runs that no
evaluation job makes (output-space ensemble, uniform soup, the ID-validation loss along the
interpolation path) and passes them in.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from saeft.report import uncertainty
from saeft.report.intervals import Evaluations, Run, runs_of
from saeft.report.results import OOD_AVG

logger = logging.getLogger(__name__)

PASS, FAIL, UNMEASURED = "pass", "fail", "not measured"


@dataclasses.dataclass(frozen=True)
class Phenomenon:
    """One effect of robust fine-tuning on CLIP, as the literature reports it and as a criterion."""

    key: str
    name: str
    literature: str
    source: str
    criterion: str


PHENOMENA: dict[str, Phenomenon] = {p.key: p for p in (
    Phenomenon("P1", "zero-shot effective robustness", "≈ +40 OOD over ImageNet models at equal ID",
               "Radford 2021; Taori 2020", "ZS OOD ≥ ID-only line at ZS's ID + 10; ZS OOD/ID ≥ 0.8"),
    Phenomenon("P2", "zero-shot competent in ID", "ZS/FT ID 0.84 (ViT-B/16), 0.88 (L/14)",
               "WiSE-FT (Wortsman 2022) Table 1", "ZS ID ≥ 0.8 × FT ID; LP − ZS ID ≤ 15"),
    Phenomenon("P3", "FT gains ID, loses some OOD", "ViT-B/16 ΔID +13.0, ΔOOD −4.3; every shift keeps ≥ 0.73",
               "WiSE-FT (Wortsman 2022) figure 1", "ΔID ≥ +8; ΔOOD < 0 resolved; every shift keeps ≥ 0.5 of ZS's above-chance accuracy"),
    Phenomenon("P4", "ID flat over in-basin learning rates", "ID 77.5–78.5 over lr 1e-6…1e-4 (71 ViT-B/32 fine-tunes)",
               "model soups (Wortsman 2022) result files", "FT lr chosen on ID validation ≤ 0.2 × pretraining lr"),
    Phenomenon("P5", "WiSE-FT bows", "ViT-L/14 α 0.5: +3.6 OOD over ZS, +8.3 over FT",
               "WiSE-FT (Wortsman 2022) Table 1", "WiSE(0.5) OOD ≥ max(ZS, FT) + 2, interval > 0; WiSE(0.25) OOD ≥ ZS; WiSE(0.5) ID ≥ FT − 2"),
    Phenomenon("P6", "one basin", "uniform soup 80.0/51.6 vs best single 80.4/48.0",
               "Neyshabur 2020; model soups (Wortsman 2022)",
               "ID-val loss barrier ≤ 0 along the path; weight vs output ensemble at 0.5 within 2; soup of FT seeds ≥ their mean ID"),
    Phenomenon("P7", "LP-FT ≥ FT OOD", "+1 ID / +10 OOD over FT on 10 shifts", "Kumar 2022",
               "LP-FT OOD ≥ FT + 3 at ID ≥ FT − 2 (probe to convergence, then FT at a lower lr)"),
    Phenomenon("P8", "FLYP ≥ FT OOD", "+4.2 OOD over FT on 7 shifts", "Goyal 2023", "FLYP OOD ≥ FT + 2 at ID ≥ FT − 1"),
)}


@dataclasses.dataclass
class Part:
    """One measured part of a criterion: its text, headline value with interval, and verdict."""

    text: str
    status: str
    value: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")


@dataclasses.dataclass
class Inputs:
    """What :func:`assess` reads besides the evaluations: the extra runs and the study's settings."""

    dataset: str
    chance: float
    """Accuracy of guessing: 1 / number of classes."""
    baseline: str = "ft"
    """The method called FT (rows with this method and no alpha; WiSE-FT rows interpolate it)."""
    lpft: str = "lpft"
    """The method called LP-FT (P7)."""
    flyp: str = "flyp"
    """The method called FLYP (P8)."""
    ensemble: str | None = None
    """Variant name under which the output-space ensemble at alpha 0.5 is in the evaluations."""
    soup: str | None = None
    """Variant name of the uniform soup of the FT seeds (seed None)."""
    path_loss: Mapping[float, float] = dataclasses.field(default_factory=dict)
    """Mean ID-validation loss over FT seeds at each alpha of the path (0: zero-shot, 1: FT)."""
    lr_ratio: float | None = None
    """The selected FT lr / the pretraining lr (None: the study does not pretrain)."""
    lr_detail: str = ""
    """How that lr was chosen (shown beside P4)."""
    linear_probe: float | None = None
    """ID test top-1 of a linear probe on the zero-shot embeddings (fraction)."""
    id_only_line: tuple[float, float] | None = None
    """(slope, intercept) of OOD against ID of models trained on ID data only (fractions)."""


def _broadcast(r: uncertainty.Replicates, seeds: Sequence[Any]) -> uncertainty.Replicates:
    """A single-model statistic (zero-shot, a soup) repeated for each of ``seeds``: paired with
    a seeded method seed by seed, resample by resample."""
    if tuple(r.seeds) == tuple(seeds) or r.seeds != (None,):
        return r
    return uncertainty.Replicates(tuple(seeds), np.repeat(r.point, len(seeds)), np.repeat(r.boot, len(seeds), axis=1))


def _paired(ra: uncertainty.Replicates, rb: uncertainty.Replicates) -> tuple[uncertainty.Replicates, uncertainty.Replicates]:
    """Both statistics over the same seeds: a single model's (seed None) repeated for the other's."""
    seeds = rb.seeds if ra.seeds == (None,) else ra.seeds
    return _broadcast(ra, seeds), _broadcast(rb, seeds)


class _Study:
    """The runs of one dataset and the interval arithmetic on them."""

    def __init__(self, df: pd.DataFrame, ev: Evaluations, inputs: Inputs, level: float) -> None:
        self.df, self.ev, self.inputs, self.level = df, ev, inputs, level
        rows = df[df["dataset"] == inputs.dataset]
        self.rows = rows
        self.id_set = next(iter(rows.loc[rows["role"] == "id", "evalset"]), None)
        self.ood_sets = list(dict.fromkeys(rows.loc[rows["role"] == "ood", "evalset"]))

    def runs(self, method: str, alpha: float | None = None) -> list[Run]:
        rows = self.rows[self.rows["method"] == method]
        rows = rows[rows["alpha"].isna()] if alpha is None else rows[np.isclose(rows["alpha"].astype(float), alpha)]
        return runs_of(rows)

    def wiseft_runs(self, alpha: float) -> list[Run]:
        rows = self.rows[(self.rows["method"] != self.inputs.baseline) & self.rows["alpha"].notna()]
        base = rows[[str(v).split("@")[0] == self.inputs.baseline for v in rows["variant"]]]
        return runs_of(base[np.isclose(base["alpha"].astype(float), alpha)])

    def column(self, runs: list[Run], column: str) -> uncertainty.Replicates:
        return self.ev.column(self.inputs.dataset, runs, column, self.ood_sets)

    def interval(self, r: uncertainty.Replicates) -> uncertainty.Interval:
        return uncertainty.interval(r, self.level)

    def diff(self, a: list[Run], b: list[Run], column: str) -> uncertainty.Interval:
        """a − b on ``column`` (a, b run lists; a single-model one broadcast to the other's seeds)."""
        ra, rb = _paired(self.column(a, column), self.column(b, column))
        return self.interval(uncertainty.difference(ra, rb))

    def ratio(self, a: list[Run], b: list[Run], column: str) -> uncertainty.Interval:
        ra, rb = _paired(self.column(a, column), self.column(b, column))
        return self.interval(uncertainty.Replicates(ra.seeds, ra.point / rb.point, ra.boot / rb.boot))


# Accuracies are counts over images, so a difference can lie exactly on a threshold (+2.0 points)
# and still come out a rounding error (1e-17) below it: every comparison allows for that error.
_ROUNDING = 1e-9


def _ge(x: float, threshold: float) -> bool:
    return x >= threshold - _ROUNDING


def _le(x: float, threshold: float) -> bool:
    return x <= threshold + _ROUNDING


def _gt(x: float, threshold: float) -> bool:
    return x > threshold + _ROUNDING


def _lt(x: float, threshold: float) -> bool:
    return x < threshold - _ROUNDING


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _iv(i: uncertainty.Interval, scale: float = 100.0, signed: bool = True, digits: int = 1) -> str:
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{fmt.format(scale * i.mean)} [{fmt.format(scale * i.low)}, {fmt.format(scale * i.high)}]"


def _part(text: str, ok: bool, i: uncertainty.Interval | None = None) -> Part:
    part = Part(text, PASS if ok else FAIL)
    if i is not None:
        part.value, part.low, part.high = i.mean, i.low, i.high
    return part


def _p1(s: _Study) -> list[Part]:
    zs = s.runs("zeroshot")
    line = s.inputs.id_only_line
    if line is None or not zs:
        return [Part("no models trained on ID data only in the study (method scratch)", UNMEASURED)]
    zs_id = s.interval(s.column(zs, s.id_set)).mean
    zs_ood = s.interval(s.column(zs, OOD_AVG))
    margin = zs_ood.mean - (line[0] * zs_id + line[1])
    ratio = zs_ood.mean / zs_id
    return [_part(f"ZS OOD − ID-only line at ZS's ID {_pts(margin)} (≥ +10)", _ge(margin, 0.10)),
            _part(f"ZS OOD/ID {ratio:.2f} (≥ 0.8)", _ge(ratio, 0.8))]


def _p2(s: _Study) -> list[Part]:
    zs, ft = s.runs("zeroshot"), s.runs(s.inputs.baseline)
    ratio = s.ratio(zs, ft, s.id_set)
    parts = [_part(f"ZS/FT ID {_iv(ratio, 1, False, 2)} (≥ 0.8)", _ge(ratio.mean, 0.8), ratio)]
    if s.inputs.linear_probe is None:
        parts.append(Part("LP − ZS: no linear probe measured", UNMEASURED))
    else:
        gap = s.inputs.linear_probe - s.interval(s.column(zs, s.id_set)).mean
        parts.append(_part(f"LP − ZS ID {_pts(gap)} (≤ +15)", _le(gap, 0.15)))
    return parts


def _p3(s: _Study) -> list[Part]:
    zs, ft = s.runs("zeroshot"), s.runs(s.inputs.baseline)
    did, dood = s.diff(ft, zs, s.id_set), s.diff(ft, zs, OOD_AVG)
    chance = s.inputs.chance
    keeps = {}
    for shift in s.ood_sets:
        z, f = s.interval(s.column(zs, shift)).mean, s.interval(s.column(ft, shift)).mean
        if z > chance:  # a shift zero-shot does not beat chance on has nothing to keep
            keeps[shift] = (f - chance) / (z - chance)
    worst = min(keeps, key=lambda k: keeps[k]) if keeps else None
    parts = [_part(f"ΔID {_iv(did)} (≥ +8)", _ge(did.mean, 0.08), did),
             _part(f"ΔOOD {_iv(dood)} (< 0, resolved)", _lt(dood.high, 0), dood)]
    if worst is not None:
        parts.append(_part(f"least kept: {worst} {keeps[worst]:.2f} of ZS above chance (≥ 0.5)", _ge(keeps[worst], 0.5)))
    else:
        parts.append(Part("shifts kept: zero-shot is at chance on every shift", UNMEASURED))
    return parts


def _p4(s: _Study) -> list[Part]:
    if s.inputs.lr_ratio is None:
        return [Part("the study does not pretrain its model: no pretraining lr to compare with", UNMEASURED)]
    ratio = s.inputs.lr_ratio
    return [_part(f"FT lr / pretraining lr {ratio:.3g} (≤ 0.2){'; ' + s.inputs.lr_detail if s.inputs.lr_detail else ''}", _le(ratio, 0.2))]


def _p5(s: _Study) -> list[Part]:
    zs, ft, w5, w25 = s.runs("zeroshot"), s.runs(s.inputs.baseline), s.wiseft_runs(0.5), s.wiseft_runs(0.25)
    if not w5:
        return [Part(f"no WiSE-FT of {s.inputs.baseline} at α 0.5 in the study", UNMEASURED)]
    zs_ood, ft_ood = s.interval(s.column(zs, OOD_AVG)).mean, s.interval(s.column(ft, OOD_AVG)).mean
    top, name = (zs, "ZS") if zs_ood >= ft_ood else (ft, "FT")
    bow = s.diff(w5, top, OOD_AVG)
    parts = [_part(f"WiSE(0.5) − {name} OOD {_iv(bow)} (≥ +2, interval > 0)", _ge(bow.mean, 0.02) and _gt(bow.low, 0), bow)]
    if w25:
        low = s.diff(w25, zs, OOD_AVG)
        parts.append(_part(f"WiSE(0.25) − ZS OOD {_iv(low)} (≥ 0)", _ge(low.mean, 0), low))
    else:
        parts.append(Part("WiSE(0.25): not in the study's α grid", UNMEASURED))
    did = s.diff(w5, ft, s.id_set)
    parts.append(_part(f"WiSE(0.5) − FT ID {_iv(did)} (≥ −2)", _ge(did.mean, -0.02), did))
    return parts


def _p6(s: _Study) -> list[Part]:
    parts = []
    path = dict(s.inputs.path_loss)
    if {0.0, 1.0} <= set(path) and len(path) > 2:
        l0, l1 = path[0.0], path[1.0]
        excess = {a: loss - ((1 - a) * l0 + a * l1) for a, loss in path.items() if 0 < a < 1}
        worst = max(excess, key=lambda a: excess[a])
        parts.append(_part(f"ID-val loss barrier {excess[worst]:+.3f} at α {worst:g} (≤ 0)", _le(excess[worst], 0)))
    else:
        parts.append(Part("ID-val loss along the path: not measured", UNMEASURED))
    w5 = s.wiseft_runs(0.5)
    if s.inputs.ensemble and w5:
        ens = s.runs(s.inputs.ensemble, 0.5)
        did, dood = s.diff(w5, ens, s.id_set), s.diff(w5, ens, OOD_AVG)
        ok = _le(abs(did.mean), 0.02) and _le(abs(dood.mean), 0.02)
        parts.append(_part(f"weight − output ensemble at 0.5: ID {_iv(did)}, OOD {_iv(dood)} (within ±2)", ok, dood))
    else:
        parts.append(Part("output-space ensemble: not measured", UNMEASURED))
    ft = s.runs(s.inputs.baseline)
    if s.inputs.soup and len(ft) > 1:
        gain = s.diff(s.runs(s.inputs.soup), ft, s.id_set)
        parts.append(_part(f"soup of {len(ft)} FT seeds − their mean ID {_iv(gain)} (≥ 0)", _ge(gain.mean, 0), gain))
    else:
        parts.append(Part("soup of FT seeds: needs at least 2 seeds", UNMEASURED))
    return parts


def _versus_ft(s: _Study, method: str, ood_margin: float, id_margin: float, label: str) -> list[Part]:
    other, ft = s.runs(method), s.runs(s.inputs.baseline)
    if not other:
        return [Part(f"no {label} runs in the study", UNMEASURED)]
    dood, did = s.diff(other, ft, OOD_AVG), s.diff(other, ft, s.id_set)
    return [_part(f"{label} − FT OOD {_iv(dood)} (≥ {_pts(ood_margin)})", _ge(dood.mean, ood_margin), dood),
            _part(f"{label} − FT ID {_iv(did)} (≥ {_pts(-id_margin)})", _ge(did.mean, -id_margin), did)]


CHECKS = {
    "P1": _p1, "P2": _p2, "P3": _p3, "P4": _p4, "P5": _p5, "P6": _p6,
    "P7": lambda s: _versus_ft(s, s.inputs.lpft, 0.03, 0.02, "LP-FT"),
    "P8": lambda s: _versus_ft(s, s.inputs.flyp, 0.02, 0.01, "FLYP"),
}
"""How each criterion is measured: a function of the study's runs returning its parts."""


def verdict(parts: Sequence[Part]) -> str:
    """A criterion's status from its parts: fail if a measured part fails, pass if every
    measured part passes and one was measured, else not measured."""
    measured = [p for p in parts if p.status != UNMEASURED]
    if any(p.status == FAIL for p in measured):
        return FAIL
    return PASS if measured else UNMEASURED


def assess(df: pd.DataFrame, ev: Evaluations, inputs: Inputs, gate: Sequence[str], level: float = 0.95) -> list[dict[str, Any]]:
    """Every criterion of :data:`PHENOMENA` on the runs of ``inputs.dataset``: one record each
    (criterion, phenomenon, literature, source, the test, what the study measured, status, whether
    it gates, the headline value with its interval, and its parts). Zero-shot and the baseline
    must be in ``df``; a ValueError says which is missing."""
    study = _Study(df, ev, inputs, level)
    for needed in ("zeroshot", inputs.baseline):
        if not study.runs(needed):
            raise ValueError(f"calibration of {inputs.dataset}: no {needed} results to measure the world with")
    if study.id_set is None:
        raise ValueError(f"calibration of {inputs.dataset}: no ID test results")
    records = []
    for key, phenomenon in PHENOMENA.items():
        parts = CHECKS[key](study)
        headline = next((p for p in parts if not np.isnan(p.value)), Part("", UNMEASURED))
        status = verdict(parts)
        records.append({
            "dataset": inputs.dataset, "criterion": key, "phenomenon": phenomenon.name,
            "literature": phenomenon.literature, "source": phenomenon.source, "test": phenomenon.criterion,
            "measured": "; ".join(p.text for p in parts), "status": status, "gate": key in gate,
            "value": headline.value, "low": headline.low, "high": headline.high,
            "parts": [dataclasses.asdict(p) for p in parts],
        })
        logger.info("%s %s (%s): %s — %s", inputs.dataset, key, phenomenon.name, status, records[-1]["measured"])
    return records


def gate_failures(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The gate criteria that did not pass (failed or could not be measured), in order."""
    return [r["criterion"] for r in records if r["gate"] and r["status"] != PASS]


def not_calibrated_text(failures: Sequence[str]) -> str:
    """What the comparison table and figures say instead of a reading."""
    return f"world not calibrated: {', '.join(failures)}"


def calibration_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The calibration table's rows (CSV): one per dataset and criterion, without the parts."""
    columns = ["dataset", "criterion", "phenomenon", "literature", "source", "test", "measured", "status", "gate",
               "value", "low", "high"]
    return pd.DataFrame([{c: r[c] for c in columns} for r in records], columns=columns)


def calibration_markdown(records: Sequence[Mapping[str, Any]]) -> str:
    """The calibration table as Markdown: per dataset, each criterion with the literature's value
    and source, what the study measured (95% intervals in brackets) and its status."""
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        rows = [r for r in records if r["dataset"] == dataset]
        failures = gate_failures(rows)
        gate = ", ".join(r["criterion"] for r in rows if r["gate"])
        lines += [f"### {dataset}: {'calibrated' if not failures else not_calibrated_text(failures)} (gate: {gate})", "",
                  "| | phenomenon | literature (source) | criterion | this study (95% interval) | status |",
                  "|:--|:--|:--|:--|:--|:--|"]
        for r in rows:
            status = f"**{r['status']}**" if r["gate"] else r["status"]
            lines.append(f"| {r['criterion']}{' (gate)' if r['gate'] else ''} | {r['phenomenon']} | {r['literature']} "
                         f"({r['source']}) | {r['test']} | {r['measured']} | {status} |")
        lines.append("")
    return "\n".join(lines)


__all__ = ["CHECKS", "FAIL", "Inputs", "PASS", "PHENOMENA", "Part", "Phenomenon", "UNMEASURED", "assess",
           "calibration_frame", "calibration_markdown", "gate_failures", "not_calibrated_text", "verdict"]
