"""Text data for LM training: byte-level (stdlib, files) and pre-tokenized (tokens) sources,
packed into [batch, seq_len] rows by grain pipelines with checkpointable iterator state.

    from tnt_jax import data
    config = data.TextDataConfig(source="stdlib", seq_len=256, batch_size=8)
    train = data.make_lm_iterator(config, "train", shard_index=0, shard_count=1)
    batch = next(train)   # inputs, targets, loss_mask, segment_ids, positions: [8, 256]
    train.vocab_size, train.eos_id   # 256, 0 for byte-level sources

Synthetic memory tasks (tasks/: MQAR, needle in a haystack) are sources too:
`TextDataConfig(source="mqar", seq_len=1024, mqar_pairs=16)` gives the same iterator interface.

Callers never import grain; see pipeline.py (iteration, sharding, resume), packing.py (the batch
dict), documents.py (sources and the train/validation split), token_shards.py (the on-disk format).
"""

from tnt_jax.data import tasks
from tnt_jax.data.config import SOURCES, TASK_FIELDS, TASK_SOURCES, TextDataConfig
from tnt_jax.data.corpus import BYTE_EOS_ID, BYTE_VOCAB_SIZE, Vocab, load_corpus, vocab_info
from tnt_jax.data.documents import SPLITS
from tnt_jax.data.pipeline import LMIterator, TaskIterator, make_lm_iterator

__all__ = ["BYTE_EOS_ID", "BYTE_VOCAB_SIZE", "LMIterator", "SOURCES", "SPLITS", "TASK_FIELDS",
           "TASK_SOURCES", "TaskIterator", "TextDataConfig", "Vocab", "load_corpus",
           "make_lm_iterator", "tasks", "vocab_info"]
