"""One Mosaic GPU launch that runs several kernels' programs side by side.

A `KernelPart` is a kernel's body with its operands, results and shared-memory scratch; `launch`
runs one or more parts in one `plgpu.kernel`, part p on its own rows of the grid (its row index
counted from 0). Parts that run together never share an SM, so their scratch (everything but the
barriers, which each part initializes for itself) is one `plgpu.RefUnion`: the launch needs the
largest part's shared memory, not the sum. The fused backward uses this to re-run the forward for
the next checkpoint groups on the SMs that the reverse walk of a few rows leaves idle
(chunk_memory._rows_backward_pipelined).

Interpreted, the scratch is not a union (the interpreter has none and no shared-memory limit):
each part gets its own buffers, and the grid's programs run one after another.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from jax import lax
from jax.experimental import pallas as pl

from tnt_jax.kernels.chunk_start_mgpu import _interpret_params, _plgpu


@dataclasses.dataclass(frozen=True)
class KernelPart:
  """body(row, *refs) runs one program of `rows` rows x `cluster` programs (the refs: inputs,
  then outputs, then scratch, in the order given here); `cross_warp_reductions` says whether the
  body needs the compiler's cross-warp reduction scratch (2 KiB)."""
  body: Callable[..., None]
  inputs: Sequence[Any]
  out_types: Sequence[Any]
  scratch: Sequence[Any]
  rows: int
  cluster: int
  cross_warp_reductions: bool = True


def _is_barrier(scratch_type) -> bool:
  return isinstance(scratch_type, _plgpu().Barrier)


def launch(parts: Sequence[KernelPart], *, interpret) -> list[list]:
  """Runs the parts in one launch; returns each part's results (a list per part)."""
  plgpu = _plgpu()
  clusters = {part.cluster for part in parts}
  if len(clusters) != 1:
    raise ValueError(f"parts of one launch need one cluster size; got {sorted(clusters)}")
  cluster = clusters.pop()
  union = len(parts) > 1 and not interpret
  # Per part: its scratch's positions split into memory (in the union) and barriers.
  memory = [[t for t in part.scratch if not _is_barrier(t)] for part in parts]
  barriers = [[t for t in part.scratch if _is_barrier(t)] for part in parts]
  if union:
    scratch_types = [plgpu.RefUnion(*(tuple(m) for m in memory))]
  else:
    scratch_types = [t for m in memory for t in m]
  scratch_types += [t for b in barriers for t in b]
  n_in = [len(part.inputs) for part in parts]
  n_out = [len(part.out_types) for part in parts]

  def body(*refs):
    ins, refs = _split(refs[:sum(n_in)], n_in), refs[sum(n_in):]
    outs, refs = _split(refs[:sum(n_out)], n_out), refs[sum(n_out):]
    if union:                          # one tree (here a tuple) of refs per part
      mems, refs = [list(group) for group in refs[0]], refs[1:]
    else:
      mems = _split(refs[:sum(map(len, memory))], [len(m) for m in memory])
      refs = refs[sum(map(len, memory)):]
    bars = _split(refs, [len(b) for b in barriers])
    row = lax.axis_index("rows")
    start = 0
    for p, part in enumerate(parts):
      # The part's scratch refs back in its own order.
      mem_it, bar_it = iter(mems[p]), iter(bars[p])
      scratch = [next(bar_it) if _is_barrier(t) else next(mem_it) for t in part.scratch]
      run = lambda part=part, refs=(*ins[p], *outs[p], *scratch), start=start: part.body(
          row - start, *refs)
      if len(parts) == 1:
        run()
      else:
        pl.when((row >= start) & (row < start + part.rows))(run)
      start += part.rows

  grid = dict(grid=(sum(part.rows for part in parts),), grid_names=("rows",))
  if cluster > 1:
    grid.update(cluster=(cluster,), cluster_names=("slices",))
  params = dict(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
  if not any(part.cross_warp_reductions for part in parts):
    params["reduction_scratch_bytes"] = 0
  results = plgpu.kernel(
      body, out_type=[t for part in parts for t in part.out_types], scratch_types=scratch_types,
      **grid, interpret=_interpret_params(interpret),
      compiler_params=plgpu.CompilerParams(**params))(
          *[x for part in parts for x in part.inputs])
  return _split(list(results), n_out)


def _split(items, sizes) -> list[list]:
  out, start = [], 0
  for size in sizes:
    out.append(list(items[start:start + size]))
    start += size
  return out
