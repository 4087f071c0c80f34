"""The global test split and the training pool (see :mod:`dplora_ray.data.loading`).

:func:`official_split` takes the test examples from a data set's own test split,
:func:`random_split` draws them from the whole pool (balanced over the labels when
``data.balanced_test``); both then cap the training pool at ``data.max_train_examples``.
:func:`take` builds a split's frame from the pool. All randomness comes from
``numpy.random.SeedSequence(seed)`` with a fixed stream tag per use.
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

from dplora_ray.config import DataConfig
from dplora_ray.data.sources import SPLIT_TEST, SPLIT_TRAIN
from dplora_ray.data.tasks import AnyTask
from dplora_ray.errors import DataError

__all__ = ["EXTRA_COLUMNS", "official_split", "random_split", "take"]

#: columns beyond text/label/group that a task type carries through the split
EXTRA_COLUMNS = ("choices", "target")


def _rng(seed: int, stream: str) -> np.random.Generator:
    tag = zlib.crc32(f"dplora_ray.data.{stream}".encode())
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(tag,)))


def _balanced_draw(
    labels: np.ndarray,
    candidates: np.ndarray,
    task: AnyTask,
    cfg: DataConfig,
    rng: np.random.Generator,
    where: str,
) -> np.ndarray:
    """``test_size // num_labels`` of each label among ``candidates`` (sorted)."""
    per_label = cfg.test_size // task.num_labels
    if per_label == 0:
        raise DataError(
            "data.test_size",
            cfg.test_size,
            f"too small for a balanced test split over {task.num_labels} "
            "labels (set data.balanced_test=false or raise it)",
        )
    chosen = []
    for label, name in enumerate(task.label_names):
        idx = candidates[labels[candidates] == label]
        if len(idx) < per_label:
            raise DataError(
                "data.test_size",
                cfg.test_size,
                f"a balanced test split needs {per_label} examples of label "
                f"{name!r}, but {where} has {len(idx)}",
            )
        chosen.append(rng.choice(idx, per_label, replace=False))
    return np.sort(np.concatenate(chosen))


def _cap(train: np.ndarray, cfg: DataConfig, seed: int) -> np.ndarray:
    cap = cfg.max_train_examples
    if cap is not None and len(train) > cap:
        return np.sort(_rng(seed, "train_cap").choice(train, cap, replace=False))
    return train


def official_split(
    pool: pd.DataFrame, task: AnyTask, cfg: DataConfig, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Test examples from the data set's own test split only (see the module doc)."""
    split = pool["split"].to_numpy()
    labels = pool["label"].to_numpy()
    odd = set(pd.unique(split)) - {SPLIT_TRAIN, SPLIT_TEST}
    if odd:  # a recipe bug, not user input
        raise ValueError(f"recipe {cfg.recipe!r}: split values {sorted(odd)}")
    candidates = np.flatnonzero(split == SPLIT_TEST)
    train = np.flatnonzero(split == SPLIT_TRAIN)
    rng = _rng(seed, "test_split")
    if cfg.balanced_test:
        test = _balanced_draw(labels, candidates, task, cfg, rng, "the official test split")
    elif cfg.test_size < len(candidates):
        test = np.sort(rng.choice(candidates, cfg.test_size, replace=False))
    else:
        test = candidates
    if len(train) == 0:
        raise DataError("data.recipe", cfg.recipe, "its training split is empty")
    return _cap(train, cfg, seed), test


def random_split(
    labels: np.ndarray, task: AnyTask, cfg: DataConfig, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    n = len(labels)
    rng = _rng(seed, "test_split")
    if cfg.balanced_test:
        test = _balanced_draw(labels, np.arange(n), task, cfg, rng, "the data")
    else:
        if cfg.test_size >= n:
            raise DataError(
                "data.test_size", cfg.test_size, f"leaves no training examples (the data has {n})"
            )
        test = np.sort(rng.choice(n, cfg.test_size, replace=False))
    keep = np.ones(n, dtype=bool)
    keep[test] = False
    train = np.flatnonzero(keep)
    if len(train) == 0:
        raise DataError(
            "data.test_size", cfg.test_size, f"leaves no training examples (the data has {n})"
        )
    return _cap(train, cfg, seed), test


def take(pool: pd.DataFrame, idx: np.ndarray) -> pd.DataFrame:
    rows = pool.iloc[idx]
    out = pd.DataFrame(
        {
            "text": rows["text"].astype(str).to_numpy(),
            "label": rows["label"].to_numpy(dtype=np.int64),
            "group": rows["group"].astype(str).to_numpy(),
        }
    )
    for extra in EXTRA_COLUMNS:  # multiple choice / generation
        if extra in rows.columns:
            out[extra] = rows[extra].to_numpy()
    return out
