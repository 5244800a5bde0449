"""What fine-tuning added to and removed from the representation, read through the zero-shot SAE.

- :mod:`saeft.analysis.metrics`: the measures themselves (active sets of codes, linear CKA, FVU,
  cosine drift, the share of an embedding change that decoder directions span), pure tensors;
- :mod:`saeft.analysis.features`: stage ``analyze_features``, one fine-tuned model on every eval
  set of its dataset: per-image codes and changes, per-class and per-eval-set summaries;
- :mod:`saeft.analysis.cards`: stage ``plot_feature_cards``, a card per most-changed feature
  (top-activating images, the classes it fires on, the nearest class prompt);
- :mod:`saeft.analysis.tables`: stage ``aggregate_features``, tables and figures over methods
  and seeds, joined with the evaluation results.
"""
