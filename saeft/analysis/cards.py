"""Stage ``plot_feature_cards``: a card for each feature that fine-tuning most often added or
removed, per method, from the per-image tables of ``analyze_features``.

A method's features are ranked by how many eval images (pooled over seeds and eval sets) gained
them (added) or lost them (removed). Each card shows:

- the images of the eval sets on which the feature is most active, un-normalised as the dataset
  stores them: under the fine-tuned code ``s_theta`` for an added feature (where the model now
  sees it), under the zero-shot code ``s_0`` for a removed one (where it used to);
- the classes it fires on: per class, the fraction of images where it is active, zero-shot and
  fine-tuned;
- a label: the class whose prompt embedding (a row of the zero-shot head, normalised) has the
  largest cosine with the feature's decoder direction.

Writes one PNG (a row per card) and one JSON per method, and a Markdown index of all methods.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from saeft.config.stages import CardsConfig
from saeft.data.registry import get_dataset
from saeft.infra.io import atomic_path, load_tensors, write_json
from saeft.sae import load_sae

logger = logging.getLogger(__name__)

DIRECTIONS = {"added": "code", "removed": "code0"}
"""Direction of change -> the code (column prefix) whose activations pick the card's images."""


def rank_changed(images: pd.DataFrame, direction: str) -> list[tuple[int, int]]:
    """(feature, images it was ``direction``-ed on) pairs, most first (ties: lower id first)."""
    counts = Counter(int(f) for row in images[direction] for f in row)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def activations(images: pd.DataFrame, feature: int, code: str) -> np.ndarray:
    """Per row of ``images``, the value of ``feature`` in its code ``code`` (``code`` or ``code0``)
    (0 where inactive)."""
    out = np.zeros(len(images))
    for i, (feats, vals) in enumerate(zip(images[f"{code}_features"], images[f"{code}_values"])):
        hit = np.flatnonzero(np.asarray(feats) == feature)
        if len(hit):
            out[i] = vals[hit[0]]
    return out


def top_images(images: pd.DataFrame, feature: int, code: str, n: int) -> list[dict[str, Any]]:
    """The ``n`` distinct eval images (eval set, index) on which ``feature`` is most active in
    ``code``; an image seen under several seeds counts once, with its largest activation."""
    act = activations(images, feature, code)
    frame = images[["evalset", "index", "label"]].assign(activation=act)
    frame = frame[frame["activation"] > 0]
    best = frame.sort_values(["activation", "evalset", "index"], ascending=[False, True, True])
    best = best.drop_duplicates(["evalset", "index"]).head(n)
    return [
        {"evalset": str(r["evalset"]), "index": int(r["index"]), "label": int(r["label"]), "activation": float(r["activation"])}
        for r in best.to_dict("records")
    ]


def class_rates(images: pd.DataFrame, feature: int, code: str, classnames: Sequence[str]) -> dict[str, float]:
    """Per class, the fraction of its rows where ``feature`` is active in ``code``."""
    on = activations(images, feature, code) != 0
    labels = images["label"].to_numpy()
    return {
        name: float(on[labels == c].mean()) for c, name in enumerate(classnames) if (labels == c).any()
    }


def prompt_cosines(direction: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine of a decoder direction (d,) with each class prompt embedding (C, d)."""
    return F.normalize(text.double(), dim=-1) @ F.normalize(direction.double(), dim=0)


def build_cards(
    images: pd.DataFrame,
    W_dec: torch.Tensor,
    text: torch.Tensor,
    classnames: Sequence[str],
    cfg: CardsConfig,
) -> list[dict[str, Any]]:
    """The cards of one method: for each direction its ``cfg.features`` most changed features."""
    n_images = len(images.drop_duplicates(["evalset", "index"]))
    n_rows = max(len(images), 1)
    cards = []
    for direction, code in DIRECTIONS.items():
        for feature, count in rank_changed(images, direction)[: cfg.features]:
            cos = prompt_cosines(W_dec[:, feature], text)
            order = torch.argsort(cos, descending=True)
            cards.append({
                "feature": feature,
                "direction": direction,
                "count": count,
                "fraction": count / n_rows,
                "label": classnames[int(order[0])],
                "label_cosine": float(cos[order[0]]),
                "prompt_cosines": {classnames[int(c)]: float(cos[c]) for c in order},
                "fires_zeroshot": class_rates(images, feature, "code0", classnames),
                "fires_tuned": class_rates(images, feature, "code", classnames),
                "top_images": top_images(images, feature, code, cfg.images),
                "eval_images": n_images,
            })
    return cards


def _top_classes(rates: Mapping[str, float], n: int = 3) -> str:
    ranked = sorted(rates.items(), key=lambda item: -item[1])[:n]
    return ", ".join(f"{name} {rate:.0%}" for name, rate in ranked if rate > 0) or "none"


def _raw_image(image: Any) -> np.ndarray:
    """The un-normalised RGB pixels of a dataset image (what the dataset stores, no transform)."""
    return np.asarray(image.convert("RGB"))


def load_card_images(dataset: str, options: Any, cards: Sequence[dict[str, Any]], size: int) -> dict[tuple[str, int], np.ndarray]:
    """Pixels (size x size, uint8 RGB) of every image the cards show, from the dataset's loader
    with no normalisation."""
    from PIL import Image

    spec = get_dataset(dataset, options)
    wanted: dict[str, set[int]] = {}
    for card in cards:
        for image in card["top_images"]:
            wanted.setdefault(image["evalset"], set()).add(image["index"])
    pixels = {}
    for split, indices in wanted.items():
        data = spec.load(split, _raw_image, options)
        for index in sorted(indices):
            array = data[index][0]
            pixels[(split, index)] = np.asarray(Image.fromarray(array).resize((size, size), Image.NEAREST))
    return pixels


def plot_cards(
    cards: Sequence[dict[str, Any]],
    pixels: Mapping[tuple[str, int], np.ndarray],
    classnames: Sequence[str],
    title: str,
    n_images: int,
    path: str | os.PathLike,
) -> None:
    """One row per card: a text panel, then its top-activating images; saved atomically."""
    rows = max(len(cards), 1)
    fig = Figure(figsize=(4.4 + 1.05 * n_images, 1.45 * rows + 0.5))
    grid = fig.add_gridspec(rows, n_images + 1, width_ratios=[4.2] + [1.0] * n_images, wspace=0.08, hspace=0.55)
    if not cards:
        ax = fig.add_subplot(grid[0, :])
        ax.axis("off")
        ax.text(0.5, 0.5, "no feature was added or removed", ha="center", va="center")
    for r, card in enumerate(cards):
        text = fig.add_subplot(grid[r, 0])
        text.axis("off")
        sign = "+" if card["direction"] == "added" else "−"
        which = card["fires_tuned"] if card["direction"] == "added" else card["fires_zeroshot"]
        text.text(
            0.0, 0.5,
            f"{sign} feature {card['feature']}: {card['direction']} on {card['count']} images\n"
            f"nearest prompt: {card['label']} (cos {card['label_cosine']:.2f})\n"
            f"fires {'after FT' if card['direction'] == 'added' else 'zero-shot'} on:\n{_top_classes(which)}",
            fontsize=7.5, va="center", ha="left", transform=text.transAxes,
        )
        for c in range(n_images):
            ax = fig.add_subplot(grid[r, c + 1])
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(card["top_images"]):
                ax.axis("off")
                continue
            image = card["top_images"][c]
            ax.imshow(pixels[(image["evalset"], image["index"])])
            ax.set_title(f"{classnames[image['label']]}\n{image['evalset']} {image['activation']:.2f}", fontsize=6, pad=2)
    fig.suptitle(title, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def to_markdown(cards_by_method: Mapping[str, Sequence[dict[str, Any]]], dataset: str) -> str:
    """An index of every method's cards: feature, direction, count, label, classes it fires on."""
    lines = [f"# Feature cards: {dataset}", ""]
    for method, cards in cards_by_method.items():
        lines += [f"## {method}", "", f"![{method}]({method}.png)", "",
                  "| feature | change | images | nearest prompt (cos) | fires zero-shot | fires fine-tuned |",
                  "|---:|:---|---:|:---|:---|:---|"]
        for card in cards:
            lines.append(
                f"| {card['feature']} | {card['direction']} | {card['count']} | {card['label']} "
                f"({card['label_cosine']:.2f}) | {_top_classes(card['fires_zeroshot'])} | {_top_classes(card['fires_tuned'])} |"
            )
        if not cards:
            lines.append("| – | none | 0 | – | – | – |")
        lines.append("")
    return "\n".join(lines)


def run(
    image_tables: Mapping[str, Sequence[str | os.PathLike]],
    sae_path: str | os.PathLike,
    head_path: str | os.PathLike,
    dataset: str,
    dataset_options: Any,
    cfg: CardsConfig,
    out_dir: str | os.PathLike,
) -> dict[str, float]:
    """Cards of every method of ``image_tables`` (method -> its per-image Parquet files, one per
    seed) into ``out_dir``: ``{method}.png``, ``{method}.json`` and ``cards.md``."""
    spec = get_dataset(dataset, dataset_options)
    sae = load_sae(sae_path)
    head, _ = load_tensors(head_path)
    text = head["weight"]
    if text.shape != (len(spec.classnames), sae.d):
        raise ValueError(f"{head_path}: head of shape {tuple(text.shape)}, expected ({len(spec.classnames)}, {sae.d})")
    W_dec = sae.W_dec.detach()
    cards_by_method = {}
    for method, paths in image_tables.items():
        if not paths:
            raise ValueError(f"plot_feature_cards: no per-image tables for method {method!r}")
        images = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
        cards = build_cards(images, W_dec, text, spec.classnames, cfg)
        if len(cards) < 2 * cfg.features:
            logger.info("%s: only %d features changed; %d cards", method, len(cards), len(cards))
        pixels = load_card_images(dataset, dataset_options, cards, cfg.thumbnail)
        title = f"{dataset} / {method}: most often added (+) and removed (−) SAE features ({len(paths)} seed(s))"
        plot_cards(cards, pixels, spec.classnames, title, cfg.images, os.path.join(out_dir, f"{method}.png"))
        write_json(os.path.join(out_dir, f"{method}.json"), {"dataset": dataset, "method": method, "cards": cards})
        cards_by_method[method] = cards
        logger.info("%s/%s: %d feature cards", dataset, method, len(cards))
    with atomic_path(os.path.join(out_dir, "cards.md")) as tmp:
        tmp.write_text(to_markdown(cards_by_method, dataset), encoding="utf-8")
    return {f"{method}/cards": float(len(cards)) for method, cards in cards_by_method.items()}
