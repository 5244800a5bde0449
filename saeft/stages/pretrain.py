"""Stage ``pretrain_clip``: contrastive pretraining of a small CLIP on a dataset's captioned corpus.

The offline studies cannot download CLIP weights, so they make their own: open_clip's contrastive
loss over the pretraining corpus that a registered dataset offers (``pretrain.dataset``): for the
shapes world, images of every domain without the shortcut; for Fashion-MNIST, clean, corrupted and
restyled images disjoint from the fine-tuning ones; captions name class and style. The result has
real zero-shot ability on those domains, which ID fine-tuning can erode.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from saeft.config.stages import PretrainConfig
from saeft.data.registry import get_dataset
from saeft.nn.models import create_clip, open_clip_module, preprocess_for, save_clip, tokenizer_for
from saeft.nn.training import CHECKPOINT_NAME, Curve, CurveSink, Progress, resume_checkpoint, save_checkpoint, setup_torch, warmup_cosine

logger = logging.getLogger(__name__)


def batch_rows(groups: list[np.ndarray], n_domains: int, per_class: int | None, rng: np.random.Generator,
               shared: bool = False) -> np.ndarray:
    """The rows of one batch: ``groups`` holds the rows of each (class, domain) pair, class by
    class; one row of every pair, or (``per_class``) of that many pairs of each class, their
    domains drawn at random without replacement, per class or (``shared``) once for the batch."""
    if per_class is not None:
        n_classes = len(groups) // n_domains
        if shared:
            picks = [np.sort(rng.choice(n_domains, per_class, replace=False))] * n_classes
        else:
            picks = [np.sort(rng.choice(n_domains, per_class, replace=False)) for _ in range(n_classes)]
        groups = [groups[c * n_domains + d] for c, domains in enumerate(picks) for d in domains]
    return np.array([group[rng.integers(len(group))] for group in groups])


def describes(labels: np.ndarray, domains: np.ndarray, styleless: np.ndarray,
              named: np.ndarray | None = None) -> torch.Tensor:
    """(B, B) bool, True where caption j describes image i: it names image i's class (``named``,
    else its own image's label), and no style or image i's domain. A caption always describes
    its own image, as CLIP pairs a web image with its caption, right or wrong."""
    named = labels if named is None else named
    same_class = labels[:, None] == named[None, :]
    own = np.eye(len(labels), dtype=bool)
    return torch.from_numpy(own | (same_class & ((domains[:, None] == domains[None, :]) | styleless[None, :])))


def multi_positive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                        positives: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric contrastive loss where an image (a caption) may have several positives:
    minus the log of the softmax mass on them, both ways, averaged. With one positive each (the
    identity) it is CLIP's loss."""
    logits = logit_scale * image_features @ text_features.T
    on_positives = logits.masked_fill(~positives, float("-inf"))
    image_to_text = torch.logsumexp(logits, 1) - torch.logsumexp(on_positives, 1)
    text_to_image = torch.logsumexp(logits, 0) - torch.logsumexp(on_positives, 0)
    return (image_to_text.mean() + text_to_image.mean()) / 2


def caption_positives(corpus: Any, labels: np.ndarray, domains: np.ndarray, texts: list[str]) -> torch.Tensor:
    """:func:`describes` for one batch's images and captions (a corpus without a ``styleless``
    test names every caption's style)."""
    styleless = np.array([corpus.styleless is not None and corpus.styleless(text) for text in texts])
    named = None if corpus.named_class is None else np.array([corpus.named_class(text) for text in texts])
    return describes(labels, domains, styleless, named)


@functools.cache
def _clip_loss() -> torch.nn.Module:
    return open_clip_module().ClipLoss()


def contrastive_loss(model: torch.nn.Module, pixels: torch.Tensor, texts: list[str], tokenizer: Callable,
                     positives: torch.Tensor | None) -> torch.Tensor:
    """The loss of one batch of (image, caption) pairs: open_clip's ClipLoss, or with
    ``positives`` (:func:`describes`) :func:`multi_positive_loss`."""
    image_features, text_features, logit_scale = model(pixels, tokenizer(texts))
    if positives is None:
        return _clip_loss()(image_features, text_features, logit_scale)
    return multi_positive_loss(image_features, text_features, logit_scale, positives)


def _optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with the fused kernel where every parameter allows it: it updates them in one pass
    (the 3.2M token embeddings of the text tower made the optimiser step a quarter of a CPU step)."""
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters()) or None
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def _domains_per_class(cfg: PretrainConfig, n_domains: int) -> int | None:
    """``cfg.domains_per_class`` checked against the corpus; None where it means every domain
    (the default's batches and random stream)."""
    per_class = cfg.domains_per_class
    if per_class is not None and per_class > n_domains:
        raise ValueError(f"pretrain.domains_per_class: {per_class} is more than the {n_domains} domains of {cfg.dataset}'s corpus")
    return None if per_class == n_domains else per_class


def run(arch: str, options: Any, cfg: PretrainConfig, out: str | Path,
        on_step: Callable[[int], None] | None = None, curve: CurveSink | None = None) -> dict[str, Any]:
    """Pretrain ``arch`` on the corpus of dataset ``cfg.dataset`` and save it to ``out`` (safetensors).

    ``options`` are that dataset's loader options (for the shapes world its ``WorldConfig``).
    ``on_step(step)`` is called after each step (progress hooks, fault injection in tests);
    ``curve`` receives the training curve, ``loss`` and ``lr`` averaged over windows of steps
    (:class:`~saeft.nn.training.Curve`)."""
    setup_torch(cfg.seed, cfg.threads)  # the configured count, not the job's: it decides the weights
    model = create_clip(arch, pretrained=None)
    preprocess = preprocess_for(model)
    tokenizer = tokenizer_for(arch)
    corpus = get_dataset(cfg.dataset).pretrain_corpus(options)
    images, labels, domains = corpus.images, corpus.labels, corpus.domains
    pixels = torch.stack([preprocess(Image.fromarray(image)) for image in images])
    # Rows of each (class, domain) pair; a batch draws one row from each pair, or from
    # domains_per_class pairs of each class.
    n_domains = len(np.unique(domains))
    per_class = _domains_per_class(cfg, n_domains)
    groups = [np.flatnonzero((labels == c) & (domains == d)) for c in np.unique(labels) for d in np.unique(domains)]
    batch_size = len(groups) if per_class is None else per_class * len(groups) // n_domains
    logger.info("pretraining %s on %d captioned images of %s, %d pairs per batch", arch, len(labels), cfg.dataset, batch_size)

    optimizer = _optimizer(model, cfg)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps)
    progress = Progress(cfg.steps, "pretrain")
    points = Curve(curve, cfg.steps)
    rng = np.random.default_rng(cfg.seed)
    checkpoint = Path(out).with_name(CHECKPOINT_NAME)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    training_keys = {key: value for key, value in cfg.to_dict().items() if key != "min_zeroshot_acc"}
    identity = {"arch": arch, "options": options.to_dict() if hasattr(options, "to_dict") else options, "pretrain": training_keys}
    saved = resume_checkpoint(checkpoint, identity, parts)
    losses: list[float] = []
    if saved is not None:
        rng.bit_generator.state = saved["numpy_rng"]
        losses = saved["losses"]
    model.train()
    for step in range(len(losses) + 1, cfg.steps + 1):
        rows = batch_rows(groups, n_domains, per_class, rng, cfg.shared_domains)
        texts = [corpus.caption(int(labels[r]), str(domains[r]), rng) for r in rows]
        positives = caption_positives(corpus, labels[rows], domains[rows], texts) if cfg.multi_positive else None
        loss = contrastive_loss(model, pixels[rows], texts, tokenizer, positives)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # CLIP caps its inverse temperature at 100
            model.logit_scale.clamp_(0, np.log(100))
        losses.append(loss.item())
        points.add(step, loss=losses[-1], lr=scheduler.get_last_lr()[0])
        progress.update(step, loss=float(np.mean(losses[-20:])))
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save_checkpoint(checkpoint, identity, parts, {"numpy_rng": rng.bit_generator.state, "losses": losses})
        if on_step is not None:
            on_step(step)
    save_clip(out, model.eval(), arch, source="pretrain_clip")
    checkpoint.unlink(missing_ok=True)
    return {"final_loss": float(np.mean(losses[-20:])), "steps": cfg.steps, "n_images": len(labels), "batch_size": batch_size}
