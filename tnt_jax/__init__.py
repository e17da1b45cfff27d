"""tnt_jax: language models with deep test-time memory, trained the TNT way."""

__version__ = "0.1.0"
