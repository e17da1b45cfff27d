"""Synthetic long-context memory tasks: deterministic numpy generators of LM batches.

    from tnt_jax.data import tasks
    batch = tasks.mqar_batch(seed=0, length=1024, batch_size=8, num_pairs=16)
    batch, truth = tasks.needle_batch(0, 8192, 4, depth=0.25, with_truth=True,
                                      haystack="/work/shared/data/war_and_peace.txt")
    correct, total = tasks.answer_accuracy(logits_BxTxV, batch)

Every batch is the trainer's dict (tnt_jax/data/packing.py): inputs, targets (inputs shifted by
one), loss_mask (1 only on the answers), segment_ids (all 1), positions (0..T-1), [B, T];
`truth` is the generator's own record of the answers. mqar.py and needle.py define the tasks,
base.py the seeding (row r of seed s is SeedSequence([*s, r]), so hosts can generate their rows
alone), scoring.py accuracy, the needle (length x depth) grid and its heatmap. The training
pipeline (tnt_jax/data/pipeline.py) serves them as `TextDataConfig(source="mqar" | "needle")`.
"""

from tnt_jax.data.tasks.base import BATCH_KEYS, Example, Task
from tnt_jax.data.tasks.mqar import MQAR, mqar_batch
from tnt_jax.data.tasks.needle import Needle, needle_batch
from tnt_jax.data.tasks.scoring import accuracy_grid, answer_accuracy, plot_heatmap

__all__ = ["BATCH_KEYS", "Example", "MQAR", "Needle", "Task", "accuracy_grid",
           "answer_accuracy", "mqar_batch", "needle_batch", "plot_heatmap"]
