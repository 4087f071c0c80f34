"""Data: tasks (prompt + label words), loaders and client partitioners.

:func:`load_data` turns a :class:`~dplora_ray.config.DataConfig` into a
:class:`LoadedData` (task, training pool, global test split);
:func:`partition_indices` splits the training pool over the federation's clients.

Invariants:
    * Deterministic given the seed: the same config and seed give the same splits and
      partitions; all randomness comes from ``numpy.random.SeedSequence`` streams derived
      from the seed, never from a global RNG.
    * The test split is held out before the training pool is capped and is disjoint from
      the training set; partitions are disjoint, cover the training pool and leave no
      client empty.
    * Bad data raises :class:`~dplora_ray.errors.DataError` (one line naming the config
      key and the value).
    * Imports neither Ray nor peft; ``datasets`` is imported only when a ``custom``
      data set, or a paper recipe from the Hugging Face hub, is loaded.
"""

from __future__ import annotations

from dplora_ray.data.loading import LoadedData, cache_dir, load_data
from dplora_ray.data.partition import label_histogram, partition_indices
from dplora_ray.data.recipes import PAPER_RECIPES, load_examples
from dplora_ray.data.tasks import TASKS, GenerationTask, MultipleChoiceTask, Task, get_task

__all__ = [
    "PAPER_RECIPES",
    "TASKS",
    "GenerationTask",
    "MultipleChoiceTask",
    "LoadedData",
    "Task",
    "cache_dir",
    "get_task",
    "label_histogram",
    "load_data",
    "load_examples",
    "partition_indices",
]
