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
import re
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dplora_ray.config import DataConfig
from dplora_ray.data.recipes import PAPER_RECIPES, SPLIT_TEST, SPLIT_TRAIN, load_examples
from dplora_ray.data.tasks import CLASSIFICATION, AnyTask, Task, get_task
from dplora_ray.errors import DataError

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

# VADER: mean human rating (-4..4) -> sentiment3 label. Symmetric thresholds at +-1
# ("slightly" on the raters' scale): the 23,703 texts split 7,349 negative / 7,854
# neutral / 8,500 positive (31% / 33% / 36%). With +-0.5 the neutral class is only 18%
# of the data (4% of the movie snippets), so a balanced test split would eat much of it.
VADER_NEGATIVE_MAX = -1.0  # rating <= this: negative
VADER_POSITIVE_MIN = 1.0  # rating >= this: positive; in between: neutral
VADER_VERSION = "3.3.2"
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_VADER_SDIST_MEMBER = f"vaderSentiment-{VADER_VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_FOLDER = "hutto_ICWSM_2014"
# file stem in hutto_ICWSM_2014/ -> group name
_VADER_SOURCES = {
    "tweets": "tweets",
    "nytEditorialSnippets": "nyt",
    "movieReviewSnippets": "movies",
    "amazonReviewSnippets": "amazon",
}
_VADER_COLUMNS = ("text", "rating", "source")

SYNTHETIC_TRAIN_EXAMPLES = 2000
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

# suffix -> (datasets builder, extra arguments)
_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@dataclass(frozen=True, eq=False)
class LoadedData:
    """A task with its training pool and global held-out test split.

    Attributes:
        task: the task (prompt template and label words).
        train: training pool (columns ``text``, ``label``, ``group``), to be partitioned
            over the clients.
        test: global test split, disjoint from ``train``.
    """

    task: Task
    train: pd.DataFrame
    test: pd.DataFrame


def cache_dir(cfg: DataConfig | None = None) -> Path:
    """The dplora_ray cache folder: ``cfg.cache_dir``, else ``$DPLORA_RAY_CACHE``, else
    ``~/.cache/dplora_ray`` (not created here)."""
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("DPLORA_RAY_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dplora_ray"


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
        train_idx, test_idx = _official_split(pool, task, cfg, seed)
    else:
        train_idx, test_idx = _split(pool["label"].to_numpy(), task, cfg, seed)
    return LoadedData(task=task, train=_take(pool, train_idx), test=_take(pool, test_idx))


# --------------------------------------------------------------------------- splitting


#: columns beyond text/label/group that a task type carries through the split
EXTRA_COLUMNS = ("choices", "target")


def _rng(seed: int, stream: str) -> np.random.Generator:
    tag = zlib.crc32(f"dplora_ray.data.{stream}".encode())
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(tag,)))


def _balanced_draw(
    labels: np.ndarray,
    candidates: np.ndarray,
    task: Task,
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


def _official_split(
    pool: pd.DataFrame, task: Task, cfg: DataConfig, seed: int
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


def _split(
    labels: np.ndarray, task: Task, cfg: DataConfig, seed: int
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


def _take(pool: pd.DataFrame, idx: np.ndarray) -> pd.DataFrame:
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


def _frame(texts: Iterable[Any], labels: Iterable[int], groups: Iterable[Any]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "text": pd.Series(list(texts), dtype=object).astype(str),
            "label": np.asarray(list(labels), dtype=np.int64),
            "group": pd.Series(list(groups), dtype=object).astype(str),
        }
    )


def _one_line(exc: BaseException | str, limit: int = 200) -> str:
    if isinstance(exc, BaseException):
        exc = str(exc).strip() or type(exc).__name__
    line = " ".join(exc.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --------------------------------------------------------------------------- synthetic


def _load_synthetic(cfg: DataConfig, task: Task) -> pd.DataFrame:
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
    return _frame(texts, labels, groups)


# --------------------------------------------------------------------------- vader


def vader_labels(ratings: np.ndarray) -> np.ndarray:
    """sentiment3 labels of VADER mean ratings: 0 (negative) for rating <= -1, 2
    (positive) for rating >= 1, 1 (neutral) in between."""
    ratings = np.asarray(ratings, dtype=np.float64)
    return np.where(
        ratings <= VADER_NEGATIVE_MAX, 0, np.where(ratings >= VADER_POSITIVE_MIN, 2, 1)
    ).astype(np.int64)


def _load_vader(cfg: DataConfig, task: Task) -> pd.DataFrame:
    if task.name != "sentiment3":
        raise DataError(
            "data.task",
            cfg.task,
            "recipe 'vader' has 3-class sentiment labels; use data.task=sentiment3",
        )
    frame = _vader_from_path(cfg.path) if cfg.path is not None else _vader_cached(cfg)
    return _frame(frame["text"], vader_labels(frame["rating"].to_numpy()), frame["source"])


def _vader_cached(cfg: DataConfig) -> pd.DataFrame:
    target = cache_dir(cfg) / "vader" / "vader.parquet"
    if target.is_file():
        try:
            frame = pd.read_parquet(target)
            if set(_VADER_COLUMNS) <= set(frame.columns) and len(frame):
                return frame
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt below
            pass
    frame = _download_vader()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".vader.", suffix=".tmp")
        os.close(fd)
        try:
            frame.to_parquet(tmp, index=False)
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache is readable like a download
            os.replace(tmp, target)  # atomic: concurrent loaders never see half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        raise DataError(
            "data.cache_dir",
            str(cache_dir(cfg)),
            f"cannot write the VADER cache ({_one_line(exc)})",
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
            raise fail(_one_line(exc)) from exc
        if proc.returncode != 0:
            lines = [
                ln
                for ln in (proc.stderr + proc.stdout).splitlines()
                if ln.strip() and not ln.startswith("WARNING")
            ]
            raise fail(_one_line(lines[-1] if lines else f"pip exited with {proc.returncode}"))
        sdists = sorted(Path(tmp).glob("*.tar.gz"))
        if not sdists:
            raise fail("pip saved no source distribution")
        data = sdists[0].read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != VADER_SDIST_SHA256:
            raise fail(f"sha256 {digest} does not match the pinned {VADER_SDIST_SHA256}")
    return _vader_from_sdist(io.BytesIO(data), ("data.recipe", "vader"))


def _vader_from_sdist(
    fileobj: io.BufferedIOBase | io.BytesIO, where: tuple[str, Any]
) -> pd.DataFrame:
    with tarfile.open(fileobj=fileobj, mode="r:*") as outer:
        try:
            member = outer.extractfile(_VADER_SDIST_MEMBER)
        except KeyError:
            member = None
        if member is None:
            raise DataError(*where, f"the archive has no {_VADER_SDIST_MEMBER}")
        inner = io.BytesIO(member.read())
    with tarfile.open(fileobj=inner, mode="r:*") as tar:
        return _vader_from_hutto_tar(tar, where)


def _vader_from_hutto_tar(tar: tarfile.TarFile, where: tuple[str, Any]) -> pd.DataFrame:
    def read(stem: str) -> bytes:
        name = f"{_VADER_FOLDER}/{stem}_GroundTruth.txt"
        try:
            f = tar.extractfile(name)
        except KeyError:
            f = None
        if f is None:
            raise DataError(*where, f"the archive has no {name}")
        return f.read()

    return _vader_table(read, where)


def _vader_table(read: Callable[[str], bytes], where: tuple[str, Any]) -> pd.DataFrame:
    texts: list[str] = []
    ratings: list[float] = []
    sources: list[str] = []
    for stem, source in _VADER_SOURCES.items():
        t, r = _parse_ground_truth(read(stem), f"{stem}_GroundTruth.txt", where)
        texts += t
        ratings += r
        sources += [source] * len(t)
    return pd.DataFrame(
        {"text": texts, "rating": np.asarray(ratings, dtype=np.float64), "source": sources}
    )


def _parse_ground_truth(
    raw: bytes, name: str, where: tuple[str, Any]
) -> tuple[list[str], list[float]]:
    """Rows ``id<TAB>mean rating<TAB>text`` (CRLF line ends). Read with quoting off (as
    ``csv.QUOTE_NONE``: quote characters are part of the text) and split on the first
    two tabs only, so a tab inside the text stays in the text."""
    texts: list[str] = []
    ratings: list[float] = []
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        try:
            if len(fields) != 3:
                raise ValueError
            rating = float(fields[1])
        except ValueError:
            raise DataError(
                *where, f"{name} line {lineno} is not 'id<TAB>rating<TAB>text'"
            ) from None
        texts.append(fields[2].strip())
        ratings.append(rating)
    return texts, ratings


def _vader_from_path(path: str) -> pd.DataFrame:
    """Offline VADER: ``data.path`` is a ``vader.parquet`` (columns text, rating,
    source), the ``hutto_ICWSM_2014`` folder (or a folder holding it), the
    ``hutto_ICWSM_2014.tar.gz`` or the ``vaderSentiment-3.3.2.tar.gz`` sdist."""
    where = ("data.path", path)
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(*where, "no such file or folder")
    if p.is_dir():
        for folder in (p, p / _VADER_FOLDER):
            if all((folder / f"{stem}_GroundTruth.txt").is_file() for stem in _VADER_SOURCES):
                return _vader_table(
                    lambda stem, folder=folder: (folder / f"{stem}_GroundTruth.txt").read_bytes(),
                    where,
                )
        raise DataError(
            *where, "holds no VADER *_GroundTruth.txt files (expected the hutto_ICWSM_2014 folder)"
        )
    if p.suffix == ".parquet":
        try:
            frame = pd.read_parquet(p)
        except Exception as exc:  # noqa: BLE001 - any reader failure is a data error
            raise DataError(*where, f"could not be read as Parquet ({_one_line(exc)})") from exc
        if not set(_VADER_COLUMNS) <= set(frame.columns):
            raise DataError(
                *where,
                "is not a VADER table (needs columns text, rating, "
                f"source; has {', '.join(map(str, frame.columns))})",
            )
        return frame
    if p.name.endswith((".tar.gz", ".tgz")):
        try:
            with tarfile.open(p, mode="r:*") as tar:
                names = set(tar.getnames())
                if _VADER_SDIST_MEMBER not in names:
                    return _vader_from_hutto_tar(tar, where)
            with p.open("rb") as f:
                return _vader_from_sdist(io.BytesIO(f.read()), where)
        except tarfile.TarError as exc:
            raise DataError(*where, f"is not a readable tar archive ({_one_line(exc)})") from exc
    raise DataError(
        *where,
        "is not VADER data: expected vader.parquet, the "
        "hutto_ICWSM_2014 folder or .tar.gz, or the vaderSentiment sdist",
    )


# --------------------------------------------------------------------------- custom


def _hub_offline() -> str | None:
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def _looks_like_hub_id(path: str) -> bool:
    return (
        bool(_HUB_ID.match(path))
        and Path(path).suffix.lower() not in _FORMATS
        and not path.startswith((".", "~"))
    )


def _read_custom(cfg: DataConfig) -> pd.DataFrame:
    import datasets  # heavy; only the custom recipe needs it

    path = str(cfg.path)
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in _FORMATS)
        if not files:
            raise DataError("data.path", path, f"the folder holds no {', '.join(_FORMATS)} file")
    elif _looks_like_hub_id(path):
        var = _hub_offline()
        if var is not None:
            raise DataError(
                "data.path",
                path,
                f"not a local file and the hub is offline ({var}=1); point "
                "data.path at a local CSV/JSON/Parquet file",
            )
        try:
            loaded = datasets.load_dataset(path, cache_dir=str(cache_dir(cfg) / "datasets"))
        except Exception as exc:  # noqa: BLE001 - network, auth, format: all data errors
            raise DataError(
                "data.path",
                path,
                "could not be loaded from the Hugging Face "
                f"hub ({type(exc).__name__}: {_one_line(exc)})",
            ) from exc
        return _to_pandas(loaded)
    else:
        raise DataError("data.path", path, "no such file or folder")

    by_format: dict[str, list[Path]] = {}
    for f in files:
        suffix = f.suffix.lower()
        if suffix not in _FORMATS:
            raise DataError(
                "data.path", path, f"unsupported file type {suffix!r}; use {', '.join(_FORMATS)}"
            )
        by_format.setdefault(suffix, []).append(f)
    if all(f.stat().st_size == 0 for f in files):
        raise DataError("data.path", path, "is empty (no rows)")
    frames = []
    for suffix, group in by_format.items():
        builder, kwargs = _FORMATS[suffix]
        group = [f for f in group if f.stat().st_size > 0]
        if not group:
            continue
        try:
            loaded = datasets.load_dataset(
                builder,
                data_files=[str(f) for f in group],
                cache_dir=str(cache_dir(cfg) / "datasets"),
                **kwargs,
            )
        except Exception as exc:  # noqa: BLE001 - parser errors are data errors
            if "corresponds to no data" in str(exc):  # datasets' words for "zero rows"
                continue
            raise DataError(
                "data.path",
                path,
                f"could not be read as {suffix[1:].upper()} "
                f"({type(exc).__name__}: {_one_line(exc)})",
            ) from exc
        frames.append(_to_pandas(loaded))
    if not frames:
        raise DataError("data.path", path, "is empty (no rows)")
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _to_pandas(loaded: Any) -> pd.DataFrame:
    """All splits of a ``datasets.DatasetDict`` (or one ``Dataset``) as one frame."""
    splits = list(loaded.values()) if hasattr(loaded, "values") else [loaded]
    frames = [split.to_pandas() for split in splits]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _first_missing(series: pd.Series) -> int | None:
    missing = np.flatnonzero(series.isna().to_numpy())
    return int(missing[0]) if len(missing) else None


def _check_present(series: pd.Series, key: str, column: str) -> None:
    row = _first_missing(series)
    if row is not None:
        count = int(series.isna().sum())
        raise DataError(key, column, f"has {count} missing value(s), the first in row {row}")


def _raw_key(value: Any) -> str:
    """The string form of a raw label value, as written in ``data.label_map``."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _direct_label(value: Any, names: dict[str, int]) -> int | None:
    """A raw label read as a task label name (any case) or an index; None if neither."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return value if 0 <= value < len(names) else None
    if isinstance(value, str):
        return names.get(value.strip().lower())
    return None


def _map_labels(series: pd.Series, cfg: DataConfig, task: Task) -> np.ndarray:
    column = cfg.label_column
    names = {name.lower(): i for i, name in enumerate(task.label_names)}
    listed = ", ".join(task.label_names)
    _check_present(series, "data.label_column", column)
    try:
        uniques = list(pd.unique(series))
    except TypeError:
        raise DataError("data.label_column", column, "holds non-scalar values") from None
    mapping: dict[Any, int] = {}
    if cfg.label_map is not None:
        lowered = {str(k).strip().lower(): v for k, v in cfg.label_map.items()}
        for raw, name in cfg.label_map.items():
            if str(name).strip().lower() not in names:
                raise DataError(
                    "data.label_map",
                    cfg.label_map,
                    f"maps {raw!r} to {name!r}, which is not a label of task "
                    f"{task.name!r} ({listed})",
                )
        for value in uniques:
            key = _raw_key(value)
            name = cfg.label_map.get(key, lowered.get(key.lower()))
            if name is None:
                raise DataError(
                    "data.label_map",
                    cfg.label_map,
                    f"has no entry for the value {key!r} of column {column!r}",
                )
            mapping[value] = names[str(name).strip().lower()]
    else:
        for value in uniques:
            index = _direct_label(value, names)
            if index is None:
                raise DataError(
                    "data.label_column",
                    column,
                    f"holds the value {_raw_key(value)!r}, which is neither a "
                    f"label of task {task.name!r} ({listed}) nor an index "
                    f"0..{task.num_labels - 1}; set data.label_map",
                )
            mapping[value] = index
    return np.asarray([mapping[v] for v in series.tolist()], dtype=np.int64)


def _load_custom(cfg: DataConfig, task: Task) -> pd.DataFrame:
    raw = _read_custom(cfg)
    if len(raw) == 0:
        raise DataError("data.path", cfg.path, "is empty (no rows)")
    available = ", ".join(map(str, raw.columns))
    columns = (
        ("data.text_column", cfg.text_column),
        ("data.label_column", cfg.label_column),
        ("data.group_column", cfg.group_column),
    )
    for key, column in columns:
        if column is not None and column not in raw.columns:
            raise DataError(key, column, f"no such column; available columns: {available}")
    _check_present(raw[cfg.text_column], "data.text_column", cfg.text_column)
    labels = _map_labels(raw[cfg.label_column], cfg, task)
    if cfg.group_column is not None:
        _check_present(raw[cfg.group_column], "data.group_column", cfg.group_column)
        groups: Iterable[Any] = raw[cfg.group_column].map(_raw_key).tolist()
    else:
        groups = [""] * len(raw)
    return _frame(raw[cfg.text_column].tolist(), labels, groups)


def _load_paper(cfg: DataConfig, task: Task) -> pd.DataFrame:
    """A paper classification recipe (:mod:`dplora_ray.data.recipes`): label names become
    indices into ``task.label_names``; the ``split`` column is kept for the test split."""
    frame = load_examples(cfg)
    index = {name: i for i, name in enumerate(task.label_names)}
    unknown = sorted(set(frame["label"]) - set(index))
    if unknown:  # a recipe/task mismatch that load_examples let through: a bug
        raise ValueError(f"recipe {cfg.recipe!r}: labels {unknown} not in task {task.name!r}")
    out = _frame(frame["text"], frame["label"].map(index), frame["group"])
    out["split"] = frame["split"].to_numpy()
    return out


def _load_piqa(cfg: DataConfig, task: AnyTask) -> pd.DataFrame:
    """PIQA as a multiple-choice pool: ``text`` = goal, ``choices`` = (sol1, sol2),
    ``label`` = index of the right solution. Without a training split (the local copy holds
    the labelled validation set only) the split column is cleared, so the test split is a
    seeded ``data.test_size`` draw and the rest trains."""
    frame = load_examples(cfg)
    out = _frame(frame["goal"], frame["label"], [""] * len(frame))
    out["choices"] = [(a, b) for a, b in zip(frame["sol1"], frame["sol2"])]
    split = frame["split"].to_numpy()
    out["split"] = split if (split == SPLIT_TRAIN).any() else ""
    return out


def _load_medquad(cfg: DataConfig, task: AnyTask) -> pd.DataFrame:
    """MedQuAD as a generation pool: ``text`` = question, ``target`` = reference answer,
    ``group`` = NIH source site, label 0 (one pseudo-class)."""
    frame = load_examples(cfg)
    out = _frame(frame["question"], np.zeros(len(frame), dtype=np.int64), frame["group"])
    out["target"] = frame["answer"].to_numpy()
    out["split"] = frame["split"].to_numpy()
    return out


RECIPES: dict[str, Callable[[DataConfig, Task], pd.DataFrame]] = {
    "custom": _load_custom,
    "fpb": _load_paper,
    "medquad": _load_medquad,
    "piqa": _load_piqa,
    "pubmedqa": _load_paper,
    "synthetic": _load_synthetic,
    "tfns": _load_paper,
    "vader": _load_vader,
}
