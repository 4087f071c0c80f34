"""VADER's human-rated sentiment corpora (``data.recipe: vader``): reading and labelling.

The ratings come in ``hutto_ICWSM_2014`` (a folder or ``.tar.gz``), which ships inside
the ``vaderSentiment`` source distribution; :func:`vader_from_sdist` and
:func:`vader_from_path` turn those (or a cached ``vader.parquet``) into a table with the
columns :data:`VADER_COLUMNS`, and :func:`vader_labels` maps the mean ratings to
sentiment3 labels. Downloading and caching the sdist is :mod:`dplora_ray.data.loading`'s.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dplora_ray.errors import DataError
from dplora_ray.fileio import one_line

__all__ = [
    "VADER_COLUMNS",
    "VADER_NEGATIVE_MAX",
    "VADER_POSITIVE_MIN",
    "VADER_SDIST_SHA256",
    "VADER_VERSION",
    "vader_from_path",
    "vader_from_sdist",
    "vader_labels",
]

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
VADER_COLUMNS = ("text", "rating", "source")


def vader_labels(ratings: np.ndarray) -> np.ndarray:
    """sentiment3 labels of VADER mean ratings: 0 (negative) for rating <= -1, 2
    (positive) for rating >= 1, 1 (neutral) in between."""
    ratings = np.asarray(ratings, dtype=np.float64)
    return np.where(
        ratings <= VADER_NEGATIVE_MAX, 0, np.where(ratings >= VADER_POSITIVE_MIN, 2, 1)
    ).astype(np.int64)


def vader_from_sdist(
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


def vader_from_path(path: str) -> pd.DataFrame:
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
                def read(stem: str, folder: Path = folder) -> bytes:
                    return (folder / f"{stem}_GroundTruth.txt").read_bytes()

                return _vader_table(read, where)
        raise DataError(
            *where, "holds no VADER *_GroundTruth.txt files (expected the hutto_ICWSM_2014 folder)"
        )
    if p.suffix == ".parquet":
        try:
            frame = pd.read_parquet(p)
        except Exception as exc:  # noqa: BLE001 - any reader failure is a data error
            raise DataError(
                *where, f"could not be read as Parquet ({one_line(exc, limit=200)})"
            ) from exc
        if not set(VADER_COLUMNS) <= set(frame.columns):
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
                return vader_from_sdist(io.BytesIO(f.read()), where)
        except tarfile.TarError as exc:
            raise DataError(
                *where, f"is not a readable tar archive ({one_line(exc, limit=200)})"
            ) from exc
    raise DataError(
        *where,
        "is not VADER data: expected vader.parquet, the "
        "hutto_ICWSM_2014 folder or .tar.gz, or the vaderSentiment sdist",
    )
