"""Text pipelines: packing meaning, splits, determinism, resume, multi-host sharding, errors,
and the prepare_tokens round trip. Small corpora, so the whole file runs in seconds."""

import json
import os
import subprocess
import sys
import tempfile
import types
from unittest import mock

from absl.testing import absltest, parameterized
import numpy as np

from tests.helpers import assert_batches_equal, take

from experiments import prepare_tokens
from tnt_jax import data
from tnt_jax.data import documents, packing
from tnt_jax.data.stream import TokenStream

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")




def _text(seed, n_lines):
  """Varied printable lines, no NUL (NUL is the byte-level separator)."""
  rng = np.random.default_rng(seed)
  words = ["memory", "tensor", "gradient", "titan", "chunk", "über", "naïve", "λ", "x = 1"]
  return "".join(" ".join(rng.choice(words, rng.integers(1, 9))) + "\n"
                 for _ in range(n_lines))


class _CorpusTestCase(parameterized.TestCase):
  """A directory of 40 small text files, plus one single-file corpus."""

  def tempdir(self) -> str:
    # absltest's create_tempdir needs parsed absl flags, which pytest does not parse.
    return self.enterContext(tempfile.TemporaryDirectory())

  def setUp(self):
    super().setUp()
    self.dir = self.tempdir()
    self.texts = {}
    for i in range(40):
      name = os.path.join(self.dir, "docs", f"part{i // 10}", f"doc{i:02d}.txt")
      os.makedirs(os.path.dirname(name), exist_ok=True)
      self.texts[name] = _text(i, 5 + 3 * i)
      with open(name, "w") as f:
        f.write(self.texts[name])
    self.glob = os.path.join(self.dir, "docs", "**", "*.txt")
    self.novel = os.path.join(self.dir, "novel.txt")
    self.novel_text = _text(99, 400)
    with open(self.novel, "w") as f:
      f.write(self.novel_text)

  def files_config(self, **kw):
    kw = dict(source="files", path=self.glob, seq_len=16, batch_size=4,
              validation_fraction=0.25) | kw
    return data.TextDataConfig(**kw)


class PackingTest(_CorpusTestCase):

  def test_batch_shapes_dtypes_and_shifted_targets(self):
    it = data.make_lm_iterator(self.files_config(), "validation")
    self.assertEqual((it.vocab_size, it.eos_id), (256, 0))
    batches = list(it)
    self.assertLen(batches, it.num_batches)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in KEYS}
    for batch in batches:
      self.assertEqual(set(batch), set(KEYS))
      for key in KEYS:
        self.assertEqual(batch[key].shape, (4, 16), key)
      self.assertEqual(batch["loss_mask"].dtype, np.float32)
      for key in ("inputs", "targets", "segment_ids", "positions"):
        self.assertEqual(batch[key].dtype, np.int32, key)
    real = rows["loss_mask"] > 0
    # Within a row and across consecutive rows, targets are the next inputs of one stream.
    np.testing.assert_array_equal(rows["targets"][:, :-1][real[:, :-1]],
                                  rows["inputs"][:, 1:][real[:, :-1]])
    full = real.all(axis=1)
    np.testing.assert_array_equal(rows["targets"][:-1, -1][full[:-1] & real[1:, 0]],
                                  rows["inputs"][1:, 0][full[:-1] & real[1:, 0]])
    # Padding only at the very end.
    self.assertEqual(real.sum(), it.num_tokens - 1)
    self.assertTrue(real.reshape(-1)[:real.sum()].all())

  def test_segments_and_positions(self):
    stream = TokenStream([np.array([5, 6, 0, 7, 0, 8, 9, 9, 0], np.uint8)])
    batch = packing.read_rows(stream, [0, 1, 2], seq_len=4, eos_id=0)
    # Rows are stream[0:5], stream[4:9], stream[8:9] (+ padding): overlapping by one token.
    np.testing.assert_array_equal(batch["inputs"], [[5, 6, 0, 7], [0, 8, 9, 9], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["targets"], [[6, 0, 7, 0], [8, 9, 9, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2], [1, 2, 2, 2],
                                                         [1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0], [0, 0, 1, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])

  def test_stream_reads_across_pieces(self):
    pieces = [np.arange(0, 5, dtype=np.uint16), np.arange(5, 6, dtype=np.uint16),
              np.zeros(0, np.uint16), np.arange(6, 13, dtype=np.uint16)]
    stream = TokenStream(pieces)
    self.assertLen(stream, 13)
    for start, stop in [(0, 13), (3, 9), (4, 6), (5, 6), (11, 20), (13, 14)]:
      np.testing.assert_array_equal(stream.read(start, stop), np.arange(start, min(stop, 13)))


class SourcesTest(_CorpusTestCase):

  def test_stdlib_split_disjoint_stable_and_nonempty(self):
    train = [d.name for d in documents.stdlib_documents("train", 0.02)]
    validation = [d.name for d in documents.stdlib_documents("validation", 0.02)]
    self.assertNotEmpty(validation)
    self.assertGreater(len(train), 20 * len(validation))
    self.assertEmpty(set(train) & set(validation))
    self.assertEqual(train, sorted(train))
    self.assertEqual(validation, [d.name for d in documents.stdlib_documents("validation", 0.02)])
    self.assertFalse(any(n.startswith("site-packages/") or "/test/" in f"/{n}"
                         for n in train + validation))

  def test_split_hash_is_stable_across_processes(self):
    # SHA-256 of the name (not Python's salted hash()): golden values hold on every machine.
    self.assertTrue(documents.in_validation("copyreg.py", 0.02))
    self.assertFalse(documents.in_validation("os.py", 0.02))
    self.assertTrue(documents.in_validation("os.py", 0.86))

  def test_stdlib_batches_are_python_source(self):
    it = data.make_lm_iterator(data.TextDataConfig(seq_len=64, batch_size=2, max_bytes=2**20))
    tokens = np.concatenate([b["inputs"].reshape(-1) for b in take(it, 8)])
    printable = (tokens == 10) | ((tokens >= 32) & (tokens < 127))
    self.assertGreater(printable.mean(), 0.95)   # mostly ASCII source text
    text = bytes(tokens.astype(np.uint8)).decode("utf-8", "replace")
    self.assertTrue(any(word in text for word in ("def ", "import ", "return", "self", "#")))

  def test_single_file_round_trip(self):
    config = self.files_config(path=self.novel, validation_fraction=0.1)
    validation = data.make_lm_iterator(config, "validation")
    batches = list(validation)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in KEYS}
    stream = np.concatenate([rows["inputs"][:1, 0], rows["targets"][rows["loss_mask"] > 0]])
    val_text = bytes(stream.astype(np.uint8)).decode("utf-8")
    self.assertTrue(val_text.endswith("\n\0"))
    cut = len(self.novel_text.encode()) - (len(val_text.encode()) - 1)   # "- 1": the separator
    train_text = self.novel_text.encode()[:cut].decode()
    self.assertEqual(train_text + val_text[:-1], self.novel_text)   # cut at a line start
    self.assertGreater(len(val_text), 0.08 * len(self.novel_text))
    # One train epoch is a permutation of all full rows of "train text + separator".
    train = data.make_lm_iterator(config, "train")
    want = np.frombuffer(train_text.encode() + b"\0", np.uint8).astype(np.int32)
    want_rows = sorted(want[r * 16:r * 16 + 17].tobytes() for r in range(train.num_rows))
    got = []
    while len(got) < train.num_rows:
      batch = next(train)
      got += [np.append(i, t[-1]).tobytes() for i, t in zip(batch["inputs"], batch["targets"])]
    self.assertEqual(sorted(got[:train.num_rows]), want_rows)

  def test_files_documents_whole_in_sorted_order(self):
    train = documents.file_documents(self.glob, "train", 0.25)
    validation = documents.file_documents(self.glob, "validation", 0.25)
    self.assertNotEmpty(validation)
    self.assertCountEqual([d.path for d in train + validation], list(self.texts))
    corpus = data.load_corpus(self.files_config(), "validation")
    want = b"".join(self.texts[d.path].encode() + b"\0" for d in validation)
    self.assertEqual(bytes(corpus.stream.read(0, len(corpus.stream)).astype(np.uint8)), want)
    self.assertEqual(corpus.num_documents, len(validation))
    # Names are relative to the common root, so the split does not depend on where data lives.
    self.assertTrue(all(d.name.startswith("part") for d in validation))

  def test_comma_separated_paths_and_cap(self):
    paths = sorted(self.texts)[:3]
    docs = documents.file_documents(",".join(paths), "train", 0.0)
    self.assertEqual([d.path for d in docs], paths)
    capped = documents.file_documents(",".join(paths), "train", 0.0,
                                      max_bytes=len(self.texts[paths[0]].encode()) + 1)
    self.assertEqual([d.path for d in capped], paths[:1])


class DeterminismTest(_CorpusTestCase):

  def test_same_seed_same_batches_different_seed_different(self):
    first = take(data.make_lm_iterator(self.files_config(seed=3)), 6)
    assert_batches_equal(self, take(data.make_lm_iterator(self.files_config(seed=3)), 6), first)
    other = take(data.make_lm_iterator(self.files_config(seed=4)), 6)
    self.assertFalse(all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other)))

  def test_epochs_are_reshuffled(self):
    config = self.files_config(path=self.novel, seq_len=64, batch_size=1)
    it = data.make_lm_iterator(config)
    n = it.num_rows
    rows = [next(it)["inputs"][0].tobytes() for _ in range(2 * n)]
    self.assertCountEqual(rows[:n], rows[n:])       # each epoch sees every row once
    self.assertNotEqual(rows[:n], rows[n:])         # in a new order

  @parameterized.product(k=[0, 1, 5], read_threads=[0, 2])
  def test_resume_gives_the_uninterrupted_batches(self, k, read_threads):
    config = self.files_config(read_threads=read_threads)
    uninterrupted = take(data.make_lm_iterator(config), k + 4)
    it = data.make_lm_iterator(config)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))   # what a checkpoint stores
    take(it, 2)                                     # the old iterator moves on; no effect
    resumed = data.make_lm_iterator(config)
    resumed.set_state(state)
    assert_batches_equal(self, take(resumed, 4), uninterrupted[k:])

  def test_state_from_another_pipeline_is_refused(self):
    state = data.make_lm_iterator(self.files_config(seed=1)).get_state()
    with self.assertRaisesRegex(ValueError, "different pipeline.*seed"):
      data.make_lm_iterator(self.files_config(seed=2)).set_state(state)
    with self.assertRaisesRegex(ValueError, "state=.*get_state"):
      data.make_lm_iterator(self.files_config()).set_state({"next_index": 3})

  def test_validation_is_one_deterministic_pass(self):
    config = self.files_config()
    first = list(data.make_lm_iterator(config, "validation"))
    assert_batches_equal(self, list(data.make_lm_iterator(config, "validation")), first)
    assert_batches_equal(self, list(data.make_lm_iterator(config, "validation", max_batches=2)),
                          first[:2])
    limited = data.make_lm_iterator(config, "train", max_batches=3)
    self.assertLen(list(limited), 3)


class ShardingTest(_CorpusTestCase):

  @parameterized.product(split=["train", "validation"], shard_count=[2, 4])
  def test_hosts_together_form_the_global_batch(self, split, shard_count):
    config = self.files_config(batch_size=8)
    single = take(data.make_lm_iterator(config, split), 3)
    hosts = [take(data.make_lm_iterator(config, split, shard_index=h, shard_count=shard_count), 3)
             for h in range(shard_count)]
    for step, want in enumerate(single):
      for host in hosts:
        self.assertEqual(host[step]["inputs"].shape, (8 // shard_count, 16))
      got = {k: np.concatenate([host[step][k] for host in hosts]) for k in KEYS}
      assert_batches_equal(self, [got], [want])

  def test_bad_sharding(self):
    with self.assertRaisesRegex(ValueError, "batch_size=6 must be divisible by shard_count=4"):
      data.make_lm_iterator(self.files_config(batch_size=6), shard_index=0, shard_count=4)
    with self.assertRaisesRegex(ValueError, "shard_index=2, shard_count=2"):
      data.make_lm_iterator(self.files_config(), shard_index=2, shard_count=2)


class ErrorsTest(_CorpusTestCase):

  @parameterized.named_parameters(
      ("seq_len", dict(seq_len=0), "seq_len=0 must be >= 1"),
      ("batch_size", dict(batch_size=0), "batch_size=0"),
      ("source", dict(source="web"), "source='web' must be one of"),
      ("no_path", dict(source="files", path=""), "source='files' needs a path"),
      ("fraction", dict(validation_fraction=1.0), "validation_fraction=1.0"),
      ("seed", dict(seed=-1), "seed=-1"),
      ("max_bytes", dict(max_bytes=0), "max_bytes=0"),
  )
  def test_bad_config(self, kw, message):
    with self.assertRaisesRegex(ValueError, message):
      data.TextDataConfig(**kw)

  def test_bad_paths(self):
    empty = os.path.join(self.dir, "empty.txt")
    open(empty, "w").close()
    missing = os.path.join(self.dir, "missing.txt")
    for path, message in [(missing, "missing.txt.*does not exist"),
                          (os.path.join(self.dir, "*.csv"), r"\*.csv.*matches no files"),
                          (self.dir, "matches only directories"),
                          (empty, "empty.txt.*empty"),
                          (f"{self.novel},{missing}", "missing.txt.*does not exist"),
                          (" , ", "names no files")]:
      with self.assertRaisesRegex(ValueError, message):
        data.make_lm_iterator(self.files_config(path=path))

  def test_bad_split_and_short_corpus(self):
    with self.assertRaisesRegex(ValueError, "split='eval' must be one of"):
      data.make_lm_iterator(self.files_config(), "eval")
    with self.assertRaisesRegex(ValueError, "seq_len=100000 needs at least"):
      data.make_lm_iterator(self.files_config(seq_len=100_000))
    with self.assertRaisesRegex(ValueError, "split='validation'.*has no documents"):
      data.make_lm_iterator(self.files_config(validation_fraction=0.0), "validation")

  def test_bad_token_directories(self):
    out = self.tempdir()
    with self.assertRaisesRegex(ValueError, "has no meta.json"):
      data.make_lm_iterator(self.files_config(source="tokens", path=out))
    prepare_tokens.prepare(self.glob, out, "bytes", 0.25)
    meta_file = os.path.join(out, "meta.json")
    good = json.load(open(meta_file))
    corruptions = [("{not json", "is not valid JSON"),
                   (good | {"eos_id": 256}, "eos_id=256"),
                   (good | {"vocab_size": "big"}, "vocab_size='big' must be an integer"),
                   ({k: v for k, v in good.items() if k != "eos_id"}, "eos_id=None"),
                   (good | {"format": "v0"}, "format='v0'"),
                   (good | {"shards": {"train": ["nope.npy"], "validation": []}},
                    "nope.npy.*does not exist"),
                   (good | {"shards": {"train": "x"}}, "shards=.*must map"),
                   ([1, 2], "must hold a JSON object")]
    for content, message in corruptions:
      with open(meta_file, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
      with self.assertRaisesRegex(ValueError, message):
        data.make_lm_iterator(self.files_config(source="tokens", path=out))


class PrepareTokensTest(_CorpusTestCase):

  @parameterized.named_parameters(("one_shard", 2**27), ("many_shards", 300))
  def test_bytes_tokens_match_the_files_source(self, shard_tokens):
    out = self.tempdir()
    meta = prepare_tokens.prepare(self.glob, out, "bytes", 0.25, shard_tokens=shard_tokens)
    self.assertEqual((meta.vocab_size, meta.eos_id), (256, 0))
    if shard_tokens == 300:
      self.assertGreater(len(meta.shards["train"]), 3)   # rows straddle shard boundaries
    self.assertEqual(data.vocab_info(self.files_config(source="tokens", path=out)),
                     data.Vocab(256, 0))
    for split in data.SPLITS:
      files = data.make_lm_iterator(self.files_config(), split, max_batches=8)
      tokens = data.make_lm_iterator(self.files_config(source="tokens", path=out), split,
                                     max_batches=8)
      self.assertEqual(tokens.num_documents, files.num_documents)
      self.assertEqual(tokens.num_tokens, files.num_tokens)
      assert_batches_equal(self, list(tokens), list(files))

  def test_command_line(self):
    out = self.tempdir()
    result = subprocess.run(
        [sys.executable, "-m", "experiments.prepare_tokens", f"--input={self.novel}",
         f"--output_dir={out}", "--tokenizer=bytes", "--validation_fraction=0.1"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertIn("vocab_size=256 eos_id=0", result.stdout)
    shard = np.load(os.path.join(out, "train_00000.npy"))
    self.assertEqual(shard.dtype, np.uint16)
    validation = np.load(os.path.join(out, "validation_00000.npy"))
    text, cut = self.novel_text.encode(), len(shard) - 1
    self.assertEqual(text[cut - 1:cut], b"\n")                # validation starts at a line
    self.assertEqual(bytes(np.concatenate([shard, validation]).astype(np.uint8)),
                     text[:cut] + b"\0" + text[cut:] + b"\0")

  def test_hugging_face_tokenizer_path(self):
    # A stand-in for transformers (not installed here): word ids, eos 1, vocab 50.
    class FakeTokenizer:
      eos_token_id = 1

      def __len__(self):
        return 50

      def __call__(self, texts, add_special_tokens):
        assert not add_special_tokens
        return {"input_ids": [[2 + len(w) % 48 for w in t.split()] for t in texts]}

    fake = types.SimpleNamespace(AutoTokenizer=types.SimpleNamespace(
        from_pretrained=lambda name: FakeTokenizer()))
    out = self.tempdir()
    with mock.patch.dict(sys.modules, {"transformers": fake}):
      meta = prepare_tokens.prepare(self.glob, out, "fake/tokenizer", 0.25)
    self.assertEqual((meta.vocab_size, meta.eos_id, meta.tokenizer), (50, 1, "fake/tokenizer"))
    it = data.make_lm_iterator(self.files_config(source="tokens", path=out), "validation")
    self.assertEqual((it.vocab_size, it.eos_id), (50, 1))
    tokens = np.concatenate([b["inputs"][b["loss_mask"] > 0] for b in it])
    self.assertEqual(int((tokens == 1).sum()) + 1, meta.num_documents["validation"])
    with mock.patch.dict(sys.modules, {"transformers": None}):
      with self.assertRaisesRegex(ImportError, "pip install transformers"):
        prepare_tokens.prepare(self.glob, out, "gpt2", 0.25)


if __name__ == "__main__":
  absltest.main()
