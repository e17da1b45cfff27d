"""Cut a token stream into LM rows: row r holds stream[r*T : r*T + T + 1].

Rows overlap by one token, so every token but the first is a target exactly once and documents
stay whole and in order across rows (a long document simply continues in the next row). Each
batch is

    inputs_BxT      int32    row[:, :-1]
    targets_BxT     int32    row[:, 1:]   (inputs shifted by one within the stream)
    loss_mask_BxT   float32  1 for real targets, 0 for padding (only past the stream's end)
    segment_ids_BxT int32    1, 2, ... per document within the row (a document's EOS belongs to
                             it; the token after an EOS starts the next); 0 on padding
    positions_BxT   int32    position within the document, restarting at each row start too
"""

from __future__ import annotations

import numpy as np

from tnt_jax.data.stream import TokenStream


def full_rows(stream_len: int, seq_len: int) -> int:
  """Rows with all seq_len targets real (training drops the short remainder)."""
  return max(stream_len - 1, 0) // seq_len


def covering_rows(stream_len: int, seq_len: int) -> int:
  """Rows that make every token a target once, the last one padded (evaluation)."""
  return -(-max(stream_len - 1, 0) // seq_len)


def read_rows(stream: TokenStream, row_ids, seq_len: int, eos_id: int) -> dict[str, np.ndarray]:
  """The batch dict for rows `row_ids`; a row past the stream's end is all padding (mask 0)."""
  batch = len(row_ids)
  rows_Bx1T = np.full((batch, seq_len + 1), eos_id, np.int32)
  lengths_B = np.zeros((batch,), np.int32)
  for i, row in enumerate(np.asarray(row_ids, np.int64)):
    tokens = stream.read(int(row) * seq_len, int(row) * seq_len + seq_len + 1)
    rows_Bx1T[i, :len(tokens)] = tokens
    lengths_B[i] = len(tokens)
  inputs_BxT, targets_BxT = rows_Bx1T[:, :-1], rows_Bx1T[:, 1:]
  t_T = np.arange(seq_len, dtype=np.int32)
  real_input_BxT = t_T < lengths_B[:, None]
  starts_BxT = np.ones((batch, seq_len), bool)
  starts_BxT[:, 1:] = inputs_BxT[:, :-1] == eos_id
  segment_ids_BxT = np.cumsum(starts_BxT, axis=1, dtype=np.int32) * real_input_BxT
  last_start_BxT = np.maximum.accumulate(np.where(starts_BxT, t_T, 0), axis=1)
  positions_BxT = (t_T - last_start_BxT) * real_input_BxT
  return {
      "inputs": np.ascontiguousarray(inputs_BxT),
      "targets": np.ascontiguousarray(targets_BxT),
      "loss_mask": (t_T < lengths_B[:, None] - 1).astype(np.float32),
      "segment_ids": segment_ids_BxT.astype(np.int32),
      "positions": positions_BxT.astype(np.int32),
  }
