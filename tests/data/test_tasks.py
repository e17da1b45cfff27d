"""Synthetic memory tasks: answers right by construction (re-derived here from the tokens alone,
never from the generator's bookkeeping), the power law of MQAR's query gaps, the batch contract,
determinism, the training pipeline's resume and host sharding, scoring, the heatmap, the config,
and errors that name the bad value. Small lengths except the shape sweep; runs in seconds."""

import json
import os
import tempfile

from absl.testing import absltest, parameterized
import numpy as np

from tests.helpers import assert_batches_equal, take

from tnt_jax import data
from tnt_jax.data import tasks
from tnt_jax.data.tasks import needle as needle_lib

KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
DTYPES = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32,
          "segment_ids": np.int32, "positions": np.int32}




def _full_row(batch, i):
  """The row's length + 1 tokens: inputs then the last target."""
  return np.concatenate([batch["inputs"][i], batch["targets"][i, -1:]])


def mqar_violations(batch, num_pairs):
  """Everything wrong with an MQAR batch, judged from its tokens alone: each scored position
  must hold a key whose first occurrence in the row is in the pair block, followed there by the
  value that is the scored target; every pair is asked exactly once, after the pair block."""
  problems = []
  n = num_pairs
  for i in range(batch["inputs"].shape[0]):
    row = _full_row(batch, i)
    scored = np.flatnonzero(batch["loss_mask"][i])
    if len(scored) != n:
      problems.append(f"row {i}: {len(scored)} scored positions, want {n}")
    asked = []
    for t in scored:
      key = row[t]
      first = int(np.flatnonzero(row == key)[0])
      if first >= 2 * n or first % 2:
        problems.append(f"row {i}: key {key} at {t} first appears at {first}, not a pair slot")
      elif t < 2 * n:
        problems.append(f"row {i}: scored position {t} is inside the pair block")
      elif batch["targets"][i, t] != row[first + 1]:
        problems.append(f"row {i}: target {batch['targets'][i, t]} at {t}, but key {key} is "
                        f"bound to {row[first + 1]}")
      asked.append(int(key))
    if sorted(asked) != sorted(row[0:2 * n:2].tolist()):
      problems.append(f"row {i}: asked keys {sorted(asked)} != pair keys")
  return problems


def needle_violations(batch, key_digits, value_digits, depth=None):
  """Find the needle in each row's inputs; the scored targets must be exactly its value bytes,
  after the key is asked again at the end."""
  problems = []
  n = key_digits + value_digits + 2
  for i in range(batch["inputs"].shape[0]):
    row = _full_row(batch, i)
    marks = np.flatnonzero(row == needle_lib.MARK)
    if len(marks) != 2 or np.sum(row == needle_lib.SEP) != 2:
      problems.append(f"row {i}: MARK at {marks.tolist()}, want exactly the needle and query")
      continue
    start, query = marks
    needle = row[start:start + n]
    key, value = needle[1:1 + key_digits], needle[2 + key_digits:]
    if needle[1 + key_digits] != needle_lib.SEP or not all(48 <= b < 58 for b in key):
      problems.append(f"row {i}: malformed needle {needle.tolist()}")
    if query != len(row) - n or not np.array_equal(row[query:query + 2 + key_digits],
                                                   needle[:2 + key_digits]):
      problems.append(f"row {i}: the row does not end by asking the needle's key")
    scored = np.flatnonzero(batch["loss_mask"][i])
    if not np.array_equal(batch["targets"][i, scored], value) or len(scored) != value_digits:
      problems.append(f"row {i}: scored targets {batch['targets'][i, scored].tolist()} are not "
                      f"the needle's value {value.tolist()}")
    if depth is not None and start != round(depth * (len(row) - 2 * n)):
      problems.append(f"row {i}: needle at {start}, not at depth {depth}")
  return problems


def _oracle_logits(inputs_BxT, vocab=256, max_position=None):
  """'Reads' the needle: one-hot logits of the value's next byte at the query's value bytes; a
  model that only sees positions < max_position returns zeros (argmax 0, wrong)."""
  batch, length = inputs_BxT.shape
  logits = np.zeros((batch, length, vocab), np.float32)
  for i in range(batch):
    start, query = np.flatnonzero(inputs_BxT[i] == needle_lib.MARK)[:2]
    if max_position is not None and start >= max_position:
      continue
    value_start = start + np.flatnonzero(inputs_BxT[i, start:] == needle_lib.SEP)[0] + 1
    q_sep = query + (value_start - 1 - start)
    for j, t in enumerate(range(q_sep, length)):
      logits[i, t, inputs_BxT[i, value_start + j]] = 1.0
  return logits


class _TempDirCase(parameterized.TestCase):

  def tempdir(self) -> str:
    # absltest's create_tempdir needs parsed absl flags, which pytest does not parse.
    return self.enterContext(tempfile.TemporaryDirectory())

  def text_file(self, n_bytes=20_000) -> str:
    rng = np.random.default_rng(7)
    words = [b"memory ", b"needle ", b"hay ", b"Pierre ", b"1812 ", b"\n", b"\x00", b"\x01",
             b"\x02"]
    text = b"".join(words[i] for i in rng.integers(0, len(words), n_bytes))[:n_bytes]
    path = os.path.join(self.tempdir(), "book.txt")
    with open(path, "wb") as f:
      f.write(text)
    return path


class MQARTest(_TempDirCase):

  @parameterized.product(filler=("noise", "pad"), num_pairs=(1, 8, 16))
  def test_answers_right_by_construction(self, filler, num_pairs):
    batch, truth = tasks.mqar_batch(3, 256, 8, num_pairs=num_pairs, vocab_size=64,
                                    filler=filler, with_truth=True)
    self.assertEqual(mqar_violations(batch, num_pairs), [])
    task = tasks.MQAR(vocab_size=64, num_pairs=num_pairs)
    self.assertTrue(np.all((truth["keys"] >= 1) & (truth["keys"] < task.first_value)))
    self.assertTrue(np.all(truth["values"] >= task.first_value))
    rows = np.arange(8)[:, None]
    np.testing.assert_array_equal(batch["targets"][rows, truth["query_positions"]],
                                  truth["values"])
    if filler == "pad":
      for i in range(8):
        self.assertEqual(np.count_nonzero(_full_row(batch, i)), 4 * num_pairs)

  def test_checker_catches_a_wrong_answer(self):
    batch = tasks.mqar_batch(0, 128, 2, num_pairs=4)
    t = np.flatnonzero(batch["loss_mask"][1])[2]
    wrong = {k: v.copy() for k, v in batch.items()}
    wrong["targets"][1, t] = batch["targets"][1, t] % 63 + 1
    self.assertNotEqual(mqar_violations(wrong, 4), [])
    moved = {k: v.copy() for k, v in batch.items()}
    moved["loss_mask"][0, t], moved["loss_mask"][0, t + 1] = 0, 1
    self.assertNotEqual(mqar_violations(moved, 4), [])

  def test_query_gaps_follow_the_power_law(self):
    # The first key's slot is the first Gumbel-top-k draw: exactly P(g) ∝ (g+1)^(alpha-1).
    # Re-derived from the tokens (where is inputs[0] asked?), compared by Kolmogorov-Smirnov.
    length, n, rows = 1023, 4, 2000

    def first_slots(alpha):
      batch = tasks.mqar_batch(11, length, rows, num_pairs=n, alpha=alpha, filler="pad")
      scored = (batch["inputs"] == batch["inputs"][:, :1]) & (batch["loss_mask"] > 0)
      return (scored.argmax(1) - 2 * n) // 2

    def ks(slots, alpha):
      p = tasks.MQAR(num_pairs=n, alpha=alpha).slot_probabilities(length)
      empirical = np.bincount(slots, minlength=len(p)).cumsum() / len(slots)
      return np.abs(empirical - p.cumsum()).max()

    bound = 1.63 / np.sqrt(rows)                          # KS at the 1% level
    power, uniform = first_slots(0.01), first_slots(1.0)
    self.assertLess(ks(power, 0.01), bound)
    self.assertLess(ks(uniform, 1.0), bound)
    self.assertGreater(ks(uniform, 0.01), 5 * bound)      # the test tells the laws apart
    self.assertGreater(np.mean(power < 8), 0.3)           # most queries close to the pairs...
    self.assertGreater(power.max(), 400)                  # ...with a tail to the row's end

  def test_errors_name_the_value(self):
    with self.assertRaisesRegex(ValueError, r"length=30 is too short.*num_pairs=8.*>= 31"):
      tasks.mqar_batch(0, 30, num_pairs=8)
    with self.assertRaisesRegex(ValueError, r"vocab_size=16 .*num_pairs=8.*= 17"):
      tasks.MQAR(vocab_size=16, num_pairs=8)
    with self.assertRaisesRegex(ValueError, r"alpha=0.0 must be > 0"):
      tasks.MQAR(alpha=0.0)
    with self.assertRaisesRegex(ValueError, r"filler='zeros'"):
      tasks.MQAR(filler="zeros")
    with self.assertRaisesRegex(ValueError, r"num_pairs=0"):
      tasks.MQAR(num_pairs=0)
    with self.assertRaisesRegex(ValueError, r"seed=-1"):
      tasks.mqar_batch(-1, 64)


class NeedleTest(_TempDirCase):

  @parameterized.parameters(0.0, 0.3, 0.5, 1.0)
  def test_noise_needle_right_by_construction(self, depth):
    batch, truth = tasks.needle_batch(5, 300, 4, depth=depth, key_digits=3, value_digits=6,
                                      with_truth=True)
    self.assertEqual(needle_violations(batch, 3, 6, depth), [])
    scored = batch["targets"][batch["loss_mask"] > 0].reshape(4, 6)
    np.testing.assert_array_equal(scored, truth["value"])
    hay = batch["inputs"][:, :301 - 11]               # haystack and needle, before the query
    outside = np.ones(hay.shape, bool)
    for i, s in enumerate(truth["needle_start"]):
      outside[i, s:s + 11] = False
    self.assertTrue(np.all((hay[outside] >= 32) & (hay[outside] < 127)))

  def test_text_haystack_is_a_window_of_the_file(self):
    path = self.text_file()
    text = needle_lib.haystack_bytes(path)
    self.assertFalse(np.isin(text, (0, 1, 2)).any())          # control bytes cleaned away
    batch, truth = tasks.needle_batch(9, 1024, 3, haystack=path, with_truth=True)
    self.assertEqual(needle_violations(batch, 4, 4), [])
    self.assertLen(set(truth["depth"].tolist()), 3)            # depth None: drawn per row
    for i, start in enumerate(truth["needle_start"]):
      row = _full_row(batch, i)
      hay = np.concatenate([row[:start], row[start + 10:len(row) - 10]])
      self.assertTrue(hay.astype(np.uint8).tobytes() in text.tobytes(), f"row {i}")

  def test_checker_catches_a_wrong_answer(self):
    batch = tasks.needle_batch(0, 128, 2, depth=0.5)
    wrong = {k: v.copy() for k, v in batch.items()}
    wrong["targets"][0, -1] = 48 + (batch["targets"][0, -1] - 47) % 10
    self.assertNotEqual(needle_violations(wrong, 4, 4), [])
    self.assertNotEqual(needle_violations(batch, 4, 4, depth=0.25), [])

  def test_errors_name_the_value(self):
    with self.assertRaisesRegex(ValueError, r"depth=1.5 must be in \[0, 1\]"):
      tasks.Needle(depth=1.5)
    with self.assertRaisesRegex(ValueError, r"depth=-0.1"):
      tasks.Needle(depth=-0.1)
    with self.assertRaisesRegex(ValueError, r"haystack='/no/such/book.txt' names no existing"):
      tasks.Needle(haystack="/no/such/book.txt")
    with self.assertRaisesRegex(ValueError, r"length=18 is too short.*>= 19"):
      tasks.needle_batch(0, 18)
    with self.assertRaisesRegex(ValueError, r"value_digits=0"):
      tasks.Needle(value_digits=0)
    small = self.text_file(n_bytes=500)
    with self.assertRaisesRegex(ValueError, r"holds 500 bytes; length=1024 needs 1005"):
      tasks.needle_batch(0, 1024, haystack=small)


class BatchContractTest(_TempDirCase):

  @parameterized.product(task=("mqar", "needle"), length=(1024, 8192, 32768))
  def test_shapes_dtypes_and_fields(self, task, length):
    if task == "mqar":
      batch = tasks.mqar_batch(0, length, 2, num_pairs=32, vocab_size=4096)
      answers = 32
    else:
      batch = tasks.needle_batch(0, length, 2, depth=0.5)
      answers = 4
    self.assertEqual(set(batch), set(KEYS))
    for key in KEYS:
      self.assertEqual(batch[key].shape, (2, length), key)
      self.assertEqual(batch[key].dtype, DTYPES[key], key)
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    np.testing.assert_array_equal(batch["segment_ids"], 1)
    np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(length),
                                                                      (2, length)))
    self.assertTrue(set(np.unique(batch["loss_mask"])) <= {0.0, 1.0})
    np.testing.assert_array_equal(batch["loss_mask"].sum(1), answers)

  @parameterized.parameters("mqar", "needle")
  def test_deterministic_and_row_addressable(self, task):
    make = tasks.mqar_batch if task == "mqar" else tasks.needle_batch
    first = make((4, 1), 512, 6)
    assert_batches_equal(self, [make((4, 1), 512, 6)], [first])
    other = make((4, 2), 512, 6)
    self.assertFalse(np.array_equal(other["inputs"], first["inputs"]))
    self.assertFalse(np.array_equal(make(5, 512, 6)["inputs"], make(4, 512, 6)["inputs"]))
    middle = make((4, 1), 512, 3, first_row=2)
    assert_batches_equal(self, [middle], [{k: v[2:5] for k, v in first.items()}])
    rows = {first["inputs"][i].tobytes() for i in range(6)}
    self.assertLen(rows, 6)


class PipelineTest(_TempDirCase):

  def config(self, **kw):
    kw = dict(source="mqar", seq_len=128, batch_size=8, mqar_pairs=4, seed=3,
              task_validation_batches=5) | kw
    return data.TextDataConfig(**kw)

  @parameterized.parameters("mqar", "needle")
  def test_resume_gives_the_same_next_batches(self, source):
    config = self.config(source=source)
    uninterrupted = take(data.make_lm_iterator(config), 7)
    it = data.make_lm_iterator(config)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))     # as the checkpoint stores it
    resumed = data.make_lm_iterator(config)
    resumed.set_state(state)
    assert_batches_equal(self, take(resumed, 4), uninterrupted[3:])
    with self.assertRaisesRegex(ValueError, "different pipeline"):
      data.make_lm_iterator(self.config(source=source, seed=4)).set_state(state)
    if source == "mqar":
      with self.assertRaisesRegex(ValueError, "different pipeline"):
        data.make_lm_iterator(self.config(mqar_pairs=5)).set_state(state)

  @parameterized.parameters(("train", 2), ("train", 4), ("validation", 4))
  def test_hosts_concatenate_to_the_single_host_batch(self, split, hosts):
    config = self.config(source="needle", seq_len=64)
    whole = take(data.make_lm_iterator(config, split), 3)
    parts = [take(data.make_lm_iterator(config, split, shard_index=h, shard_count=hosts), 3)
             for h in range(hosts)]
    for k in range(3):
      for key in KEYS:
        np.testing.assert_array_equal(np.concatenate([p[k][key] for p in parts]),
                                      whole[k][key], err_msg=f"batch {k} {key}")

  def test_splits_vocab_and_validation_size(self):
    config = self.config()
    train = data.make_lm_iterator(config)
    validation = data.make_lm_iterator(config, "validation")
    self.assertEqual((train.vocab_size, train.eos_id, train.num_batches), (64, 0, None))
    self.assertEqual(data.vocab_info(config), data.Vocab(64, 0))
    self.assertEqual(data.vocab_info(self.config(source="needle")), data.Vocab(256, 0))
    val = list(validation)
    self.assertLen(val, 5)
    self.assertEqual(validation.num_batches, 5)
    assert_batches_equal(self, list(data.make_lm_iterator(config, "validation")), val)
    self.assertLen(list(data.make_lm_iterator(config, "validation", max_batches=2)), 2)
    train_rows = {r.tobytes() for b in take(train, 20) for r in b["inputs"]}
    val_rows = {r.tobytes() for b in val for r in b["inputs"]}
    self.assertLen(train_rows, 160)
    self.assertEmpty(train_rows & val_rows)
    self.assertEqual(mqar_violations(val[0], 4), [])

  def test_config_errors_name_the_value(self):
    with self.assertRaisesRegex(ValueError,
                                r"source='mqar'.*seq_len=64.*mqar_pairs=20.*length=64 is too"):
      self.config(mqar_pairs=20, seq_len=64)
    with self.assertRaisesRegex(ValueError, r"mqar_vocab_size=8.*vocab_size=8 is too small"):
      self.config(mqar_vocab_size=8)
    with self.assertRaisesRegex(ValueError, r"needle_depth=2.0.*depth=2.0 must be in"):
      self.config(source="needle", needle_depth=2.0)
    with self.assertRaisesRegex(ValueError, r"haystack='/missing/\*.txt'"):
      self.config(source="needle", path="/missing/*.txt")
    with self.assertRaisesRegex(ValueError, r"source='mqar' takes no path"):
      self.config(path="book.txt")
    with self.assertRaisesRegex(ValueError, r"task_validation_batches=0"):
      self.config(task_validation_batches=0)
    with self.assertRaisesRegex(ValueError, r"source='mqar' is a synthetic task"):
      data.load_corpus(self.config(), "train")

  def test_tasks_config_reaches_the_pipeline(self):
    from configs import tasks_lm
    from tnt_jax.train.trainer import data_config
    c = tasks_lm.get_config("task=mqar,mixer=swa,pairs=4,length=128,window=16")
    config = data_config(c)
    self.assertEqual((config.source, config.seq_len, config.mqar_pairs), ("mqar", 128, 4))
    self.assertEqual((c.model.pattern, c.model.window), ("swa", 16))
    self.assertEqual(mqar_violations(next(data.make_lm_iterator(config)), 4), [])
    path = self.text_file()
    c = tasks_lm.get_config(f"task=needle,mixer=titans,depth=0.25,haystack={path}")
    config = data_config(c)
    self.assertEqual((config.source, config.path, config.needle_depth), ("needle", path, 0.25))
    self.assertEqual(c.model.pattern, "titans")
    with self.assertRaisesRegex(ValueError, r"unknown config arguments \['pair'\]"):
      tasks_lm.get_config("pair=3")
    with self.assertRaisesRegex(ValueError, r"task='recall'"):
      tasks_lm.get_config("task=recall")


class ScoringTest(_TempDirCase):

  def test_answer_accuracy(self):
    batch = tasks.mqar_batch(1, 64, 3, num_pairs=4)
    logits = np.eye(64, dtype=np.float32)[batch["targets"]]
    self.assertEqual(tasks.answer_accuracy(logits, batch), (12, 12))
    t = np.flatnonzero(batch["loss_mask"][2])[0]
    logits[2, t] = np.eye(64)[0]
    self.assertEqual(tasks.answer_accuracy(logits, batch), (11, 12))
    self.assertEqual(tasks.answer_accuracy(logits, batch, exact=True), (2, 3))
    copy_input = np.eye(64)[batch["inputs"]]    # a key is never its own value
    self.assertEqual(tasks.answer_accuracy(copy_input, batch), (0, 12))
    with self.assertRaisesRegex(ValueError, "does not match"):
      tasks.answer_accuracy(logits[:, 1:], batch)

  def test_grid_and_heatmap(self):
    lengths, depths = [64, 256], [0.0, 0.5, 1.0]
    perfect = tasks.accuracy_grid(_oracle_logits, lengths, depths, batch_size=3,
                                  num_batches=2)
    np.testing.assert_array_equal(perfect, np.ones((2, 3)))
    # A model that sees only the first 40 (100) tokens finds needles at starts 0, 22 (and 45)
    # of 64-token rows and only at depth 0 of 256-token rows (starts 0, 118, 237): the grid's
    # rows are lengths and its columns depths.
    myopic = tasks.accuracy_grid(lambda x: _oracle_logits(x, max_position=40), lengths, depths)
    np.testing.assert_array_equal(myopic, [[1, 1, 0], [1, 0, 0]])
    myopic = tasks.accuracy_grid(lambda x: _oracle_logits(x, max_position=100), lengths, depths)
    np.testing.assert_array_equal(myopic, [[1, 1, 1], [1, 0, 0]])
    path = os.path.join(self.tempdir(), "plots", "needle.png")
    self.assertEqual(tasks.plot_heatmap(myopic, lengths, depths, path), path)
    with open(path, "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    with self.assertRaisesRegex(ValueError, r"grid shape \(2, 3\)"):
      tasks.plot_heatmap(myopic, lengths, depths[:2], path)
    with self.assertRaisesRegex(ValueError, "length=8 is too short"):
      tasks.accuracy_grid(_oracle_logits, [8], depths)


if __name__ == "__main__":
  absltest.main()
