"""The training loop: `train_and_evaluate(config, workdir)`, everything the entry point runs.

One run = build data, model and mesh from the config (all checked before any compile); start
from the workdir's latest complete checkpoint, else from `init_from` (TNT stage 2), else from
scratch; then a jitted, donated step per batch. The loop dispatches step t before reading step
t-1's loss, so the host never stalls the device; a non-finite loss stops the run with the step
named, before anything is saved. SIGTERM saves a checkpoint and returns. Outputs in the workdir:
checkpoints/, logs/ (TensorBoard events and metrics.jsonl), loss.png.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from tnt_jax import data
from tnt_jax.layers.attention import AttentionConfig
from tnt_jax.layers.configs import TNTLayerConfig
from tnt_jax.layers.mac import MACConfig
from tnt_jax.models import LanguageModel, LMConfig, param_summary
from tnt_jax.models.flops import lm_train_flops
from tnt_jax.parallel import mesh as mesh_lib
from tnt_jax.parallel.context import check_context_split, use_gspmd_on_gpu
from tnt_jax.train import checkpoint as ckpt_lib
from tnt_jax.train import determinism, step_profile
from tnt_jax.train.metrics import MetricWriter, format_progress, plot_loss_curves
from tnt_jax.train.optimizer import is_local_memory_param, make_optimizer
from tnt_jax.train.preemption import install_sigterm_handler
from tnt_jax.train.step import ModelFunctions, make_eval_step, make_train_step

# Nominal dense bf16 peaks for the MFU estimate printed while training (the benchmark measures
# its own); unknown devices print no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
                   "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


def device_peak_flops() -> float | None:
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_BF16_FLOPS.items():
    if name in kind:
      return peak * jax.device_count()
  return None


def data_config(config) -> data.TextDataConfig:
  d = config.data
  task = {k: d[k] for k in data.TASK_FIELDS if k in d}   # synthetic tasks: configs/tasks_lm.py
  return data.TextDataConfig(source=d.source, path=d.path, seq_len=d.seq_len,
                             batch_size=d.batch_size, seed=config.seed,
                             validation_fraction=d.validation_fraction, max_bytes=d.max_bytes,
                             **task)


def lm_config(config, vocab_size: int) -> LMConfig:
  m = config.model
  options = {kind: dict(opts) for kind, opts in m.mixer_options.items()}
  ttt_e2e = m.get("ttt_e2e")       # configs/ttt_e2e.py; older checkpoints lack the key
  if ttt_e2e is not None:
    ttt_e2e = ttt_e2e.to_dict() if hasattr(ttt_e2e, "to_dict") else dict(ttt_e2e)
  return LMConfig(vocab_size=vocab_size, d_model=m.d_model, num_layers=m.num_layers,
                  num_heads=m.num_heads, head_dim=m.head_dim, mlp_hidden=m.mlp_hidden,
                  pattern=tuple(m.pattern.split(",")), mixer_options=options, window=m.window,
                  tie_embeddings=m.tie_embeddings, dtype=m.dtype, remat=m.remat,
                  # checkpoints written before scan_layers existed lack the key
                  scan_layers=m.get("scan_layers", True), ttt_e2e=ttt_e2e,
                  embedding_lookup=m.get("embedding_lookup", "auto"))


def _check_config(config) -> None:
  if config.steps < 1:
    raise ValueError(f"steps={config.steps} must be >= 1")
  for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    if getattr(config, name) < 1:
      raise ValueError(f"{name}={getattr(config, name)} must be >= 1")
  step_profile.check_window(config)
  determinism.check(config.get("deterministic", False))


def _check_stage_two_source(init_from: str, model_config: LMConfig) -> None:
  metadata = ckpt_lib.read_metadata(init_from)
  pattern = metadata.get("model_pattern")
  # a block kind names its memory after the colon in hybrids (mag:tnt) or is the kind itself
  if not pattern or not any((kind.partition(":")[2] or kind) == "tnt" for kind in pattern):
    raise ValueError(f"init_from={init_from!r} holds a checkpoint of a model with mixers "
                     f"{pattern}, not a TNT model; stage 2 adapts TNT's local memories")
  if not has_tnt_memory(model_config):
    raise ValueError(f"init_from is set (TNT stage 2) but this model's pattern "
                     f"{model_config.pattern} has no TNT memory")


def runs_kernels(model_config: LMConfig) -> bool:
  """Some memory mixer runs on the fused Pallas kernels (implementation="pallas")."""
  return any(getattr(part, "implementation", "xla") == "pallas"
             for layer in range(model_config.num_layers)
             for part in model_config.mixer_parts(layer))


def has_tnt_memory(model_config: LMConfig) -> bool:
  """Some block's mixer holds a TNT memory (a `tnt` block, or a hybrid such as mag:tnt)."""
  return any(isinstance(part, TNTLayerConfig) for layer in range(model_config.num_layers)
             for part in model_config.mixer_parts(layer))


def check_model_context_split(seq_len: int, context: int, model_config: LMConfig) -> None:
  """Before anything compiles: the sequence splits over the context axis into whole local
  shards of every TNT layer, every SWA halo fits in one device's slice, and no layer is a
  Titans MAC (which has no context-parallel form)."""
  if context == 1:
    return
  if model_config.ttt_e2e is not None:
    raise ValueError(f"TTT-E2E takes its inner steps mini-batch after mini-batch along the "
                     f"sequence, so it cannot split it over devices: mesh.context={context} "
                     "must be 1 (use data or fsdp parallelism)")
  if seq_len % context:
    raise ValueError(f"data.seq_len={seq_len} does not split over mesh.context={context} "
                     "devices (it must be a multiple)")
  for layer in range(model_config.num_layers):
    if isinstance(model_config.mixer_config(layer), MACConfig):
      raise ValueError(f"layer {layer}'s mixer {model_config.mixer_kind(layer)!r} (Titans MAC) "
                       "runs its segments one after another through the memory and has no "
                       f"context-parallel form: use mesh.context=1 (got {context})")
    for mixer in model_config.mixer_parts(layer):
      if isinstance(mixer, AttentionConfig):
        if mixer.window is not None and mixer.window - 1 > seq_len // context:
          raise ValueError(f"SWA window {mixer.window} needs {mixer.window - 1} tokens of the "
                           f"previous device, more than its slice of {seq_len // context} "
                           f"(seq_len={seq_len} over context={context})")
      else:
        check_context_split(seq_len, context, mixer.memory_config())


def _is_finite(metrics) -> bool:
  return all(math.isfinite(float(v)) for v in jax.device_get(metrics).values())


class _Log:
  """Console lines from process 0 only."""

  def __init__(self):
    self.enabled = jax.process_index() == 0

  def __call__(self, message: str):
    if self.enabled:
      print(message, flush=True)


def evaluate(eval_step, params, config, batch_sharding) -> dict[str, float]:
  """Mean next-token loss over the validation split (its first `eval_batches` batches)."""
  iterator = data.make_lm_iterator(data_config(config), "validation",
                                   shard_index=jax.process_index(),
                                   shard_count=jax.process_count(),
                                   max_batches=config.eval_batches)
  total, count, correct = 0.0, 0.0, 0.0
  for batch in iterator:
    batch = _device_batch(batch, batch_sharding)
    loss_sum, n, right = eval_step(params, batch)
    total, count, correct = total + float(loss_sum), count + float(n), correct + float(right)
  if count == 0:
    raise ValueError("the validation split produced no tokens; lower data.seq_len or raise "
                     "data.validation_fraction")
  loss = total / count
  return {"eval_loss": loss, "eval_bits_per_token": loss / math.log(2),
          "eval_accuracy": correct / count}


def _device_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  keys = ("inputs", "targets", "loss_mask")
  return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in keys}


def checked_setup(config, devices=None):
  """(data config, vocab, model config, mesh) of a run, checked before any compile: the batch
  over the mesh, the sequence over its context axis. devices: None for this process's."""
  data_cfg = data_config(config)
  vocab = data.vocab_info(data_cfg)
  model_config = lm_config(config, vocab.vocab_size)
  mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.get("context", 1),
                            devices=devices)
  mesh_lib.check_batch_divides(data_cfg.batch_size, mesh)
  check_model_context_split(data_cfg.seq_len, mesh.shape["context"], model_config)
  return data_cfg, vocab, model_config, mesh


class TrainParts(NamedTuple):
  abstract_model: LanguageModel
  model: ModelFunctions
  optimizer: optax.GradientTransformation
  init_state: Callable[[], dict]       # the fresh training state (jit it with state_shardings)
  state_shardings: Any
  abstract_state: Any                  # ShapeDtypeStructs carrying state_shardings
  train_step: Callable                 # jitted (state, batch) -> (state, metrics)


def train_parts(config, model_config: LMConfig, mesh: jax.sharding.Mesh, trainable=None
                ) -> TrainParts:
  """Everything the training step is compiled from, built abstractly (no array is allocated):
  the train loop materialises the state with its shardings; experiments/tpu_compile.py compiles
  the step for a TPU topology on any host."""
  abstract_model = nnx.eval_shape(lambda: LanguageModel(model_config,
                                                        rngs=nnx.Rngs(config.seed)))
  model = ModelFunctions(abstract_model)
  optimizer = make_optimizer(config.optim, config.steps, model.initial_params(), trainable)

  def init_state():
    params = nnx.to_pure_dict(nnx.state(LanguageModel(model_config, rngs=nnx.Rngs(config.seed)),
                                        nnx.Param))
    return {"params": params, "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32)}

  state_shapes = jax.eval_shape(init_state)
  state_shardings = jax.tree.map(
      lambda x: mesh_lib.param_sharding(x.shape, mesh) if x.ndim else NamedSharding(mesh, P()),
      state_shapes)
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state_shapes, state_shardings)
  train_step = jax.jit(make_train_step(model, optimizer, mesh), donate_argnums=0,
                       in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh)),
                       out_shardings=(state_shardings, NamedSharding(mesh, P())))
  return TrainParts(abstract_model, model, optimizer, init_state, state_shardings,
                    abstract_state, train_step)


def train_and_evaluate(config, workdir: str, *, preempt_at_step: int | None = None
                       ) -> dict[str, Any]:
  """Train per `config` (see configs/tnt_lm.py) in `workdir`; returns the final metrics.

  preempt_at_step: testing aid: send this process SIGTERM after that step (the real path).
  """
  log = _Log()
  _check_config(config)
  workdir = os.path.abspath(workdir)
  data_cfg, vocab, model_config, mesh = checked_setup(config)
  if ((mesh.shape["context"] > 1 or (mesh.size > 1 and runs_kernels(model_config)))
      and use_gspmd_on_gpu()):
    log("several GPUs with context parallelism or the fused kernels: using the GSPMD "
        "partitioner (XLA's Shardy path segfaults compiling these with jax 0.11; "
        "docs/context_parallel.md)")
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=config.keep_checkpoints,
                                       save_every=config.checkpoint_every)
  resume_step = checkpointer.latest_step()
  if config.stage == 2 and not config.init_from and resume_step is None:
    raise ValueError("stage 2 starts from a stage-1 checkpoint: set --config.init_from to the "
                     "stage-1 workdir's checkpoints/ directory (or one step in it)")
  if config.init_from and resume_step is None:
    _check_stage_two_source(config.init_from, model_config)
  trainable = None
  if config.train_only_local:
    if not has_tnt_memory(model_config):
      raise ValueError(f"train_only_local=True trains TNT local memories, but the model's "
                       f"pattern {model_config.pattern} has none")
    trainable = lambda path, leaf: is_local_memory_param(path)

  parts = train_parts(config, model_config, mesh, trainable)
  abstract_model, model = parts.abstract_model, parts.model
  init_state, state_shardings = parts.init_state, parts.state_shardings
  abstract_state, train_step = parts.abstract_state, parts.train_step

  train_iter = data.make_lm_iterator(data_cfg, "train", shard_index=jax.process_index(),
                                     shard_count=jax.process_count())
  log(f"model: {param_summary(abstract_model)}")
  log(f"data: {data_cfg.source}{' ' + data_cfg.path if data_cfg.path else ''} "
      f"({train_iter.num_tokens:,} train tokens, "
      f"vocab {vocab.vocab_size}); batch {data_cfg.batch_size} x {data_cfg.seq_len}; mesh "
      f"{dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].device_kind}")

  if resume_step is not None:
    state, data_state, _ = checkpointer.restore(resume_step, abstract_state)
    train_iter.set_state(data_state)
    log(f"resumed from {checkpointer.directory}/{resume_step}")
  else:
    state = jax.jit(init_state, out_shardings=state_shardings)()
    if config.init_from:
      params = ckpt_lib.restore_subtree(config.init_from, abstract_state["params"])
      state = dict(state, params=params)
      log(f"stage 2: parameters from {config.init_from}; training "
          f"{'local memories only' if trainable else 'everything'}")
  start = int(jax.device_get(state["step"]))

  batch_sharding = mesh_lib.batch_sharding(mesh)
  eval_step = jax.jit(make_eval_step(model, mesh))
  metadata = {"config": config.to_dict(), "model_pattern": list(model_config.pattern)}
  writer = MetricWriter(os.path.join(workdir, "logs"), enabled=jax.process_index() == 0)
  step_flops = lm_train_flops(model_config, data_cfg.batch_size, data_cfg.seq_len)
  peak = device_peak_flops()
  tokens_per_step = data_cfg.batch_size * data_cfg.seq_len
  unit = ("bits per answer token" if data_cfg.source in data.TASK_SOURCES else
          "bits per byte" if vocab.vocab_size == data.BYTE_VOCAB_SIZE else "bits per token")

  def save(step, metrics, force=False):
    if metrics is None:           # no step ran in this call (a finished run, rerun): saved already
      return
    if not force and step % config.checkpoint_every:
      return
    if not _is_finite(metrics):   # never save a state that a non-finite step produced
      return
    checkpointer.save(step, state, train_iter.get_state(), metadata, force=force)

  preempt = install_sigterm_handler()
  summary: dict[str, Any] = {"workdir": workdir, "start_step": start, "preempted": False}
  losses, interval_start, pending, metrics = [], time.perf_counter(), None, None
  profiler = step_profile.StepProfiler.from_config(config, workdir, start + 1, log)
  step = start
  if start >= config.steps:
    log(f"the run in {workdir} is complete (step {start} of {config.steps}); evaluating only")
  try:
    for step in range(start + 1, config.steps + 1):
      batch = _device_batch(next(train_iter), batch_sharding)
      if profiler:   # the throughput line leaves the profiler's own time out
        interval_start += profiler.before(step, state)
      state, metrics = train_step(state, batch)
      if profiler:
        interval_start += profiler.after(
            step, state, lambda: train_step.lower(state, batch).compile().as_text())
      if pending is not None:                  # read step t-1 while step t runs
        losses.append(_check_loss(*pending))
      pending = (step, metrics)
      if step % config.log_every == 0 or step == config.steps:
        losses.append(_check_loss(*pending))
        pending = None
        elapsed = time.perf_counter() - interval_start
        steps_done = len(losses)
        tokens_per_s = steps_done * tokens_per_step / elapsed
        mfu = steps_done * step_flops / elapsed / peak if peak else None
        loss = float(np.mean(losses))
        log(format_progress(step, config.steps, loss, tokens_per_s, mfu,
                            (config.steps - step) * elapsed / steps_done))
        writer.scalars(step, {"train_loss": loss, "tokens_per_s": tokens_per_s,
                              "grad_norm": float(metrics["grad_norm"])})
        losses, interval_start = [], time.perf_counter()
      if step % config.eval_every == 0 and step != config.steps:
        results = evaluate(eval_step, state["params"], config, batch_sharding)
        writer.scalars(step, results)
        log(f"eval at step {step}: loss {results['eval_loss']:.4f}, "
            f"{results['eval_bits_per_token']:.4f} {unit}, accuracy "
            f"{results['eval_accuracy']:.4f}")
        interval_start = time.perf_counter()
      save(step, metrics)
      if preempt_at_step == step:
        os.kill(os.getpid(), signal.SIGTERM)
      if preempt.should_stop(step):
        save(step, metrics, force=True)
        checkpointer.wait()
        log(f"preempted (SIGTERM): saved step {step} in {checkpointer.directory}; rerun the "
            "same command to resume")
        summary.update(preempted=True, step=step)
        return summary
    if pending is not None:
      _check_loss(*pending)
    save(step, metrics, force=True)
    results = evaluate(eval_step, state["params"], config, batch_sharding)
    writer.scalars(step, results)
  finally:
    checkpointer.close()
    preempt.close()
    writer.close()
  png = os.path.join(workdir, "loss.png")
  if jax.process_index() == 0:
    plot_loss_curves(writer.jsonl_path, png, title=f"{','.join(model_config.pattern)} LM")
  log(f"done: step {step}, eval loss {results['eval_loss']:.4f} = "
      f"{results['eval_bits_per_token']:.4f} {unit}, next-token accuracy "
      f"{results['eval_accuracy']:.4f}")
  log(f"checkpoints: {checkpointer.directory}\n"
      f"logs (TensorBoard): {os.path.dirname(writer.jsonl_path)}\nloss curve: {png}")
  summary.update(step=step, png=png, **results)
  return summary


def _check_loss(step: int, metrics) -> float:
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(
        f"non-finite training loss {loss} at step {step}; stopping (no checkpoint is written "
        "from this state). Lower optim.lr, raise optim.warmup_steps or check the data.")
  return loss
