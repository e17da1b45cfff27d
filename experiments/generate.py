r"""Continue a prompt with a trained model, streaming tokens as they are sampled.

    python -m experiments.generate --checkpoint /tmp/tnt_jax_run/checkpoints \
        --prompt "def main(" --num_tokens 200 --temperature 0.8 --top_p 0.95 --seed 0

The prompt is prefilled in parallel form; each new token then costs one recurrent step (memory
layers carry their fast weights, attention layers a KV cache). Byte-level models take --prompt
as UTF-8 text; token-shard models take --prompt_ids (comma-separated ids).
"""

import codecs
import sys
import time

from absl import app, flags
import numpy as np

flags.DEFINE_string("checkpoint", None, "a run's checkpoints/ directory (latest step) or one "
                    "step directory", required=True)
flags.DEFINE_string("prompt", "", "UTF-8 text (byte-level models)")
flags.DEFINE_string("prompt_ids", "", "comma-separated token ids (any vocabulary)")
flags.DEFINE_integer("num_tokens", 200, "tokens to generate")
flags.DEFINE_float("temperature", 1.0, "0 = greedy")
flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0 = all)")
flags.DEFINE_float("top_p", 1.0, "nucleus: the smallest set reaching this probability")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_string("dtype", None, "compute dtype override (default: the run's)")
FLAGS = flags.FLAGS


def prompt_tokens(prompt: str, prompt_ids: str, vocab) -> np.ndarray:
  if prompt and prompt_ids:
    raise ValueError("pass --prompt or --prompt_ids, not both")
  if prompt_ids:
    ids = [int(x) for x in prompt_ids.split(",")]
    bad = [i for i in ids if not 0 <= i < vocab.vocab_size]
    if bad:
      raise ValueError(f"--prompt_ids {bad} are outside the vocabulary [0, {vocab.vocab_size})")
  elif vocab.vocab_size == 256:
    ids = list(prompt.encode("utf-8")) or [vocab.eos_id]   # empty prompt: start a document
  else:
    raise ValueError(f"this model's vocabulary has {vocab.vocab_size} tokens, not bytes: pass "
                     "--prompt_ids")
  return np.asarray([ids], np.int32)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from tnt_jax.models.decoding import Decoder
  from tnt_jax.train.restore_model import load_trained_model
  model, _, vocab = load_trained_model(FLAGS.checkpoint, dtype=FLAGS.dtype)
  prompt = prompt_tokens(FLAGS.prompt, FLAGS.prompt_ids, vocab)
  decoder = Decoder(model, max_length=prompt.shape[1] + FLAGS.num_tokens)
  byte_level = vocab.vocab_size == 256 and not FLAGS.prompt_ids
  text = codecs.getincrementaldecoder("utf-8")(errors="replace")
  if byte_level:
    sys.stdout.write(FLAGS.prompt)
  start, first = time.perf_counter(), None
  for i, token in enumerate(decoder.generate(prompt, FLAGS.num_tokens,
                                             temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                             top_p=FLAGS.top_p, seed=FLAGS.seed)):
    first = first or time.perf_counter()
    piece = text.decode(bytes([int(token[0])])) if byte_level else f"{int(token[0])} "
    sys.stdout.write(piece)
    sys.stdout.flush()
  end = time.perf_counter()
  steps = max(FLAGS.num_tokens - 1, 1)
  print(f"\n\n[{FLAGS.num_tokens} tokens; prefill {prompt.shape[1]} tokens + first token "
        f"{(first or end) - start:.2f} s (incl. compile); then {steps / (end - (first or end)):.1f}"
        " tokens/s]", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
