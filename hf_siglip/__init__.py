"""hf_siglip: train SigLIP-style image-text dual encoders with transformers, datasets and accelerate."""

from .loss import sigmoid_loss

__version__ = "0.1.0"
