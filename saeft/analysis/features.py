"""Stage ``analyze_features``: what one fine-tuned model added and removed, in zero-shot SAE
features, on every evaluation set of its dataset.

For each eval image the zero-shot embedding ``e_0`` (from the HDF5 cache of that split) and the
fine-tuned embedding ``e_theta`` are prepared the way the SAE records (``sae.prepare``: L2 or
none), encoded with the SAE's own encoder, frozen, exactly as the regulariser encodes them
(``s_0``, ``s_theta``), and compared:

- features added (active in ``s_theta`` only) and removed (active in ``s_0`` only), their counts
  and activation mass (the summed code values of the added features in ``s_theta``, of the
  removed ones in ``s_0``);
- representation drift over the eval set: linear CKA of ``z_0`` and ``z_theta``, FVU of
  ``z_theta`` under the zero-shot SAE (beside that of ``z_0``), cosine similarity per image;
- the decoder-span share of ``delta = z_theta - z_0``: the fraction of ``||delta||^2`` that lies
  in the span of the decoder columns active in ``s_0`` or ``s_theta``. The whole decoder is
  overcomplete and of full rank, so its span is every direction and that share would be 1 for
  any change; the active columns (at most ``2k``) are what the code can actually use, so that is
  the reported share (``span_share``), with the share of the alignment residual
  ``r = delta - W_dec (s_theta - s_0)`` that SAE-FT's ``mu`` term penalises beside it.

Writes a JSON of per-eval-set summaries (per class, ranked most added and removed features) and a
Parquet table with one row per (eval set, image), codes included, from which the feature cards
are drawn.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from saeft.analysis import metrics
from saeft.config.stages import AnalysisConfig
from saeft.data.registry import get_dataset
from saeft.infra.io import atomic_path, write_json
from saeft.nn.embeddings import read_cache
from saeft.nn.models import ImageClassifier, load_run_model, preprocess_for
from saeft.nn.training import Progress, default_device, eval_loader, setup_torch
from saeft.sae import TopKSAE, load_sae

logger = logging.getLogger(__name__)

# Rows encoded at once (bounds the dense (rows, n_features) codes).
_ENCODE_CHUNK = 4096

IMAGE_COLUMNS = (
    "evalset", "index", "label", "n_added", "n_removed", "mass_added", "mass_removed",
    "cosine", "span_share", "residual_share", "delta_norm",
    "added", "removed", "code0_features", "code0_values", "code_features", "code_values",
)
"""Columns of the per-image table: eval set, row in the split, label, the change measures, the
added and removed feature ids, and both sparse codes (``code0_*``: zero-shot ``s_0``,
``code_*``: fine-tuned ``s_theta``; feature ids ascending)."""


@torch.no_grad()
def embed(classifier: ImageClassifier, data: torch.utils.data.Dataset, batch_size: int, label: str, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-projection embeddings (unnormalised, as the cache stores them, on the CPU) and labels of
    ``data``; the classifier runs on the device it is on."""
    classifier.eval()
    device = next(classifier.parameters()).device
    embeddings, labels = [], []
    progress = Progress(len(data), label)
    for images, targets in eval_loader(data, batch_size, workers, device):
        embeddings.append(classifier.embed(images.to(device, non_blocking=True)).float().cpu())
        labels.append(targets)
        progress.update(sum(len(t) for t in labels))
    return torch.cat(embeddings), torch.cat(labels)


@torch.no_grad()
def encode(sae: TopKSAE, prepared: torch.Tensor) -> torch.Tensor:
    """Dense codes of prepared embeddings with the frozen SAE's inference encoder: the
    ``sae(..., frozen=True)`` of the regulariser."""
    parts = [
        sae(prepared[start : start + _ENCODE_CHUNK], frozen=True, dense=True).dense
        for start in range(0, len(prepared), _ENCODE_CHUNK)
    ]
    return torch.cat(parts) if parts else prepared.new_zeros(0, sae.n_features)


def _ranked(mask: torch.Tensor, mass: torch.Tensor, top: int) -> list[dict[str, Any]]:
    """Features by how many rows of ``mask`` (N, n_features) they are set in, then by mass."""
    counts = mask.sum(dim=0).double()
    masses = (mass.double() * mask).sum(dim=0)
    order = np.lexsort((np.arange(len(counts)), -masses.numpy(), -counts.numpy()))
    n = max(mask.shape[0], 1)
    return [
        {"feature": int(f), "count": int(counts[f]), "fraction": float(counts[f]) / n, "mass": float(masses[f])}
        for f in order[:top]
        if counts[f] > 0
    ]


def _sparse_lists(code: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
    features, values = [], []
    for row in code:
        idx = row.nonzero().flatten()
        features.append(idx.tolist())
        values.append(row[idx].tolist())
    return features, values


def analyze_split(
    e_0: torch.Tensor,
    e_theta: torch.Tensor,
    labels: torch.Tensor,
    sae: TopKSAE,
    classnames: Sequence[str],
    top_features: int,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Compare zero-shot and fine-tuned raw embeddings (N, d) of one eval set through ``sae``.

    Returns the eval set's summary (means, drift, ranked features, per class) and the per-image
    table (the :data:`IMAGE_COLUMNS` but ``evalset``).
    """
    if e_0.shape != e_theta.shape or e_0.shape[0] != labels.shape[0]:
        raise ValueError(f"analyze_split: shapes differ: e_0 {tuple(e_0.shape)}, e_theta {tuple(e_theta.shape)}, labels {tuple(labels.shape)}")
    if e_0.shape[1] != sae.d:
        raise ValueError(f"analyze_split: embeddings have dim {e_0.shape[1]}, the SAE expects {sae.d}")
    z_0, z_theta = sae.prepare(e_0.float()), sae.prepare(e_theta.float())
    s_0, s_theta = encode(sae, z_0), encode(sae, z_theta)
    changes = metrics.feature_changes(s_0, s_theta)
    W_dec = sae.W_dec.detach()
    delta = z_theta - z_0
    support = metrics.active(s_0) | metrics.active(s_theta)
    span = metrics.active_span_share(delta, W_dec, support)
    residual = metrics.alignment_residual_share(delta, s_0, s_theta, W_dec)
    cosine = metrics.cosine_similarity(e_0, e_theta)
    with torch.no_grad():
        recon_0 = sae.decode(s_0)
        recon_theta = sae.decode(s_theta)

    table = _image_table(labels, changes, cosine, span, residual, delta, s_0, s_theta)
    per_class = _per_class(labels, classnames, changes, s_0, s_theta, top_features)
    n = len(labels)
    summary = {
        "n": n,
        "mean_added": float(changes.n_added.double().mean()),
        "mean_removed": float(changes.n_removed.double().mean()),
        "mean_mass_added": float(changes.mass_added.mean()),
        "mean_mass_removed": float(changes.mass_removed.mean()),
        "changed_fraction": float(((changes.n_added + changes.n_removed) > 0).double().mean()),
        "l0_zeroshot": float(metrics.active(s_0).sum(dim=-1).double().mean()),
        "l0_tuned": float(metrics.active(s_theta).sum(dim=-1).double().mean()),
        "cka": metrics.linear_cka(z_0, z_theta) if n >= 2 else float("nan"),
        "fvu_tuned": metrics.fvu(z_theta, recon_theta) if n >= 2 else float("nan"),
        "fvu_zeroshot": metrics.fvu(z_0, recon_0) if n >= 2 else float("nan"),
        "mean_cosine": float(cosine.mean()),
        "cosine_drift": float(1.0 - cosine.mean()),
        # Mean over images whose embedding changed (NaN rows have no change to share out).
        "span_share": _nanmean(span),
        "residual_share": _nanmean(residual),
        "span_share_full_decoder": _nanmean(metrics.span_share(delta, W_dec)),
        # A random direction would put about (support size / d) of itself in that span.
        "mean_support": float(support.sum(dim=-1).double().mean()),
        "top_added": _ranked(changes.added, s_theta, top_features),
        "top_removed": _ranked(changes.removed, s_0, top_features),
        "per_class": per_class,
    }
    return summary, table


def _image_table(labels: torch.Tensor, changes: Any, cosine: torch.Tensor, span: torch.Tensor, residual: torch.Tensor,
                 delta: torch.Tensor, s_0: torch.Tensor, s_theta: torch.Tensor) -> pd.DataFrame:
    """The per-image table of one eval set (the :data:`IMAGE_COLUMNS` but ``evalset``)."""
    code0_features, code0_values = _sparse_lists(s_0)
    code_features, code_values = _sparse_lists(s_theta)
    return pd.DataFrame({
        "index": np.arange(len(labels), dtype=np.int64),
        "label": labels.numpy().astype(np.int64),
        "n_added": changes.n_added.numpy().astype(np.int64),
        "n_removed": changes.n_removed.numpy().astype(np.int64),
        "mass_added": changes.mass_added.numpy(),
        "mass_removed": changes.mass_removed.numpy(),
        "cosine": cosine.numpy(),
        "span_share": span.numpy(),
        "residual_share": residual.numpy(),
        "delta_norm": delta.double().norm(dim=-1).numpy(),
        "added": [row.nonzero().flatten().tolist() for row in changes.added],
        "removed": [row.nonzero().flatten().tolist() for row in changes.removed],
        "code0_features": code0_features,
        "code0_values": code0_values,
        "code_features": code_features,
        "code_values": code_values,
    })


def _per_class(labels: torch.Tensor, classnames: Sequence[str], changes: Any, s_0: torch.Tensor,
               s_theta: torch.Tensor, top_features: int) -> dict[str, Any]:
    """Per class present: image count, mean features added and removed, the most changed ones."""
    per_class = {}
    for c, name in enumerate(classnames):
        rows = labels == c
        if not rows.any():
            continue
        per_class[name] = {
            "n": int(rows.sum()),
            "mean_added": float(changes.n_added[rows].double().mean()),
            "mean_removed": float(changes.n_removed[rows].double().mean()),
            "top_added": _ranked(changes.added[rows], s_theta[rows], top_features),
            "top_removed": _ranked(changes.removed[rows], s_0[rows], top_features),
        }
    return per_class


def _nanmean(values: torch.Tensor) -> float:
    finite = values[~values.isnan()]
    return float(finite.mean()) if len(finite) else float("nan")


def run(
    model: str | os.PathLike,
    dataset: str,
    dataset_options: Any,
    caches: Mapping[str, str | os.PathLike],
    sae_path: str | os.PathLike,
    cfg: AnalysisConfig,
    out_json: str | os.PathLike,
    out_images: str | os.PathLike,
    identity: dict[str, Any],
    head: str | os.PathLike | None = None,
    wiseft: tuple[str | os.PathLike, str | os.PathLike, float] | None = None,
) -> dict[str, float]:
    """Analyse the model at ``model`` (with ``head``: a zero-shot CLIP; with ``wiseft``: its
    interpolation with the zero-shot model, :func:`saeft.nn.models.load_run_model`) on every split of
    ``caches`` (split -> HDF5 cache of its zero-shot embeddings); write ``out_json`` and the
    per-image Parquet ``out_images``. Returns headline numbers per split for the job's log."""
    setup_torch(0)
    spec = get_dataset(dataset, dataset_options)
    if not caches:
        raise ValueError("analyze_features: no eval-set caches given")
    classifier = load_run_model(model, head, wiseft).to(default_device())
    sae = load_sae(sae_path)
    transform = preprocess_for(classifier.visual)
    evalsets: dict[str, Any] = {}
    tables = []
    headline: dict[str, float] = {}
    for split, cache_path in caches.items():
        cached, cached_labels, attrs = read_cache(cache_path)
        if attrs.get("dataset") != dataset or attrs.get("split") != split:
            raise ValueError(f"{cache_path}: cache of {attrs.get('dataset')}/{attrs.get('split')}, expected {dataset}/{split}")
        data = spec.load(split, transform, dataset_options)
        e_theta, labels = embed(classifier, data, cfg.batch_size, f"analyze {dataset}/{split}", cfg.workers)
        if not np.array_equal(labels.numpy(), cached_labels):
            raise ValueError(f"{cache_path}: labels differ from those of {dataset}/{split}: the cache is stale")
        summary, table = analyze_split(torch.from_numpy(cached), e_theta, labels, sae, spec.classnames, cfg.top_features)
        evalsets[split] = {"role": spec.role(split), **summary}
        tables.append(table.assign(evalset=split))
        headline.update({f"{split}/{key}": summary[key] for key in ("mean_added", "mean_removed", "cka", "fvu_tuned", "span_share")})
        logger.info(
            "%s/%s %s: +%.2f / -%.2f features per image, CKA %.3f, FVU %.3f (zero-shot %.3f), span share %.3f",
            dataset, split, identity.get("method"), summary["mean_added"], summary["mean_removed"],
            summary["cka"], summary["fvu_tuned"], summary["fvu_zeroshot"], summary["span_share"],
        )
    images = pd.concat(tables, ignore_index=True).reindex(columns=list(IMAGE_COLUMNS))
    with atomic_path(out_images) as tmp:
        images.to_parquet(tmp, engine="pyarrow", index=False)
    write_json(out_json, {
        **identity,
        "dataset": dataset,
        "classnames": list(spec.classnames),
        "sae": {"path": str(sae_path), "d": sae.d, "n_features": sae.n_features, "k": sae.k,
                "normalize": sae.normalize, "architecture": sae.architecture},
        "evalsets": evalsets,
    })
    return headline
