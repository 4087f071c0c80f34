"""Helpers every data recipe shares: where the data lives and the frame it becomes.

* :func:`cache_dir`: the dplora_ray cache folder (downloads, the ``datasets`` cache).
* :func:`hub_offline` / :func:`looks_like_hub_id`: whether the Hugging Face hub may be
  used, and whether a ``data.path`` that is not a local path names a hub data set.
* :data:`FORMATS`: the local file types ``datasets`` reads (suffix -> builder, arguments).
* :data:`SPLIT_TRAIN` / :data:`SPLIT_TEST`: the values of a recipe frame's ``split``
  column.
* :func:`pool_frame`: the engine's ``text`` / ``label`` / ``group`` frame.

Imports no other module of :mod:`dplora_ray.data`, so every loader and recipe can use it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dplora_ray.config import DataConfig

__all__ = [
    "FORMATS",
    "SPLIT_TEST",
    "SPLIT_TRAIN",
    "cache_dir",
    "hub_offline",
    "looks_like_hub_id",
    "pool_frame",
]

SPLIT_TRAIN = "train"
SPLIT_TEST = "test"

# suffix -> (datasets builder, extra arguments)
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def cache_dir(cfg: DataConfig | None = None) -> Path:
    """The dplora_ray cache folder: ``cfg.cache_dir``, else ``$DPLORA_RAY_CACHE``, else
    ``~/.cache/dplora_ray`` (not created here)."""
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("DPLORA_RAY_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dplora_ray"


def hub_offline() -> str | None:
    """The environment variable that turns the hub off (``HF_DATASETS_OFFLINE`` /
    ``HF_HUB_OFFLINE`` set to a true value), or None when the hub may be used."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def looks_like_hub_id(path: str) -> bool:
    """``path`` reads as a hub data set id (``owner/name``), not as a local file."""
    return (
        bool(_HUB_ID.match(path))
        and Path(path).suffix.lower() not in FORMATS
        and not path.startswith((".", "~"))
    )


def pool_frame(texts: Iterable[Any], labels: Iterable[int], groups: Iterable[Any]) -> pd.DataFrame:
    """The columns ``text`` (str), ``label`` (int64) and ``group`` (str)."""
    return pd.DataFrame(
        {
            "text": pd.Series(list(texts), dtype=object).astype(str),
            "label": np.asarray(list(labels), dtype=np.int64),
            "group": pd.Series(list(groups), dtype=object).astype(str),
        }
    )
