"""Reconstruction metrics of a trained SAE: FVU, L0, dead and dense fractions, zero-shot
accuracy of reconstructions (:func:`evaluate_sae`), and a streamed FVU over a cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saeft.sae.data import ChunkBatches
from saeft.sae.model import TopKSAE

# Rows per chunk when evaluating; keeps the dense (rows, n_features) code small in memory.
_EVAL_CHUNK = 4096


@torch.no_grad()
def evaluate_sae(
    sae: TopKSAE,
    prepared: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    head: torch.Tensor | None = None,
) -> dict[str, float]:
    """Reconstruction metrics of ``sae`` on already prepared embeddings (N, d).

    ``fvu`` is the summed squared error over the summed squared deviation from these embeddings'
    own mean; ``l0`` the mean count of non-zeros per row; ``dead_fraction`` the fraction of
    features that are never non-zero here; ``dense_fraction`` the fraction firing on more than
    10% of the rows. With ``labels`` and a zero-shot ``head`` (C, d) (logits =
    ``normalize(x) @ head.T``): ``zeroshot_acc`` of the embeddings and ``zeroshot_acc_recon`` of
    their reconstructions, and ``zeroshot_acc_kept`` their ratio.
    """
    n = prepared.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 embeddings to compute FVU, got {n}")
    was_training = sae.training
    sae.eval()
    sse, sst, nonzero, fires, correct, correct_recon = _accumulate(sae, prepared, labels, head)
    sae.train(was_training)
    if sst == 0.0:
        raise ValueError("all embeddings are identical: FVU is undefined")
    fvu = sse / sst
    metrics = {
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "l0": nonzero / n,
        "dead_fraction": (fires == 0).double().mean().item(),
        "dense_fraction": (fires > 0.1 * n).double().mean().item(),
        "mse": sse / prepared.numel(),
    }
    if head is not None and labels is not None:
        metrics["zeroshot_acc"] = correct / n
        metrics["zeroshot_acc_recon"] = correct_recon / n
        metrics["zeroshot_acc_kept"] = correct_recon / max(correct, 1)
    return metrics


def _accumulate(sae, prepared, labels, head):
    """Chunk by chunk: squared error and deviation sums, non-zero count, per-feature firing
    counts and the zero-shot hits of embeddings and reconstructions."""
    # float64 accumulators: sums over many rows lose precision in float32.
    mean = prepared.double().mean(dim=0)
    sse = 0.0
    sst = 0.0
    nonzero = 0
    fires = torch.zeros(sae.n_features, dtype=torch.float64)
    correct = correct_recon = 0
    for start in range(0, prepared.shape[0], _EVAL_CHUNK):
        chunk = prepared[start : start + _EVAL_CHUNK]
        out = sae(chunk)
        code, z_hat = out.code, out.recon
        sse += (z_hat.double() - chunk.double()).pow(2).sum().item()
        sst += (chunk.double() - mean).pow(2).sum().item()
        active = code.values != 0
        nonzero += int(active.sum().item())
        fires.index_add_(0, code.indices[active], torch.ones(int(active.sum()), dtype=torch.float64))
        if head is not None and labels is not None:
            target = labels[start : start + _EVAL_CHUNK]
            correct += int((F.normalize(chunk, dim=-1) @ head.T).argmax(-1).eq(target).sum())
            correct_recon += int((F.normalize(z_hat, dim=-1) @ head.T).argmax(-1).eq(target).sum())
    return sse, sst, nonzero, fires, correct, correct_recon


@torch.no_grad()
def stream_fvu(sae: TopKSAE, batches: ChunkBatches, sst: float) -> float:
    """FVU of ``sae`` over every batch of ``batches`` (prepared here), given the summed squared
    deviation ``sst`` of the prepared data from its mean."""
    sse = 0.0
    for batch in batches.epoch(None, shuffle=False):
        batch = sae.prepare(batch)
        sse += (sae(batch).recon.double() - batch.double()).pow(2).sum().item()
    return sse / max(sst, 1e-30)


__all__ = ["evaluate_sae", "stream_fvu"]
