"""A trained LanguageModel from a checkpoint, for generation and evaluation.

    model, config, vocab = load_trained_model("/tmp/tnt_jax_run/checkpoints")

The checkpoint's metadata holds the run's whole config, so the model is rebuilt exactly as it
was trained, then its parameters are read (the optimiser state is not).
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from ml_collections import config_dict

from tnt_jax import data
from tnt_jax.models import LMConfig, LanguageModel
from tnt_jax.train import checkpoint as ckpt_lib
from tnt_jax.train.trainer import data_config, lm_config


def load_trained_model(path: str, *, dtype: str | None = None
                       ) -> tuple[LanguageModel, config_dict.ConfigDict, data.Vocab]:
  """(model, run config, vocab) of a checkpoint dir (its latest step) or one step dir.
  dtype: override the compute dtype (e.g. "float32" for evaluation on a CPU)."""
  metadata = ckpt_lib.read_metadata(path)
  if "config" not in metadata:
    raise ValueError(f"checkpoint {path} has no run config in its metadata; it was not written "
                     "by experiments/train.py")
  config = config_dict.ConfigDict(metadata["config"])
  vocab = data.vocab_info(data_config(config))
  model_config: LMConfig = lm_config(config, vocab.vocab_size)
  overrides = {"remat": False}
  if dtype is not None:
    overrides["dtype"] = dtype
  model_config = dataclasses.replace(model_config, **overrides)
  abstract = nnx.eval_shape(lambda: LanguageModel(model_config, rngs=nnx.Rngs(0)))
  graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
  pure = nnx.to_pure_dict(abstract_params)
  pure = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pure)
  params = ckpt_lib.restore_subtree(path, pure)
  nnx.replace_by_pure_dict(abstract_params, params)
  return nnx.merge(graphdef, abstract_params, rest), config, vocab
