"""Language models built from the layers: a decoder LM with a per-layer mixer pattern."""

from tnt_jax.models.config import ATTENTION_MIXERS, MIXERS, LMConfig
from tnt_jax.models.lm import LanguageModel, param_summary
