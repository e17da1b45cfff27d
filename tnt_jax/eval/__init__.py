"""Evaluation of trained models: next-token bits on held-out text at several context lengths."""

from tnt_jax.eval.perplexity import bits_per_token, length_sweep, plot_length_sweep
