"""Load a labelled text data set (``data.recipe``) and hold out the global test split.

Recipes (explicit registry :data:`RECIPES`):

* ``vader``: VADER's human-rated sentiment corpora (Hutto & Gilbert, ICWSM 2014; MIT
  licence): tweets, NYT editorial snippets, movie-review snippets and Amazon-review
  snippets, 23,703 texts, each with the mean rating of about ten people on -4..4. They
  ship only in the source distribution of ``vaderSentiment==3.3.2``, which is fetched
  once with ``pip download`` and converted into ``<cache>/vader/vader.parquet``.
  ``group`` is the source (``tweets``, ``nyt``, ``movies``, ``amazon``).
* ``synthetic``: a fixed, generated 3-class sentiment corpus for tests; each label uses
  its own words, so a tiny model can learn it. Four groups ``g0``..``g3`` with mild
  label skew.
* ``custom``: ``data.path`` is a local CSV/TSV/JSON/JSONL/Parquet file or a folder of
  them (read with ``datasets.load_dataset``), or a Hugging Face hub id; the columns are
  mapped with ``data.text_column``, ``data.label_column``, ``data.group_column`` and
  ``data.label_map``.
* ``fpb``, ``tfns``, ``pubmedqa``: the DP-LoRA paper's classification data sets
  (:mod:`dplora_ray.data.recipes`: local copies, ``$DPLORA_DATA_DIR`` or the hub);
  ``medquad`` (generation: ``target`` = the answer) and ``piqa`` (multiple choice:
  ``choices`` = the two solutions; the local copy holds only the labelled validation set,
  which is then split with ``data.test_size`` like a data set without a test split).

Then the global test split is held out (``data.test_size`` examples, balanced over the
labels when ``data.balanced_test``) and what is left is the training pool, capped at
``data.max_train_examples``. A data set with an official test split (``tfns``,
``pubmedqa`` from a local copy) takes its test examples from that split only: all of it
when ``data.test_size`` covers it (and ``data.balanced_test`` is false), else a seeded
draw of ``data.test_size`` (balanced over the labels when ``data.balanced_test``); the
official test examples left over are not trained on, and the training pool is the
official training split.

This module holds the registry, the synthetic corpus and the VADER download and cache;
the readers are :mod:`~dplora_ray.data.custom`, :mod:`~dplora_ray.data.vader` and
:mod:`~dplora_ray.data.recipes` (the paper's data sets), the split is
:mod:`~dplora_ray.data.splits`, and the helpers they share are
:mod:`~dplora_ray.data.sources`.

Invariants:
    * :func:`load_data` is deterministic given the config and the seed. The randomness
      comes from ``numpy.random.SeedSequence(seed)`` with a fixed stream tag per use
      (test split, cap), never from a global RNG; the synthetic corpus itself does not
      depend on the seed.
    * The test split is held out before the training pool is capped, and it is
      disjoint from the training set; changing ``max_train_examples`` does not change it.
    * Both frames have exactly the columns ``text`` (str), ``label`` (int64 index into
      ``task.label_names``) and ``group`` (str, ``""`` when the data has no groups), a
      fresh ``RangeIndex``, and rows in the order of the source data; multiple-choice
      tasks add ``choices`` (a tuple of strings per row; ``piqa``), generation tasks
      ``target`` (the reference answer; ``medquad``).
    * Bad input raises :class:`~dplora_ray.errors.DataError` with a one-line message
      naming the config key and the value.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from dplora_ray.config import DataConfig
from dplora_ray.data.custom import load_custom
from dplora_ray.data.recipes import PAPER_RECIPES, load_examples
from dplora_ray.data.sources import SPLIT_TEST, SPLIT_TRAIN, cache_dir, pool_frame
from dplora_ray.data.splits import official_split, random_split, take
from dplora_ray.data.tasks import CLASSIFICATION, AnyTask, get_task
from dplora_ray.data.vader import (
    VADER_COLUMNS,
    VADER_NEGATIVE_MAX,
    VADER_POSITIVE_MIN,
    VADER_SDIST_SHA256,
    VADER_VERSION,
    vader_from_path,
    vader_from_sdist,
    vader_labels,
)
from dplora_ray.errors import DataError
from dplora_ray.fileio import one_line, write_atomic

__all__ = [
    "COLUMNS",
    "RECIPES",
    "VADER_NEGATIVE_MAX",
    "VADER_POSITIVE_MIN",
    "LoadedData",
    "cache_dir",
    "load_data",
    "vader_labels",
]

COLUMNS = ("text", "label", "group")

SYNTHETIC_TRAIN_EXAMPLES = 2000
SYNTHETIC_MAX_EXAMPLES = 1_000_000
_SYNTHETIC_ENTROPY = 0x5E1F_DA7A  # the synthetic corpus is the same for every seed
_SYNTHETIC_GROUPS = ("g0", "g1", "g2", "g3")
_SYNTHETIC_WORDS = (  # one vocabulary per label: negative, neutral, positive
    (
        "terrible",
        "awful",
        "horrible",
        "dreadful",
        "disappointing",
        "useless",
        "miserable",
        "broken",
    ),
    ("ordinary", "average", "standard", "typical", "routine", "plain", "usual", "regular"),
    (
        "excellent",
        "wonderful",
        "fantastic",
        "delightful",
        "superb",
        "amazing",
        "lovely",
        "brilliant",
    ),
)
_SYNTHETIC_SUBJECTS = (  # one topic per group
    ("film", "movie", "plot", "actor"),
    ("phone", "battery", "screen", "charger"),
    ("meal", "waiter", "pasta", "dessert"),
    ("hotel", "room", "bed", "lobby"),
)
_SYNTHETIC_TEMPLATES = (
    "The {s} was {w}.",
    "I found the {s} {w} and {v}.",
    "Honestly, a {w} {s}.",
    "What a {w} {s}, really {v}.",
    "The {s} seemed {w} to me.",
    "Overall the {s} felt {w}.",
)


@dataclass(frozen=True, eq=False)
class LoadedData:
    """A task with its training pool and global held-out test split.

    Attributes:
        task: the task (prompt template and label words).
        train: training pool (columns ``text``, ``label``, ``group``), to be partitioned
            over the clients.
        test: global test split, disjoint from ``train``.
    """

    task: AnyTask
    train: pd.DataFrame
    test: pd.DataFrame


def load_data(cfg: DataConfig, seed: int) -> LoadedData:
    """Load ``cfg``'s data set and split it into a training pool and a test split.

    The test split holds ``cfg.test_size`` examples drawn with ``seed`` (with
    ``cfg.balanced_test``: ``test_size // num_labels`` of each label, so possibly a few
    fewer); the remaining examples form the training pool, then capped at
    ``cfg.max_train_examples`` by a seeded random choice.

    Raises:
        DataError: unknown task or recipe, a task the recipe does not provide,
            unreadable or empty data, a missing column, a
            label outside the task, or a split left empty.
    """
    task = get_task(cfg.task)
    spec = PAPER_RECIPES.get(cfg.recipe)
    if spec is None and task.kind != CLASSIFICATION:
        fits = ", ".join(k for k, v in PAPER_RECIPES.items() if v.task_type == task.kind)
        raise DataError("data.task", cfg.task,
                        f"is a {task.kind} task; only the recipes {fits} provide its data")
    if cfg.recipe not in RECIPES:
        raise DataError(
            "data.recipe", cfg.recipe, f"unknown recipe; choose one of {', '.join(sorted(RECIPES))}"
        )
    pool = RECIPES[cfg.recipe](cfg, task)
    if "split" in pool.columns and (pool["split"] == SPLIT_TEST).any():
        train_idx, test_idx = official_split(pool, task, cfg, seed)
    else:
        train_idx, test_idx = random_split(pool["label"].to_numpy(), task, cfg, seed)
    return LoadedData(task=task, train=take(pool, train_idx), test=take(pool, test_idx))


# --------------------------------------------------------------------------- synthetic


def _load_synthetic(cfg: DataConfig, task: AnyTask) -> pd.DataFrame:
    """A fixed generated corpus of ``test_size + (max_train_examples or 2000)`` short
    reviews. Labels cycle through negative/neutral/positive (then shuffled), so every
    label has a third of the examples; a review uses two words of its label's
    vocabulary and a subject of its group's topic. Groups are label-skewed: group ``g``
    is three times as likely for label ``g % 3`` as for the others."""
    if task.name != "sentiment3":
        raise DataError(
            "data.task",
            cfg.task,
            "recipe 'synthetic' generates 3-class sentiment; use data.task=sentiment3",
        )
    n = cfg.test_size + (cfg.max_train_examples or SYNTHETIC_TRAIN_EXAMPLES)
    if n > SYNTHETIC_MAX_EXAMPLES:  # generated one by one: this many would take hours
        raise DataError("data.max_train_examples", cfg.max_train_examples,
                        f"the synthetic recipe generates at most {SYNTHETIC_MAX_EXAMPLES:,} "
                        f"examples (data.test_size + data.max_train_examples = {n:,})")
    rng = np.random.default_rng(np.random.SeedSequence(_SYNTHETIC_ENTROPY))
    labels = rng.permutation(np.arange(n) % 3)
    weights = np.ones((3, len(_SYNTHETIC_GROUPS)))
    for g in range(len(_SYNTHETIC_GROUPS)):
        weights[g % 3, g] = 3.0
    weights /= weights.sum(axis=1, keepdims=True)
    texts, groups = [], []
    for label in labels:
        g = int(rng.choice(len(_SYNTHETIC_GROUPS), p=weights[label]))
        words = _SYNTHETIC_WORDS[label]
        w, v = rng.choice(len(words), size=2, replace=False)
        subjects = _SYNTHETIC_SUBJECTS[g]
        template = _SYNTHETIC_TEMPLATES[int(rng.integers(len(_SYNTHETIC_TEMPLATES)))]
        texts.append(
            template.format(s=subjects[int(rng.integers(len(subjects)))], w=words[w], v=words[v])
        )
        groups.append(_SYNTHETIC_GROUPS[g])
    return pool_frame(texts, labels, groups)


# --------------------------------------------------------------------------- vader


def _load_vader(cfg: DataConfig, task: AnyTask) -> pd.DataFrame:
    if task.name != "sentiment3":
        raise DataError(
            "data.task",
            cfg.task,
            "recipe 'vader' has 3-class sentiment labels; use data.task=sentiment3",
        )
    frame = vader_from_path(cfg.path) if cfg.path is not None else _vader_cached(cfg)
    return pool_frame(frame["text"], vader_labels(frame["rating"].to_numpy()), frame["source"])


def _vader_cached(cfg: DataConfig) -> pd.DataFrame:
    target = cache_dir(cfg) / "vader" / "vader.parquet"
    if target.is_file():
        try:
            frame = pd.read_parquet(target)
            if set(VADER_COLUMNS) <= set(frame.columns) and len(frame):
                return frame
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt below
            pass
    frame = _download_vader()

    def write(fh: IO[bytes]) -> None:
        frame.to_parquet(fh, index=False)
        os.chmod(fh.fileno(), 0o644)  # mkstemp makes it 0600; the cache is readable like a download

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, write)  # concurrent loaders never see half a file
    except OSError as exc:
        raise DataError(
            "data.cache_dir",
            str(cache_dir(cfg)),
            f"cannot write the VADER cache ({one_line(exc, limit=200)})",
        ) from exc
    return frame


def _download_vader() -> pd.DataFrame:
    spec = f"vaderSentiment=={VADER_VERSION}"

    def fail(reason: str) -> DataError:
        return DataError(
            "data.recipe",
            "vader",
            f"could not download {spec} from the package index ({reason}); "
            "set data.path to a local copy (the sdist, its hutto_ICWSM_2014 "
            "folder or a vader.parquet), or use data.recipe=custom with "
            "data.path=...",
        )

    with tempfile.TemporaryDirectory(prefix="dplora_ray_vader_") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            spec,
            "-d",
            tmp,
            "--quiet",
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise fail(one_line(exc, limit=200)) from exc
        if proc.returncode != 0:
            lines = [
                ln
                for ln in (proc.stderr + proc.stdout).splitlines()
                if ln.strip() and not ln.startswith("WARNING")
            ]
            raise fail(
                one_line(lines[-1] if lines else f"pip exited with {proc.returncode}", limit=200)
            )
        sdists = sorted(Path(tmp).glob("*.tar.gz"))
        if not sdists:
            raise fail("pip saved no source distribution")
        data = sdists[0].read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != VADER_SDIST_SHA256:
            raise fail(f"sha256 {digest} does not match the pinned {VADER_SDIST_SHA256}")
    return vader_from_sdist(io.BytesIO(data), ("data.recipe", "vader"))


# --------------------------------------------------------------------------- paper


def _load_paper(cfg: DataConfig, task: AnyTask) -> pd.DataFrame:
    """A paper classification recipe (:mod:`dplora_ray.data.recipes`): label names become
    indices into ``task.label_names``; the ``split`` column is kept for the test split."""
    frame = load_examples(cfg)
    index = {name: i for i, name in enumerate(task.label_names)}
    unknown = sorted(set(frame["label"]) - set(index))
    if unknown:  # a recipe/task mismatch that load_examples let through: a bug
        raise ValueError(f"recipe {cfg.recipe!r}: labels {unknown} not in task {task.name!r}")
    out = pool_frame(frame["text"], frame["label"].map(index), frame["group"])
    out["split"] = frame["split"].to_numpy()
    return out


def _load_piqa(cfg: DataConfig, task: AnyTask) -> pd.DataFrame:
    """PIQA as a multiple-choice pool: ``text`` = goal, ``choices`` = (sol1, sol2),
    ``label`` = index of the right solution. Without a training split (the local copy holds
    the labelled validation set only) the split column is cleared, so the test split is a
    seeded ``data.test_size`` draw and the rest trains."""
    frame = load_examples(cfg)
    out = pool_frame(frame["goal"], frame["label"], [""] * len(frame))
    out["choices"] = [(a, b) for a, b in zip(frame["sol1"], frame["sol2"])]
    split = frame["split"].to_numpy()
    out["split"] = split if (split == SPLIT_TRAIN).any() else ""
    return out


def _load_medquad(cfg: DataConfig, task: AnyTask) -> pd.DataFrame:
    """MedQuAD as a generation pool: ``text`` = question, ``target`` = reference answer,
    ``group`` = NIH source site, label 0 (one pseudo-class)."""
    frame = load_examples(cfg)
    out = pool_frame(frame["question"], np.zeros(len(frame), dtype=np.int64), frame["group"])
    out["target"] = frame["answer"].to_numpy()
    out["split"] = frame["split"].to_numpy()
    return out


RECIPES: dict[str, Callable[..., pd.DataFrame]] = {  # (DataConfig, task) -> pool
    "custom": load_custom,
    "fpb": _load_paper,
    "medquad": _load_medquad,
    "piqa": _load_piqa,
    "pubmedqa": _load_paper,
    "synthetic": _load_synthetic,
    "tfns": _load_paper,
    "vader": _load_vader,
}
