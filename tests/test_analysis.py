"""Feature analysis: added/removed sets on hand-made codes, CKA, FVU, decoder-span shares, and the
stage on a small model (the zero-shot model against itself changes nothing)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from saeft.analysis import features, metrics
from saeft.sae import TopKSAE, evaluate_sae, save_sae


def test_added_and_removed_on_hand_made_codes():
    s_0 = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    s_t = torch.tensor([[0.5, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    ch = metrics.feature_changes(s_0, s_t)
    # row 0: feature 1 appears (4.0), feature 2 disappears (was 2.0), feature 0 stays on.
    assert ch.added.tolist() == [[False, True, False, False], [False, False, False, False]]
    assert ch.removed.tolist() == [[False, False, True, False], [False, False, False, False]]
    assert ch.n_added.tolist() == [1, 0] and ch.n_removed.tolist() == [1, 0]
    assert ch.mass_added.tolist() == [4.0, 0.0] and ch.mass_removed.tolist() == [2.0, 0.0]
    with pytest.raises(ValueError, match="code shapes differ"):
        metrics.feature_changes(s_0, s_t[:, :3])


def test_ranked_features_count_then_mass():
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    values = torch.tensor([[1.0, 9.0, 0.0], [1.0, 0.0, 5.0], [0.0, 0.0, 5.0]])
    ranked = features._ranked(mask, values, top=5)
    # features 0 and 2 are set twice: 2 has more mass; feature 1 once.
    assert [r["feature"] for r in ranked] == [2, 0, 1]
    assert ranked[0] == {"feature": 2, "count": 2, "fraction": 2 / 3, "mass": 10.0}


def test_cka_is_one_for_identical_and_invariant_to_rotation_and_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    assert metrics.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert metrics.linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)
    assert metrics.linear_cka(x, 3.5 * x) == pytest.approx(1.0, abs=1e-12)
    y = torch.randn(50, 8, generator=g, dtype=torch.float64)
    assert metrics.linear_cka(x, y) == pytest.approx(metrics.linear_cka(2.0 * x @ q, y @ q.T), abs=1e-10)
    assert metrics.linear_cka(x, y) < 0.6
    # Not invariant to a general (anisotropic) linear map.
    assert metrics.linear_cka(x, x * torch.tensor([10.0] + [0.1] * 7)) < 0.9
    with pytest.raises(ValueError, match="same N"):
        metrics.linear_cka(x, y[:10])


def test_fvu_is_zero_for_a_perfect_reconstruction_and_one_for_the_mean():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, generator=g)
    assert metrics.fvu(x, x.clone()) == 0.0
    assert metrics.fvu(x, x.mean(dim=0).expand_as(x)) == pytest.approx(1.0)


def test_fvu_matches_the_sae_evaluation():
    g = torch.Generator().manual_seed(2)
    sae = TopKSAE(8, 16, 3, generator=g)
    z = sae.prepare(torch.randn(30, 8, generator=g))
    z_hat = sae(z).recon
    assert metrics.fvu(z, z_hat.detach()) == pytest.approx(evaluate_sae(sae, z)["fvu"], rel=1e-6)


def test_span_share_full_decoder_one_inside_zero_orthogonal():
    # A decoder of 3 columns in 6 dims (d_sae < d), so a change orthogonal to it exists.
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    W = q[:, :3] @ torch.randn(3, 3, generator=g, dtype=torch.float64)  # spans q's first 3 columns
    inside = torch.randn(4, 3, generator=g, dtype=torch.float64) @ W.T
    outside = torch.randn(4, 3, generator=g, dtype=torch.float64) @ q[:, 3:].T
    assert metrics.span_share(inside, W).tolist() == pytest.approx([1.0] * 4, abs=1e-9)
    assert metrics.span_share(outside, W).tolist() == pytest.approx([0.0] * 4, abs=1e-9)
    half = q[:, 0] + q[:, 4]  # equal parts in and out
    assert metrics.span_share(half[None], W).item() == pytest.approx(0.5, abs=1e-9)
    assert math.isnan(metrics.span_share(torch.zeros(1, 6), W).item())


def test_active_span_share_uses_only_each_rows_active_columns():
    # Overcomplete: 8 unit columns in 4 dims span everything, but each row uses its own few.
    g = torch.Generator().manual_seed(4)
    W = torch.nn.functional.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=0)
    support = torch.zeros(3, 8, dtype=torch.bool)
    support[0, [1, 5]] = True
    support[1, [2]] = True
    support[2, [0, 3, 6]] = True
    built = torch.stack([2 * W[:, 1] - W[:, 5], 0.3 * W[:, 2], W[:, 0] + W[:, 3] + W[:, 6]])
    assert metrics.active_span_share(built, W, support).tolist() == pytest.approx([1.0] * 3, abs=1e-9)
    # The component orthogonal to row 0's two columns: share 0 there, 1 under the full decoder.
    basis, _ = torch.linalg.qr(W[:, [1, 5]], mode="complete")
    orth = basis[:, 2:3].T
    assert metrics.active_span_share(orth, W, support[:1]).item() == pytest.approx(0.0, abs=1e-9)
    assert metrics.span_share(orth, W).item() == pytest.approx(1.0, abs=1e-9)
    # Dependent columns (a column twice) do not inflate the span.
    W2 = torch.cat([W[:, :1], W[:, :1], W[:, 1:]], dim=1)
    sup2 = torch.zeros(1, 9, dtype=torch.bool)
    sup2[0, [0, 1]] = True
    partly = (W[:, 0] + orth[0])[None]
    expected = (W[:, 0] @ partly[0]) ** 2 / partly[0].pow(2).sum()  # the span of unit W[:, 0]
    assert metrics.active_span_share(partly, W2, sup2).item() == pytest.approx(expected.item(), abs=1e-9)


def test_alignment_residual_share_is_zero_when_the_code_carries_the_change():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(4, 6, generator=g)
    s_0 = torch.tensor([[1.0, 0, 0, 2.0, 0, 0]])
    s_t = torch.tensor([[0.0, 3.0, 0, 2.0, 0, 0]])
    delta = (s_t - s_0) @ W.T
    assert metrics.alignment_residual_share(delta, s_0, s_t, W).item() == pytest.approx(0.0, abs=1e-12)
    assert metrics.alignment_residual_share(delta, s_0, s_0, W).item() == pytest.approx(1.0)


def _sae_for(d: int, path, normalize: str = "l2") -> TopKSAE:
    sae = TopKSAE(d, 4 * d, 8, normalize, generator=torch.Generator().manual_seed(0))
    save_sae(path, sae, {"test": True})
    return sae


def test_analyze_split_identical_embeddings_change_nothing():
    sae = TopKSAE(16, 64, 4, "l2", generator=torch.Generator().manual_seed(0))
    e = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(12) % 3
    summary, table = features.analyze_split(e, e.clone(), labels, sae, ["a", "b", "c"], top_features=5)
    assert summary["mean_added"] == 0 and summary["mean_removed"] == 0
    assert summary["cka"] == pytest.approx(1.0) and summary["cosine_drift"] == pytest.approx(0.0, abs=1e-12)
    assert summary["fvu_tuned"] == pytest.approx(summary["fvu_zeroshot"])
    assert summary["top_added"] == [] and math.isnan(summary["span_share"])
    assert set(summary["per_class"]) == {"a", "b", "c"} and summary["per_class"]["a"]["n"] == 4
    assert (table["code0_features"].map(len) == 4).all()


def test_analyze_split_prepares_as_the_sae_records():
    # Scaling an embedding changes nothing after L2 preparation, everything without it.
    e = torch.randn(10, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(10, dtype=torch.long)
    l2 = TopKSAE(16, 64, 4, "l2", generator=torch.Generator().manual_seed(0))
    summary, _ = features.analyze_split(e, 5 * e, labels, l2, ["a"], top_features=3)
    assert summary["mean_added"] == 0 and summary["cka"] == pytest.approx(1.0)
    raw = TopKSAE(16, 64, 4, "none", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw.b_pre.copy_(torch.randn(16, generator=torch.Generator().manual_seed(3)))
    summary, _ = features.analyze_split(e, 5 * e, labels, raw, ["a"], top_features=3)
    assert summary["mean_added"] > 0


def test_analysis_config_rejects_bad_values():
    from saeft.config import ConfigError

    with pytest.raises(ConfigError, match="analysis.top_features"):
        features.AnalysisConfig.from_dict({"top_features": 0}, "analysis.")


def test_stage_on_the_zeroshot_model_and_a_tuned_copy(tmp_path, clip_file, head_file, tiny_world):
    from saeft.nn.models import classifier_from_zeroshot, save_classifier
    from saeft.stages import cache

    caches = {}
    for split in ("test", "sketch"):
        caches[split] = tmp_path / f"{split}.h5"
        cache.run(clip_file, "shapes", split, tiny_world, cache.CacheConfig(batch_size=8), caches[split])
    sae_path = tmp_path / "sae.safetensors"
    _sae_for(128, sae_path)
    cfg = features.AnalysisConfig(batch_size=8, top_features=3)
    same = features.run(clip_file, "shapes", tiny_world, caches, sae_path, cfg, tmp_path / "zs.json",
                        tmp_path / "zs.parquet", {"method": "zeroshot"}, head=head_file)
    assert same["test/mean_added"] == 0 and same["test/cka"] == pytest.approx(1.0, abs=1e-6)

    # Perturb the visual tower: features change, and the outputs follow the contract.
    classifier, arch = classifier_from_zeroshot(clip_file, head_file)
    with torch.no_grad():
        for p in classifier.visual.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    tuned = tmp_path / "tuned.safetensors"
    save_classifier(tuned, classifier, arch, {})
    features.run(tuned, "shapes", tiny_world, caches, sae_path, cfg, tmp_path / "ft.json",
                 tmp_path / "ft.parquet", {"method": "ft", "seed": 0})
    import json

    result = json.loads((tmp_path / "ft.json").read_text())
    assert set(result["evalsets"]) == {"test", "sketch"} and result["sae"]["normalize"] == "l2"
    test = result["evalsets"]["test"]
    assert test["role"] == "id" and test["n"] == 20 and test["mean_added"] > 0 and test["cka"] < 1
    images = pd.read_parquet(tmp_path / "ft.parquet")
    assert list(images.columns) == list(features.IMAGE_COLUMNS) and len(images) == 40
    row = images.iloc[0]
    assert set(row["added"]) == set(row["code_features"]) - set(row["code0_features"])
    assert np.isclose(images.loc[images.evalset == "test", "n_added"].mean(), test["mean_added"])


def _image_table(evalset: str, rows: list[tuple[int, dict[int, float], dict[int, float]]]) -> pd.DataFrame:
    """A per-image table from (label, s_0 as {feature: value}, s_theta as {feature: value}) rows."""
    records = []
    for index, (label, code0, code) in enumerate(rows):
        added = sorted(set(code) - set(code0))
        removed = sorted(set(code0) - set(code))
        records.append({
            "evalset": evalset, "index": index, "label": label, "n_added": len(added), "n_removed": len(removed),
            "mass_added": sum(code[f] for f in added), "mass_removed": sum(code0[f] for f in removed),
            "cosine": 1.0, "span_share": 1.0, "residual_share": 0.0, "delta_norm": 0.0,
            "added": added, "removed": removed,
            "code0_features": sorted(code0), "code0_values": [code0[f] for f in sorted(code0)],
            "code_features": sorted(code), "code_values": [code[f] for f in sorted(code)],
        })
    return pd.DataFrame(records, columns=list(features.IMAGE_COLUMNS))


def test_cards_rank_features_and_pick_top_activating_images():
    from saeft.analysis import cards

    images = _image_table("test", [
        (0, {0: 1.0}, {0: 1.0, 3: 0.5}),   # 3 added
        (1, {0: 2.0, 1: 1.0}, {3: 2.5}),    # 3 added, 0 and 1 removed
        (1, {1: 3.0}, {1: 3.0, 2: 0.1}),    # 2 added
    ])
    assert cards.rank_changed(images, "added") == [(3, 2), (2, 1)]
    assert cards.rank_changed(images, "removed") == [(0, 1), (1, 1)]
    top = cards.top_images(images, 3, "code", n=5)
    assert [(t["index"], t["activation"]) for t in top] == [(1, 2.5), (0, 0.5)]
    # The same image under two seeds counts once, with its largest activation.
    doubled = pd.concat([images, images.assign(code_values=[[1.0, 9.0], [2.5], [3.0, 0.1]])])
    assert [(t["index"], t["activation"]) for t in cards.top_images(doubled, 3, "code", n=5)] == [(0, 9.0), (1, 2.5)]
    assert cards.class_rates(images, 1, "code0", ["a", "b"]) == {"a": 0.0, "b": 1.0}
    # The label is the class prompt closest to the decoder direction.
    W = torch.eye(4)
    text = torch.tensor([[0.0, 0.0, 0.0, 5.0], [1.0, 0.0, 0.0, 0.2]])
    built = cards.build_cards(images, W, text, ["a", "b"], cards.CardsConfig(features=1, images=2))
    assert [(c["feature"], c["direction"], c["label"]) for c in built] == [(3, "added", "a"), (0, "removed", "b")]
    assert built[0]["label_cosine"] == pytest.approx(1.0)


def test_cards_stage_writes_png_json_and_index(tmp_path, tiny_world):
    from saeft.analysis import cards
    from saeft.infra.io import save_tensors

    sae_path = tmp_path / "sae.safetensors"
    _sae_for(8, sae_path)
    head = tmp_path / "head.safetensors"
    save_tensors(head, {"weight": torch.randn(10, 8, generator=torch.Generator().manual_seed(0))})
    table = _image_table("sketch", [(i % 10, {i % 5: 1.0}, {(i + 1) % 7: float(i + 1)}) for i in range(12)])
    path = tmp_path / "ft.parquet"
    table.to_parquet(path)
    cards.run({"ft": [path]}, sae_path, head, "shapes", tiny_world, cards.CardsConfig(features=2, images=3, thumbnail=16), tmp_path / "out")
    assert (tmp_path / "out" / "ft.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import json

    written = json.loads((tmp_path / "out" / "ft.json").read_text())["cards"]
    assert len(written) == 4 and all(len(c["top_images"]) <= 3 for c in written)
    assert all(t["evalset"] == "sketch" for c in written for t in c["top_images"])
    index = (tmp_path / "out" / "cards.md").read_text()
    assert "![ft](ft.png)" in index and index.count("| added |") == 2 and index.count("| removed |") == 2


def test_feature_tables_join_accuracy_and_summarize_over_seeds(tmp_path):
    import json

    from saeft.analysis import tables
    from saeft.config.aggregate import AggregateConfig

    measures = {m: 0.0 for m in tables.MEASURES}
    analyses, images, evals = [], [], []
    for method in ("ft", "saeft"):
        for seed in (0, 1):
            evalsets = {}
            for evalset, role in (("test", "id"), ("sketch", "ood"), ("hard", "ood")):
                added = (1.0 if method == "ft" else 0.5) + seed + (evalset == "hard")
                evalsets[evalset] = {**measures, "role": role, "n": 2, "mean_added": added, "cka": 0.9, "fvu_zeroshot": 0.1}
                ev = tmp_path / f"eval_{method}_{seed}_{evalset}.json"
                ev.write_text(json.dumps({"study": "s", "model": "m", "dataset": "shapes", "method": method, "seed": seed,
                                          "evalset": evalset, "role": role, "metric": "top1", "value": 0.5 + 0.1 * seed, "n": 2}))
                evals.append(ev)
            path = tmp_path / f"{method}_{seed}.json"
            path.write_text(json.dumps({"model": "m", "dataset": "shapes", "method": method, "seed": seed, "evalsets": evalsets}))
            analyses.append(path)
            img = tmp_path / f"{method}_{seed}.parquet"
            _image_table("sketch", [(0, {1: 1.0}, {2: 1.0}), (1, {1: 1.0}, {1: 1.0, 4: 1.0})]).to_parquet(img)
            images.append(img)
    for evalset, role in (("test", "id"), ("sketch", "ood"), ("hard", "ood")):
        ev = tmp_path / f"eval_zs_{evalset}.json"
        ev.write_text(json.dumps({"study": "s", "model": "m", "dataset": "shapes", "method": "zeroshot", "seed": None,
                                  "evalset": evalset, "role": role, "metric": "top1", "value": 0.4, "n": 2}))
        evals.append(ev)
    tables.run(analyses, images, evals, tmp_path / "tables", tmp_path / "figures", AggregateConfig(), top=3)
    table = pd.read_parquet(tmp_path / "tables" / tables.FEATURES_PARQUET)
    assert len(table) == 12 and table["value"].notna().all()
    summary = pd.read_csv(tmp_path / "tables" / tables.FEATURES_SUMMARY_CSV).set_index("method")
    # ft ID: seeds give 1 and 2 -> 1.5 ± 0.707; OOD: per seed mean(1, 2)=1.5 and 2.5 -> 2.0.
    assert summary.loc["ft", "mean_added ID mean"] == pytest.approx(1.5)
    assert summary.loc["ft", "mean_added ID std"] == pytest.approx(math.sqrt(0.5))
    assert summary.loc["ft", "mean_added OOD mean"] == pytest.approx(2.0)
    assert summary.loc["saeft", "value OOD mean"] == pytest.approx(0.55)
    top = pd.read_csv(tmp_path / "tables" / tables.FEATURES_TOP_CSV)
    ft_added = top[(top.method == "ft") & (top.direction == "added") & (top.role == "ood")]
    assert ft_added[["feature", "count", "fraction"]].values.tolist() == [[2, 2, 0.5], [4, 2, 0.5]]
    md = (tmp_path / "tables" / tables.FEATURES_SUMMARY_MD).read_text()
    labels = [line.strip("|").split("|")[0].strip() for line in md.splitlines() if line.startswith("|")]
    assert "FT" in labels and "SAE-FT" in labels and "added / image ID" in md
    for name in tables.FIGURE_FILES:
        assert (tmp_path / "figures" / name).stat().st_size > 0
