"""saeft: robust fine-tuning of CLIP regularised by a sparse autoencoder (SAE-FT)."""

__version__ = "0.1.0"
