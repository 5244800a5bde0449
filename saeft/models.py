"""The public import path of saeft's CLIP models (``from saeft.models import load_classifier``): the
code is :mod:`saeft.nn.models`; the package's own modules import it from there."""

from saeft.nn.models import (
    ImageClassifier,
    create_clip,
    load_classifier,
    load_clip,
    load_model,
    load_run_model,
    load_wiseft,
    open_clip_module,
    preprocess_for,
    tokenizer_for,
    zeroshot_head,
)

__all__ = ["ImageClassifier", "create_clip", "load_classifier", "load_clip", "load_model", "load_run_model", "load_wiseft",
           "open_clip_module", "preprocess_for", "tokenizer_for", "zeroshot_head"]
