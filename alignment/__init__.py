"""vlm-align: post-training alignment for vision-language models."""

__version__ = "0.1.0"
