"""Metrics: event files round-trip bit-exactly, CRCs catch corruption, history keeps the last step."""

import glob
import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from tnt_jax.train import metrics


def _write_run(logdir):
  logged = {
      0: {"train_loss": 5.5, "lr": 0.0},
      10: {"train_loss": 3.25, "lr": 1e-4, "grad_norm": np.float32(0.1)},
      20: {"train_loss": 2.1, "eval_loss": 2.3},
  }
  with metrics.MetricWriter(logdir) as writer:
    for step, values in logged.items():
      writer.scalars(step, values)
  return writer.event_path, logged


def _expected(logged):
  # The event file stores float32: compare against the float32 rounding, exactly.
  return [(step, tag, float(np.float32(value)))
          for step, values in logged.items() for tag, value in values.items()]


class Crc32cTest(parameterized.TestCase):

  @parameterized.parameters(
      (b"", 0x00000000),
      (b"123456789", 0xE3069283),
      (bytes(32), 0x8A9136AA),  # RFC 3720 B.4: 32 bytes of zeros.
      (b"\xff" * 32, 0x62A8AB43),  # RFC 3720 B.4: 32 bytes of ones.
  )
  def test_known_vectors(self, data, expected):
    self.assertEqual(metrics.crc32c(data), expected)


class EventFileTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.logdir = tempfile.mkdtemp()

  def test_round_trip_exact(self):
    path, logged = _write_run(self.logdir)
    self.assertRegex(os.path.basename(path), r"^events\.out\.tfevents\.\d+\..+$")
    self.assertEqual(metrics.read_scalars(path), _expected(logged))

  def test_first_record_is_file_version(self):
    path, _ = _write_run(self.logdir)
    first = next(metrics.read_records(path))
    self.assertIn(metrics.FILE_VERSION.encode(), first)

  def test_negative_and_large_steps(self):
    with metrics.MetricWriter(self.logdir) as writer:
      for step in (-1, 2**40, 2**63 - 1):
        writer.scalars(step, {"x": 1.0})
    self.assertEqual([s for s, _, _ in metrics.read_scalars(writer.event_path)],
                     [-1, 2**40, 2**63 - 1])

  @parameterized.named_parameters(
      ("length", 2, "length CRC"),  # a byte of the second record's length
      ("payload", -6, "payload CRC"),  # a byte of the last record's payload
  )
  def test_corrupt_byte_raises(self, offset, message):
    path, _ = _write_run(self.logdir)
    data = bytearray(open(path, "rb").read())
    if offset >= 0:  # skip the file-version record: 12 header bytes, payload, 4 CRC bytes.
      first_len = int.from_bytes(data[:8], "little")
      offset += 12 + first_len + 4
    data[offset] ^= 0x01
    with open(path, "wb") as f:
      f.write(data)
    with self.assertRaisesRegex(ValueError, message):
      metrics.read_scalars(path)

  def test_truncated_file_raises(self):
    path, _ = _write_run(self.logdir)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
      f.write(data[:-3])
    with self.assertRaisesRegex(ValueError, "truncated"):
      metrics.read_scalars(path)

  def test_disabled_writes_nothing(self):
    logdir = os.path.join(self.logdir, "not_process_0")
    writer = metrics.MetricWriter(logdir, enabled=False)
    writer.scalars(1, {"train_loss": 1.0})
    writer.flush()
    writer.close()
    self.assertFalse(os.path.exists(logdir))

  def test_tensorboard_reads_it(self):
    try:
      from tensorboard.backend.event_processing import event_accumulator
    except ImportError:
      self.skipTest("tensorboard is not installed (it is not a dependency)")
    path, logged = _write_run(self.logdir)
    acc = event_accumulator.EventAccumulator(path)
    acc.Reload()
    got = sorted((e.step, tag, e.value) for tag in acc.Tags()["scalars"]
                 for e in acc.Scalars(tag))
    self.assertEqual(got, sorted(_expected(logged)))


class HistoryTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.logdir = tempfile.mkdtemp()
    self.jsonl = os.path.join(self.logdir, metrics.JSONL_NAME)

  def test_jsonl_appended_across_writers(self):
    with metrics.MetricWriter(self.logdir) as writer:
      writer.scalars(1, {"train_loss": 3.0})
    with metrics.MetricWriter(self.logdir) as writer:  # a resumed run
      writer.scalars(2, {"train_loss": 2.0})
    lines = [json.loads(line) for line in open(self.jsonl)]
    self.assertEqual(lines, [{"step": 1, "train_loss": 3.0}, {"step": 2, "train_loss": 2.0}])

  def test_duplicate_steps_keep_last(self):
    with metrics.MetricWriter(self.logdir) as writer:
      for step in (0, 10, 20, 30):
        writer.scalars(step, {"train_loss": 10.0 - step / 10})
      writer.scalars(20, {"eval_loss": 9.0})
    # Resumed from the step-10 checkpoint: steps 20 and 30 are logged again.
    with metrics.MetricWriter(self.logdir) as writer:
      writer.scalars(20, {"train_loss": 1.5, "eval_loss": 1.75})
      writer.scalars(30, {"train_loss": 1.25})
    with open(self.jsonl, "a") as f:
      f.write('{"step": 40, "train_lo')  # killed mid-write
    history = metrics.load_history(self.jsonl)
    self.assertEqual(history["train_loss"], [(0, 10.0), (10, 9.0), (20, 1.5), (30, 1.25)])
    self.assertEqual(history["eval_loss"], [(20, 1.75)])

  def test_plot_writes_png(self):
    with metrics.MetricWriter(self.logdir) as writer:
      for step in range(0, 100, 10):
        writer.scalars(step, {"train_loss": 5.0 / (1 + step)})
      writer.scalars(50, {"eval_loss": 0.2})
    png = os.path.join(self.logdir, "plots", "loss.png")
    self.assertEqual(metrics.plot_loss_curves(self.jsonl, png, title="tiny", log_y=True), png)
    with open(png, "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    self.assertGreater(os.path.getsize(png), 1000)
    self.assertLen(glob.glob(os.path.join(self.logdir, "events.out.tfevents.*")), 1)


class FormatProgressTest(parameterized.TestCase):

  @parameterized.parameters(
      ((120, 2000, 2.34564, 12_345.0, 0.012, 192),
       "step  120/2000 | loss 2.3456 | 12.3K tok/s | MFU 1.2% | ETA 3m12s"),
      ((5, 10, 7.0, 850.0, None, 42.4),
       "step  5/10 | loss 7.0000 | 850 tok/s | ETA 42s"),
      ((99_000, 100_000, 1.0, 2.5e6, 0.456, 3600 + 5 * 60 + 7),
       "step  99000/100000 | loss 1.0000 | 2.5M tok/s | MFU 45.6% | ETA 1h05m07s"),
      ((1, 3, float("nan"), 0.0, None, float("inf")),
       "step 1/3 | loss nan | 0 tok/s | ETA ?"),
  )
  def test_examples(self, args, expected):
    self.assertEqual(metrics.format_progress(*args), expected)


if __name__ == "__main__":
  absltest.main()
