"""Scalar metrics of a run: TensorBoard event files, a JSON-lines history, a loss plot, a console line.

    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    writer.scalars(step, {"train_loss": loss, "lr": lr})
    print(format_progress(step, num_steps, loss, tokens_per_s, mfu, eta_seconds))
    writer.close()
    plot_loss_curves(workdir / "metrics.jsonl", workdir / "loss.png")

On disk, in `logdir`:

    events.out.tfevents.<unix time>.<hostname>   one per writer: TFRecord framing of `Event` protos
    metrics.jsonl                                {"step": 100, "train_loss": 2.31, ...} per call

The event file is written by hand (TFRecord framing, CRC32C, a few protobuf fields) so that
TensorBoard can read a run without tensorflow, tensorboard or protobuf being dependencies:

    record  = uint64le(len) | masked_crc32c(len bytes) | payload | masked_crc32c(payload)
    Event   = {1: wall_time double, 2: step int64, 3: file_version string, 5: summary Summary}
    Summary = {1: repeated Value};  Value = {1: tag string, 2: simple_value float}

Both files are opened in append mode: a run resumed from a checkpoint keeps its history, and
`load_history` keeps the last record of a step that the resumed run logged again.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import math
import os
import socket
import struct
import time

FILE_VERSION = "brain.Event:2"
JSONL_NAME = "metrics.jsonl"

# --- CRC32C (Castagnoli), table-driven --------------------------------------------------------

_CRC32C_POLY = 0x82F63B78  # 0x1EDC6F41 bit-reversed: the table below processes LSB first.


def _make_crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC32C of `data` (crc32c(b"123456789") == 0xE3069283)."""
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord mask: a CRC of data that itself holds CRCs is otherwise weak."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _frame_record(payload: bytes) -> bytes:
  header = struct.pack("<Q", len(payload))
  return (header + struct.pack("<I", masked_crc32c(header)) + payload
          + struct.pack("<I", masked_crc32c(payload)))


# --- protobuf encoding (only the wire types Event needs) -------------------------------------

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # negative int64 is ten bytes of two's complement, as protobuf does.
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _len_field(field: int, data: bytes) -> bytes:
  return _key(field, _LEN) + _varint(len(data)) + data


def _float32_bytes(value: float) -> bytes:
  try:
    return struct.pack("<f", value)
  except OverflowError:  # finite but beyond float32: round to inf as a float32 cast would.
    return struct.pack("<f", math.copysign(math.inf, value))


def _event(wall_time: float, step: int | None = None, file_version: str | None = None,
           summary: bytes | None = None) -> bytes:
  out = _key(1, _FIXED64) + struct.pack("<d", wall_time)
  if step is not None:
    out += _key(2, _VARINT) + _varint(step)
  if file_version is not None:
    out += _len_field(3, file_version.encode())
  if summary is not None:
    out += _len_field(5, summary)
  return out


def _scalar_summary(values: Mapping[str, float]) -> bytes:
  out = b""
  for tag, value in values.items():
    value_msg = _len_field(1, tag.encode()) + _key(2, _FIXED32) + _float32_bytes(float(value))
    out += _len_field(1, value_msg)
  return out


# --- writer ----------------------------------------------------------------------------------


class MetricWriter:
  """Appends scalars to a TensorBoard event file and to `<logdir>/metrics.jsonl`.

  `enabled=False` (every process but 0 in a multi-host run) makes every method a no-op and
  creates no file, so the caller need not branch on the process index at each call.
  """

  def __init__(self, logdir: str | os.PathLike, enabled: bool = True):
    self.logdir = os.fspath(logdir)
    self.enabled = enabled
    self.event_path = None
    self.jsonl_path = os.path.join(self.logdir, JSONL_NAME)
    self._events = self._jsonl = None
    if not enabled:
      return
    os.makedirs(self.logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self.event_path = os.path.join(self.logdir, name)
    self._events = open(self.event_path, "ab")
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
    self._events.write(_frame_record(_event(time.time(), file_version=FILE_VERSION)))

  def scalars(self, step: int, values: Mapping[str, float]):
    """Logs `values` at `step`; values may be Python, NumPy or 0-d JAX scalars."""
    if not self.enabled:
      return
    values = {tag: float(value) for tag, value in values.items()}
    summary = _scalar_summary(values)
    self._events.write(_frame_record(_event(time.time(), step=int(step), summary=summary)))
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    # Calls come every few hundred steps, so flushing costs nothing and a killed run loses
    # no logged step.
    self.flush()

  def flush(self):
    if self.enabled:
      self._events.flush()
      self._jsonl.flush()

  def close(self):
    """Flushes and closes both files; idempotent."""
    if self._events is not None:
      self.flush()
      self._events.close()
      self._jsonl.close()
      self._events = self._jsonl = None
      self.enabled = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# --- reader ----------------------------------------------------------------------------------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise ValueError("truncated varint")
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return result, pos
    shift += 7


def _fields(buf: bytes):
  """Yields (field, wire_type, value) of a protobuf message; value is int or bytes."""
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    field, wire_type = key >> 3, key & 7
    if wire_type == _VARINT:
      value, pos = _read_varint(buf, pos)
    elif wire_type == _FIXED64:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire_type == _LEN:
      size, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + size], pos + size
    elif wire_type == _FIXED32:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      raise ValueError(f"unsupported protobuf {wire_type=} in {field=}")
    if pos > len(buf):
      raise ValueError(f"truncated protobuf {field=}")
    yield field, wire_type, value


def read_records(path: str | os.PathLike):
  """Yields the payloads of a TFRecord file; raises ValueError on a CRC mismatch or truncation."""
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    if pos + 12 > len(data):
      raise ValueError(f"truncated record header at byte {pos} of {path}")
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    if masked_crc32c(header) != length_crc:
      raise ValueError(f"length CRC mismatch at byte {pos} of {path}")
    end = pos + 12 + length + 4
    if end > len(data):
      raise ValueError(f"truncated record at byte {pos} of {path}")
    payload = data[pos + 12:end - 4]
    (payload_crc,) = struct.unpack("<I", data[end - 4:end])
    if masked_crc32c(payload) != payload_crc:
      raise ValueError(f"payload CRC mismatch at byte {pos} of {path}")
    yield payload
    pos = end


def read_scalars(event_file_path: str | os.PathLike) -> list[tuple[int, str, float]]:
  """(step, tag, simple_value) of every scalar in an event file, in file order."""
  scalars = []
  for payload in read_records(event_file_path):
    step, summary = 0, None
    for field, _, value in _fields(payload):
      if field == 2:
        step = value - (1 << 64) if value >= 1 << 63 else value  # int64 two's complement
      elif field == 5:
        summary = value
    if summary is None:
      continue
    for field, _, value_msg in _fields(summary):
      if field != 1:
        continue
      tag, simple_value = None, None
      for vfield, wire_type, value in _fields(value_msg):
        if vfield == 1:
          tag = value.decode()
        elif vfield == 2 and wire_type == _FIXED32:
          (simple_value,) = struct.unpack("<f", value)
      if tag is not None and simple_value is not None:
        scalars.append((step, tag, simple_value))
  return scalars


# --- history and plot ------------------------------------------------------------------------


def load_history(metrics_jsonl_path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} sorted by step; of a step logged twice, the last record wins."""
  by_tag: dict[str, dict[int, float]] = {}
  with open(metrics_jsonl_path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a run killed mid-write leaves a partial last line; the rest is good.
      step = record.pop("step")
      for tag, value in record.items():
        by_tag.setdefault(tag, {})[step] = value  # later lines overwrite: a resumed run wins.
  return {tag: sorted(series.items()) for tag, series in by_tag.items()}


def plot_loss_curves(metrics_jsonl_path: str | os.PathLike, png_path: str | os.PathLike,
                     title: str = "", log_y: bool = False) -> str:
  """Plots train_loss (line) and eval_loss (markers) against step into a PNG; returns its path."""
  # Imported here: training never pays matplotlib's import, and the Agg canvas needs no display
  # and leaves pyplot's global backend alone.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  history = load_history(metrics_jsonl_path)
  fig = Figure(figsize=(7, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for tag, style in (("train_loss", dict(lw=1.2)), ("eval_loss", dict(marker="o", ls="--"))):
    if history.get(tag):
      steps, values = zip(*history[tag])
      ax.plot(steps, values, label=tag, **style)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  if log_y:
    ax.set_yscale("log")
  if title:
    ax.set_title(title)
  if ax.get_legend_handles_labels()[0]:
    ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  png_path = os.fspath(png_path)
  os.makedirs(os.path.dirname(png_path) or ".", exist_ok=True)
  fig.savefig(png_path, dpi=120)
  return png_path


# --- console ---------------------------------------------------------------------------------


def _si(value: float) -> str:
  for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
    if abs(value) >= scale:
      return f"{value / scale:.1f}{suffix}"
  return f"{value:.0f}"


def format_duration(seconds: float) -> str:
  """3m12s, 1h05m00s, 42s."""
  if not math.isfinite(seconds):
    return "?"
  seconds = max(0, round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def format_progress(step: int, total_steps: int, loss: float, tokens_per_s: float,
                    mfu: float | None, eta_seconds: float) -> str:
  """`step   120/2000 | loss 2.3456 | 12.3K tok/s | MFU 1.2% | ETA 3m12s`.

  `mfu` is a fraction (0.012 prints as 1.2%); None omits it, e.g. where peak FLOPs are unknown.
  """
  width = len(str(total_steps))
  parts = [f"step {step:>{width}}/{total_steps}", f"loss {float(loss):.4f}",
           f"{_si(float(tokens_per_s))} tok/s"]
  if mfu is not None:
    parts.append(f"MFU {100 * float(mfu):.1f}%")
  parts.append(f"ETA {format_duration(eta_seconds)}")
  return " | ".join(parts)
