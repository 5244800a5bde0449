"""Helpers the torch stages share: CLIP models and heads, weights, training loops' pieces, views,
metrics, embedding caches, the fine-tuning loss and DDP, the linear probe and the SAE penalty."""
