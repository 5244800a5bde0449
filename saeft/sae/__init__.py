"""Top-K sparse autoencoder on cached image embeddings (stage ``train_sae``).

The SAE encodes ``E(z) = Select(W_enc (z - b_pre) + b_enc)`` and decodes
``D(s) = W_dec s + b_pre`` (docs/methods.md; ``b_enc`` is zero unless trained with an encoder
bias). ``Select`` is Top-K per sample or Batch-Top-K. Decoder columns are the feature directions
and are kept at unit norm. Training and the regularizer never differentiate a dense
(batch x n_features) matmul: the pre-activations are computed once without autograd, only the k
kept entries are differentiated, and decoding gathers the active decoder columns
(``embedding_bag``).

One forward contract: ``sae(x, prepare=..., frozen=..., dense=...)`` returns an
:class:`SAEOutput` (the rows encoded, their sparse code, the decoded part ``W_dec s``, the
reconstruction and, on request, the dense code); training, evaluation, the regularizer and the
analysis all go through it.

Input convention: ``encode``, ``decode`` and ``forward`` work on *prepared* embeddings, i.e. after
:meth:`TopKSAE.prepare`, which applies the normalisation recorded in the SAE (``"l2"`` or
``"none"``). Callers holding raw embeddings pass ``prepare=True`` (or call ``sae.prepare(x)``
first); the regularizers do so themselves (by default: ``sae_penalty(..., inputs="raw")`` skips
it as the reference code does, see docs/penalty_scale.md).

Modules: :mod:`~saeft.sae.kernels` (sparse codes and their autograd kernels),
:mod:`~saeft.sae.model` (:class:`TopKSAE`, :class:`SAEOutput`), :mod:`~saeft.sae.files` (the
weight file), :mod:`~saeft.sae.data` (reading caches), :mod:`~saeft.sae.metrics` (FVU, L0...)
and :mod:`~saeft.sae.train` (training and the stages).
"""

from __future__ import annotations

from saeft.config.stages import SAETrainConfig
from saeft.sae.data import ChunkBatches, geometric_median, read_embeddings
from saeft.sae.files import load_sae, save_sae
from saeft.sae.kernels import SparseCode, sparse_decode, to_dense, topk_encode
from saeft.sae.metrics import evaluate_sae
from saeft.sae.model import ARCHITECTURES, NORMALIZATIONS, SAEOutput, TopKSAE
from saeft.sae.train import Trainer, run, run_sweep, sweep_configs, train_sae, train_saes

__all__ = [
    "ARCHITECTURES",
    "NORMALIZATIONS",
    "ChunkBatches",
    "SAEOutput",
    "SAETrainConfig",
    "SparseCode",
    "Trainer",
    "TopKSAE",
    "evaluate_sae",
    "geometric_median",
    "load_sae",
    "read_embeddings",
    "run",
    "run_sweep",
    "save_sae",
    "sparse_decode",
    "sweep_configs",
    "to_dense",
    "topk_encode",
    "train_sae",
    "train_saes",
]
