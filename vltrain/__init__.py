"""vltrain: fine-tune and serve InternVL 1.5 / 2.0 vision-language models."""
__version__ = "0.1.0"
