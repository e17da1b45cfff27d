"""Checkpoints of a run: train state, data-iterator state and run metadata (the only orbax import).

    ckpt = Checkpointer(workdir / "checkpoints", keep=3, save_every=1000)
    ckpt.save(step, state, data_iter.get_state(), {"config": config.to_dict()})
    state, data_state, metadata = ckpt.restore(ckpt.latest_step(), jax.eval_shape(init))
    params = restore_subtree(config.init_from, abstract_params)   # stage 2 from stage 1

On disk (orbax `CheckpointManager`, one directory per saved step):

    <directory>/<step>/
      state/                 PyTree of arrays (params, opt_state, step): OCDBT + _METADATA
      data_state/            JSON: the data iterator's get_state() (absent when None was saved)
      metadata/              JSON: config dict, model kind, ... ({} when None was saved)
      _CHECKPOINT_METADATA   orbax's step record (init and commit timestamps)
      commit_success.txt     written after every item is on disk
    <directory>/<step>.orbax-checkpoint-tmp-<n>/   a save in flight, or one killed mid-way

Atomicity: orbax writes each save into `<step>.orbax-checkpoint-tmp-<n>`, writes
`commit_success.txt` there once all items are durable, then renames the directory to `<step>`
(one atomic rename on a POSIX filesystem; on GCS, where rename is not atomic, orbax writes in
place and the commit file alone marks completion). Here a step is *complete* only if its name is
final AND it holds `commit_success.txt`, `state/` and `metadata/`. So a save killed at any point
is never picked up by `latest_step`/`restore`, and neither is a step directory that was copied
non-atomically (an rsync or `gsutil cp` cut short) or made by hand. Leftover tmp directories are
deleted when a `Checkpointer` opens the directory.

Shapes are checked against the saved metadata before any array is read; dtypes are not (orbax
casts to the abstract dtype, e.g. float32 weights into a bfloat16 model).
"""

from __future__ import annotations

import json
from typing import Any

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

PyTree = Any

STATE, DATA_STATE, METADATA = "state", "data_state", "metadata"
# orbax's completion marker (its atomicity_types.COMMIT_SUCCESS_FILE, written before the rename).
COMMIT_FILE = "commit_success.txt"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_REQUIRED_ITEMS = (STATE, METADATA)


def is_complete(step_dir: epath.PathLike) -> bool:
  """True if `step_dir` is a finished save: final name, commit marker, required items."""
  step_dir = epath.Path(step_dir)
  return (step_dir.name.isdigit() and step_dir.is_dir() and (step_dir / COMMIT_FILE).exists()
          and all((step_dir / item).is_dir() for item in _REQUIRED_ITEMS))


def complete_steps(directory: epath.PathLike) -> list[int]:
  """The complete steps in a directory of steps, ascending ([] if it does not exist)."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if is_complete(p))


def _manager(directory: epath.Path, *, keep: int | None = None,
             writer: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=writer,
      # A reader must not touch another run's directory; the writer clears its own leftovers.
      cleanup_tmp_directories=writer)
  handlers = {STATE: ocp.PyTreeCheckpointHandler(), DATA_STATE: ocp.JsonCheckpointHandler(),
              METADATA: ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _check_json(value, name: str):
  # Fail in the caller's frame, not later in orbax's background thread.
  try:
    json.dumps(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be JSON-serialisable (a dict of str/int/float/list): {e}") from e


class Checkpointer:
  """Saves every `save_every` steps (or when forced), keeps the newest `keep` complete steps."""

  def __init__(self, directory: epath.PathLike, *, keep: int, save_every: int):
    if keep < 1:
      raise ValueError(f"{keep=} must be >= 1")
    if save_every < 1:
      raise ValueError(f"{save_every=} must be >= 1")
    self.directory = epath.Path(directory)
    self._save_every = save_every
    self._manager = _manager(self.directory, keep=keep, writer=True)

  def save(self, step: int, state: PyTree, data_state: dict | None,
           metadata: dict | None = None, *, force: bool = False) -> bool:
    """Starts an async save of `step`; True if one was started.

    Skipped (False) when `step % save_every != 0` and not `force`, or when `step` is already
    saved (a preemption save landing on a periodic one). The arrays are copied to host before
    this returns, so the caller may donate `state` to the next step right away.
    """
    if step < 0:
      raise ValueError(f"{step=} must be >= 0")
    if not force and step % self._save_every:
      return False
    _check_json(data_state, "data_state")
    _check_json(metadata, "metadata")
    if step in self._manager.all_steps():
      self._manager.wait_until_finished()   # it may be a save of this step still in flight
      if is_complete(self.directory / str(step)):
        return False
      logging.warning("Replacing incomplete checkpoint directory %s", self.directory / str(step))
      self._manager.delete(step)
    items = {STATE: ocp.args.PyTreeSave(state), METADATA: ocp.args.JsonSave(metadata or {})}
    if data_state is not None:
      items[DATA_STATE] = ocp.args.JsonSave(data_state)
    # Our own save_every decided above; force skips orbax's second opinion.
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def all_steps(self) -> list[int]:
    """Complete steps on disk, ascending; a save still in flight is not among them."""
    return complete_steps(self.directory)

  def latest_step(self) -> int | None:
    """The newest complete step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore(self, step: int | None, abstract_state: PyTree) -> tuple[PyTree, dict | None, dict]:
    """(state, data_state, metadata) of `step` (None: the latest), state shaped like the abstract.

    `abstract_state` is typically `jax.eval_shape(init)`: leaves that carry a sharding are
    restored with it; leaves without one land on the first local device.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise ValueError(f"{self.directory} holds no complete checkpoint to restore")
    step_dir = self.directory / str(step)
    if not is_complete(step_dir):
      raise ValueError(f"step={step} is not a complete checkpoint in {self.directory} "
                       f"(complete steps: {self.all_steps()})")
    return _restore(self._manager, step, abstract_state, subtree=None)

  def wait(self):
    """Blocks until the last save is on disk (call before exiting)."""
    self._manager.wait_until_finished()

  def close(self):
    """Waits for the last save, then releases orbax's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _key_name(key) -> str:
  # One spelling for a path entry whether it comes from a live tree or from orbax's metadata
  # (which stores namedtuples as dicts of fields and int dict keys as strings).
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def check_matches(saved_tree: PyTree, abstract: PyTree, where: str):
  """Raises ValueError at the first key path where the two trees' leaves or shapes differ."""
  saved, wanted = _flat_shapes(saved_tree), _flat_shapes(abstract)
  for path, shape in wanted.items():
    if path not in saved:
      raise ValueError(f"{where} has no leaf at key path '{path}' (abstract shape {shape}); "
                       f"its leaves start with {list(saved)[:5]}")
    if saved[path] != shape:
      raise ValueError(f"{where} does not match the abstract tree at key path '{path}': "
                       f"checkpoint shape {saved[path]}, abstract shape {shape}")
  for path, shape in saved.items():
    if path not in wanted:
      raise ValueError(f"{where} has a leaf at key path '{path}' (shape {shape}) that the "
                       "abstract tree lacks")


def _with_sharding(abstract: PyTree) -> PyTree:
  # Orbax restores a ShapeDtypeStruct without sharding as numpy; give it a device instead.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, "sharding", None) or device),
      abstract)


def _restore(manager: ocp.CheckpointManager, step: int, abstract: PyTree, *,
             subtree: str | None):
  """Full restore (subtree None) -> (state, data_state, metadata); else state[subtree] alone."""
  step_dir = manager.directory / str(step)
  saved = manager.item_metadata(step)[STATE].tree
  where = f"checkpoint {step_dir / STATE}"
  if subtree is not None:
    if not isinstance(saved, dict) or subtree not in saved:
      keys = list(saved) if isinstance(saved, dict) else type(saved).__name__
      raise ValueError(f"{where} has no subtree {subtree!r} (top-level keys: {keys})")
    saved, abstract = {subtree: saved[subtree]}, {subtree: abstract}   # full key paths in errors
  check_matches(saved, abstract, where)
  item = _with_sharding(abstract)
  items = {STATE: ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=subtree is not None)}   # partial: the optimizer state is never read
  if subtree is None:
    items[METADATA] = ocp.args.JsonRestore()
    if (step_dir / DATA_STATE).is_dir():
      items[DATA_STATE] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  if subtree is not None:
    return restored[STATE][subtree]
  data_state = restored[DATA_STATE] if DATA_STATE in items else None
  return restored[STATE], data_state, restored[METADATA]


def resolve(path: epath.PathLike) -> tuple[epath.Path, int]:
  """(directory of steps, step) for a step directory, or the latest complete step of a directory."""
  path = epath.Path(path)
  if not path.exists():
    raise ValueError(f"checkpoint path {path} does not exist")
  if _TMP_SUFFIX in path.name:
    raise ValueError(f"checkpoint path {path} is an unfinished save (orbax tmp directory)")
  if path.name.isdigit():
    if not is_complete(path):
      raise ValueError(f"checkpoint path {path} is not a complete checkpoint: it needs "
                       f"{COMMIT_FILE}, {STATE}/ and {METADATA}/ (a save cut short?)")
    return path.parent, int(path.name)
  steps = complete_steps(path)
  if not steps:
    raise ValueError(f"checkpoint path {path} holds no complete checkpoint (expected step "
                     f"directories such as {path / '1000'} containing {COMMIT_FILE})")
  return path, steps[-1]


def read_metadata(path: epath.PathLike) -> dict:
  """The metadata dict of a step directory, or of the latest complete step of a directory."""
  directory, step = resolve(path)
  manager = _manager(directory)
  try:
    return manager.restore(step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))[
        METADATA]
  finally:
    manager.close()


def restore_subtree(path: epath.PathLike, abstract_subtree: PyTree, *,
                    subtree: str = "params") -> PyTree:
  """`state[subtree]` of another run's checkpoint (a step dir, or a directory's latest step).

  For `--config.init_from`: stage 2 starts from stage 1's params, reading nothing else.
  """
  directory, step = resolve(path)
  manager = _manager(directory)
  try:
    return _restore(manager, step, abstract_subtree, subtree=subtree)
  finally:
    manager.close()


def read_params_tree(path: epath.PathLike, *, subtree: str = "params") -> PyTree:
  """`state[subtree]` of a checkpoint as host numpy arrays, no abstract tree needed (for
  inspection and tests: e.g. comparing two runs' parameters)."""
  directory, step = resolve(path)
  with ocp.PyTreeCheckpointer() as reader:
    state = reader.restore(directory / str(step) / STATE)
  if subtree not in state:
    raise ValueError(f"checkpoint {directory / str(step)} has no {subtree!r} in its state "
                     f"(has {sorted(state)})")
  return jax.device_get(state[subtree])
