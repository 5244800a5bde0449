"""saeft.report.uncertainty: paired image bootstrap plus seed spread, checked against hand arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest

from saeft.nn import metrics
from saeft.report.uncertainty import Replicates, average, bootstrap_indices, difference, interval, replicates

Z95 = 1.959963984540054  # NormalDist().inv_cdf(0.975)

# Eval set A: 4 images, resampled 3 times by hand.
TARGET_A = np.array([0, 1, 0, 1])
INDICES_A = np.array([[0, 0, 1, 2], [1, 3, 3, 2], [2, 2, 0, 3]])
# Method a: seed 0 correct [1, 1, 0, 1], seed 1 correct [1, 0, 1, 0].
RUNS_A = [(0, np.array([0, 1, 1, 1]), TARGET_A, None), (1, np.array([0, 0, 0, 0]), TARGET_A, None)]
# Method b, seeds in another order plus one a lacks: seed 1 correct [1, 1, 1, 0], seed 0 [0, 1, 1, 1].
RUNS_B = [
    (1, np.array([0, 1, 0, 0]), TARGET_A, None),
    (0, np.array([1, 1, 0, 1]), TARGET_A, None),
    (2, np.array([0, 1, 0, 1]), TARGET_A, None),
]


def check(result, *, mean, boot_se, seed_se, n_seeds, n_boot):
    se = math.sqrt(boot_se**2 + seed_se**2)
    assert result.mean == pytest.approx(mean, abs=1e-12)
    assert result.boot_se == pytest.approx(boot_se, abs=1e-12)
    assert result.seed_se == pytest.approx(seed_se, abs=1e-12)
    assert result.se == pytest.approx(se, abs=1e-12)
    assert result.low == pytest.approx(mean - Z95 * se, abs=1e-12)
    assert result.high == pytest.approx(mean + Z95 * se, abs=1e-12)
    assert (result.n_seeds, result.n_boot) == (n_seeds, n_boot)


def test_top1_by_hand():
    r = replicates("top1", RUNS_A, INDICES_A)
    assert r.seeds == (0, 1)
    np.testing.assert_allclose(r.point, [0.75, 0.5], atol=1e-12)
    # seed 0 on rows [0,0,1,2] [1,3,3,2] [2,2,0,3]: 1110, 1110, 0011; seed 1: 1101, 0001, 1110
    np.testing.assert_allclose(r.boot, [[0.75, 0.75], [0.75, 0.25], [0.5, 0.75]], atol=1e-12)
    # seed means per resample 0.75, 0.5, 0.625 (mean 0.625): squares 0.125^2 + 0.125^2 + 0 over 2
    boot_se = math.sqrt((0.125**2 + 0.125**2 + 0.0) / 2)
    # point spread: sd(0.75, 0.5) = 0.25 / sqrt(2), over sqrt(2 seeds)
    seed_se = (0.25 / math.sqrt(2)) / math.sqrt(2)
    check(interval(r), mean=0.625, boot_se=boot_se, seed_se=seed_se, n_seeds=2, n_boot=3)
    assert boot_se == pytest.approx(0.125) and seed_se == pytest.approx(0.125)


def test_difference_by_hand_is_paired_by_seed():
    d = difference(replicates("top1", RUNS_A, INDICES_A), replicates("top1", RUNS_B, INDICES_A))
    assert d.seeds == (0, 1)  # a's order; seed 2 (only in b) left out
    np.testing.assert_allclose(d.point, [0.75 - 0.75, 0.5 - 0.75], atol=1e-12)
    # b: seed 0 on the rows 0.5, 1.0, 0.75; seed 1 on the rows 1.0, 0.5, 0.75
    expected_boot = [[0.75 - 0.5, 0.75 - 1.0], [0.75 - 1.0, 0.25 - 0.5], [0.5 - 0.75, 0.75 - 0.75]]
    np.testing.assert_allclose(d.boot, expected_boot, atol=1e-12)
    # row means 0, -0.25, -0.125 (mean -0.125); seed points 0, -0.25
    boot_se = math.sqrt((0.125**2 + 0.125**2 + 0.0) / 2)
    seed_se = (0.25 / math.sqrt(2)) / math.sqrt(2)
    check(interval(d), mean=-0.125, boot_se=boot_se, seed_se=seed_se, n_seeds=2, n_boot=3)


def test_difference_with_itself_has_no_evaluation_noise():
    r = replicates("top1", RUNS_A, INDICES_A)
    d = interval(difference(r, r))
    assert (d.mean, d.boot_se, d.seed_se, d.low, d.high) == (0.0, 0.0, 0.0, 0.0, 0.0)


def test_average_by_hand():
    # Eval set C: 3 images, its own 3 resamples; seed 0 correct [1, 1, 0], seed 1 correct [1, 0, 0].
    target_c = np.array([2, 2, 2])
    runs_c = [(0, np.array([2, 2, 0]), target_c, None), (1, np.array([2, 0, 0]), target_c, None)]
    indices_c = np.array([[0, 1, 2], [2, 2, 2], [0, 0, 1]])
    c = replicates("top1", runs_c, indices_c)
    np.testing.assert_allclose(c.boot, [[2 / 3, 1 / 3], [0.0, 0.0], [1.0, 2 / 3]], atol=1e-12)
    avg = average([replicates("top1", RUNS_A, INDICES_A), c])
    np.testing.assert_allclose(avg.point, [17 / 24, 10 / 24], atol=1e-12)
    np.testing.assert_allclose(avg.boot, [[17 / 24, 13 / 24], [3 / 8, 1 / 8], [3 / 4, 17 / 24]], atol=1e-12)
    # row means 90/144, 36/144, 105/144 around 77/144: deviations 13, -41, 28 (/144)
    boot_se = math.sqrt((13**2 + 41**2 + 28**2) / 2) / 144
    seed_se = (7 / 24 / math.sqrt(2)) / math.sqrt(2)
    check(interval(avg), mean=9 / 16, boot_se=boot_se, seed_se=seed_se, n_seeds=2, n_boot=3)


def test_single_seed_covers_only_evaluation_noise():
    r = replicates("top1", [(None, RUNS_A[0][1], TARGET_A, None)], INDICES_A)
    assert r.seeds == (None,)
    result = interval(r)
    assert result.seed_se == 0.0
    assert result.se == result.boot_se
    # seed 0 alone on the rows: 0.75, 0.75, 0.5 around 2/3
    check(result, mean=0.75, boot_se=math.sqrt(((1 / 12) ** 2 * 2 + (1 / 6) ** 2) / 2), seed_se=0.0, n_seeds=1, n_boot=3)


def test_bootstrap_se_of_top1_approaches_the_binomial_se():
    n, p = 400, 0.3
    target = np.zeros(n, dtype=int)
    predicted = np.where(np.arange(n) < int(p * n), 0, 1)
    result = interval(replicates("top1", [(0, predicted, target, None)], bootstrap_indices(n, 4000, seed=7)))
    assert result.mean == pytest.approx(p)
    assert result.boot_se == pytest.approx(math.sqrt(p * (1 - p) / n), rel=0.05)


def resample_check(metric, runs, indices, recompute):
    r = replicates(metric, runs, indices)
    for s, (_, predicted, target, groups) in enumerate(runs):
        assert r.point[s] == pytest.approx(recompute(predicted, target, groups), abs=1e-12)
        for b in (0, 1, len(indices) - 1):
            rows = indices[b]
            resampled_groups = None if groups is None else groups[rows]
            assert r.boot[b, s] == pytest.approx(recompute(predicted[rows], target[rows], resampled_groups), abs=1e-12)
    return r


def test_macro_f1_replicates_match_the_metric_on_resampled_arrays():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=60)
    runs = [(seed, np.where(rng.random(60) < 0.6, target, rng.integers(0, 6, size=60)), target, None) for seed in (0, 1)]
    r = resample_check("macro_f1", runs, bootstrap_indices(60, 20, seed=1), lambda p, t, g: metrics.macro_f1(p, t))
    assert len(set(np.round(r.boot[:, 0], 9))) > 1  # the resamples do move the statistic


def test_vectorised_macro_f1_equals_the_per_class_definition():
    """F1 per class from its tp, fp and fn, averaged over the classes of the targets: classes
    only predicted, classes absent from a resample, string labels and chunk edges included."""
    def by_definition(predicted, target):
        scores = []
        for c in np.unique(target):
            tp = int(((predicted == c) & (target == c)).sum())
            fp = int(((predicted == c) & (target != c)).sum())
            fn = int(((predicted != c) & (target == c)).sum())
            scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        return float(np.mean(scores))

    rng = np.random.default_rng(3)
    target = rng.integers(0, 12, size=300)
    predicted = np.where(rng.random(300) < 0.5, target, rng.integers(0, 15, size=300))
    indices = bootstrap_indices(300, 7, seed=4)
    rows = metrics.macro_f1_rows(predicted, target, indices, chunk=3)
    assert rows == pytest.approx([by_definition(predicted[r], target[r]) for r in indices], abs=1e-12)
    names = np.array([f"class{i}" for i in range(15)])
    assert metrics.macro_f1(names[predicted], names[target]) == pytest.approx(by_definition(predicted, target), abs=1e-12)
    assert metrics.macro_f1(np.array([1, 1]), np.array([0, 0])) == 0.0 and metrics.macro_f1(np.array([]), np.array([])) == 0.0


def worst_region(predicted, target, groups):
    names = sorted(set(groups.tolist()))
    codes = np.array([names.index(name) for name in groups])
    return metrics.worst_group_accuracy(metrics.group_accuracies(predicted, target, codes, names), exclude=("Other",))


def test_worst_region_acc_replicates_match_the_metric_on_resampled_arrays():
    rng = np.random.default_rng(3)
    regions = np.array(["Africa", "Americas", "Asia", "Europe", "Other"])
    groups = regions[rng.integers(0, 5, size=80)]
    target = rng.integers(0, 4, size=80)
    runs = []
    for seed, accuracy in ((0, 0.7), (1, 0.5)):
        predicted = np.where(rng.random(80) < accuracy, target, (target + 1) % 4)
        predicted[groups == "Other"] = (target[groups == "Other"] + 1) % 4  # always wrong: must not count
        runs.append((seed, predicted, target, groups))
    r = resample_check("worst_region_acc", runs, bootstrap_indices(80, 20, seed=2), worst_region)
    assert (r.point > 0).all()  # 'Other' (accuracy 0) left out of the worst


def test_worst_region_acc_by_hand_leaves_other_out():
    groups = np.array(["Asia", "Asia", "Europe", "Europe", "Other"])
    target = np.array([0, 0, 0, 0, 0])
    predicted = np.array([0, 1, 0, 0, 1])  # Asia 0.5, Europe 1.0, Other 0.0
    indices = np.array([[2, 3, 4, 4, 0], [0, 0, 2, 4, 4]])  # Europe 1.0 / Asia 1.0; Asia 1.0 / Europe 1.0
    r = replicates("worst_region_acc", [(0, predicted, target, groups)], indices)
    np.testing.assert_allclose(r.point, [0.5])
    np.testing.assert_allclose(r.boot, [[1.0], [1.0]])


def test_bootstrap_indices_are_deterministic_per_seed():
    first = bootstrap_indices(50, 10, seed=0)
    assert first.shape == (10, 50)
    assert first.min() >= 0 and first.max() < 50
    np.testing.assert_array_equal(first, bootstrap_indices(50, 10, seed=0))
    assert not np.array_equal(first, bootstrap_indices(50, 10, seed=1))


def test_unknown_metric_names_it_and_the_known_ones():
    with pytest.raises(ValueError, match=r"'accuracy'.*top1.*macro_f1.*worst_region_acc"):
        replicates("accuracy", RUNS_A, INDICES_A)


def test_worst_region_acc_needs_groups():
    with pytest.raises(ValueError, match="groups"):
        replicates("worst_region_acc", RUNS_A, INDICES_A)


def test_indices_must_fit_the_eval_set():
    with pytest.raises(ValueError, match="indices"):
        replicates("top1", RUNS_A, np.zeros((3, 5), dtype=int))


def test_average_needs_the_same_seeds():
    a = replicates("top1", RUNS_A, INDICES_A)
    b = replicates("top1", RUNS_B, INDICES_A)
    with pytest.raises(ValueError, match=r"\(0, 1\).*\(1, 0, 2\)"):
        average([a, b])


def test_difference_needs_a_common_seed():
    zero_shot = replicates("top1", [(None, RUNS_A[0][1], TARGET_A, None)], INDICES_A)
    with pytest.raises(ValueError, match="no seed in common"):
        difference(zero_shot, replicates("top1", RUNS_A, INDICES_A))


@pytest.mark.parametrize("level", [0.0, 1.0, -0.5, 1.5, 95])
def test_level_outside_the_unit_interval(level):
    with pytest.raises(ValueError, match="level"):
        interval(replicates("top1", RUNS_A, INDICES_A), level=level)


def test_other_levels_use_their_quantile():
    r = replicates("top1", RUNS_A, INDICES_A)
    wide, narrow = interval(r, 0.99), interval(r, 0.5)
    assert wide.high - wide.mean == pytest.approx(2.5758293035489004 * wide.se, abs=1e-12)
    assert narrow.high - narrow.mean == pytest.approx(0.6744897501960817 * narrow.se, abs=1e-12)


def test_replicates_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="seeds"):
        Replicates((0, 1), np.zeros(3), np.zeros((4, 3)))


def test_bootstrap_indices_are_numpys_draw_in_blocks_of_half_the_memory(monkeypatch):
    """Drawn a block of rows at a time into int32: the same indices as the one int64 draw, so
    every interval stays the same."""
    import numpy as np

    from saeft.report import uncertainty

    monkeypatch.setattr(uncertainty, "_BLOCK", 50)  # 7 rows of 7 images per block, 3 blocks and a part
    drawn = uncertainty.bootstrap_indices(7, 25, seed=4)
    assert drawn.dtype == np.int32 and drawn.shape == (25, 7)
    assert np.array_equal(drawn, np.random.default_rng(4).integers(0, 7, size=(25, 7)))
