"""The ``custom`` recipe: a local CSV/TSV/JSON/JSONL/Parquet file or folder, or a
Hugging Face hub id, with the columns mapped by ``data.text_column``,
``data.label_column``, ``data.group_column`` and ``data.label_map``.

:func:`load_custom` reads it with ``datasets`` (imported only here, on use) and returns
the engine's ``text`` / ``label`` / ``group`` frame; a missing column, a missing value or a
label outside the task raises :class:`~dplora_ray.errors.DataError`.
"""

from __future__ import annotations

import codecs
import contextlib
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dplora_ray.config import DataConfig
from dplora_ray.data.sources import (
    FORMATS,
    cache_dir,
    hub_offline,
    looks_like_hub_id,
    pool_frame,
)
from dplora_ray.data.tasks import Task
from dplora_ray.errors import DataError
from dplora_ray.fileio import one_line

__all__ = ["load_custom"]


def _read_custom(cfg: DataConfig) -> pd.DataFrame:
    import datasets  # heavy; only the custom recipe needs it

    path = str(cfg.path)
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in FORMATS)
        if not files:
            raise DataError("data.path", path, f"the folder holds no {', '.join(FORMATS)} file")
    elif looks_like_hub_id(path):
        var = hub_offline()
        if var is not None:
            raise DataError(
                "data.path",
                path,
                f"not a local file and the hub is offline ({var}=1); point "
                "data.path at a local CSV/JSON/Parquet file",
            )
        try:
            with _quiet_datasets():
                loaded = datasets.load_dataset(path, cache_dir=str(cache_dir(cfg) / "datasets"))
        except Exception as exc:  # noqa: BLE001 - network, auth, format: all data errors
            raise DataError(
                "data.path",
                path,
                f"could not be loaded from the Hugging Face hub ({one_line(exc, limit=200)})",
            ) from exc
        return _to_pandas(loaded)
    else:
        raise DataError("data.path", path, "no such file or folder")

    by_format: dict[str, list[Path]] = {}
    for f in files:
        suffix = f.suffix.lower()
        if suffix not in FORMATS:
            raise DataError(
                "data.path", path, f"unsupported file type {suffix!r}; use {', '.join(FORMATS)}"
            )
        by_format.setdefault(suffix, []).append(f)
    if all(f.stat().st_size == 0 for f in files):
        raise DataError("data.path", path, "is empty (no rows)")
    frames = []
    for suffix, group in by_format.items():
        builder, kwargs = FORMATS[suffix]
        group = [f for f in group if f.stat().st_size > 0]
        if not group:
            continue
        try:
            with _quiet_datasets():
                loaded = datasets.load_dataset(
                    builder,
                    data_files=[str(f) for f in group],
                    cache_dir=str(cache_dir(cfg) / "datasets"),
                    **kwargs,
                )
        except Exception as exc:  # noqa: BLE001 - parser errors are data errors
            if "corresponds to no data" in str(exc):  # datasets' words for "zero rows"
                continue
            if suffix != ".parquet":  # name the file that is not text, and where
                for f in group:
                    _check_utf8(f, path)
            raise DataError(
                "data.path",
                path,
                f"could not be read as {suffix[1:].upper()} ({one_line(_root_cause(exc), 200)})",
            ) from None
        frames.append(_to_pandas(loaded))
    if not frames:
        raise DataError("data.path", path, "is empty (no rows)")
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """``datasets`` logs its own error line ("Failed to read file ...") and progress bars
    before raising; the user sees our one line instead."""
    import datasets

    level = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL + 10)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(level)


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain (``datasets`` wraps the parser's error)."""
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or exc.__context__
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def _check_utf8(f: Path, path: str) -> None:
    """DataError naming ``f`` and the offset of its first byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(f, "rb") as fh:
            while True:
                chunk = fh.read(1 << 20)
                pending = len(decoder.getstate()[0])  # bytes held over from the last chunk
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as exc:
                    raise DataError("data.path", path, f"{f.name} is not UTF-8 text (byte "
                                    f"0x{exc.object[exc.start]:02x} at offset "
                                    f"{offset - pending + exc.start})") from None
                if not chunk:
                    return
                offset += len(chunk)
    except OSError as exc:
        raise DataError("data.path", path, f"{f.name} cannot be read "
                        f"({exc.strerror or exc})") from None


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
            found: str | None = cfg.label_map.get(key, lowered.get(key.lower()))
            if found is None:
                raise DataError(
                    "data.label_map",
                    cfg.label_map,
                    f"has no entry for the value {key!r} of column {column!r}",
                )
            mapping[value] = names[str(found).strip().lower()]
    else:
        if any(isinstance(v.item() if isinstance(v, np.generic) else v, bool) for v in uniques):
            raise DataError("data.label_column", column,
                            "holds true/false values; say which label each means with "
                            "data.label_map (e.g. {true: positive, false: negative})")
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


def _usable_texts(raw: pd.DataFrame, column: str) -> pd.DataFrame:
    """Refuse list/mapping-valued texts (they would be trained on as their repr); drop
    empty (or blank) texts with a warning line, or refuse when nothing is left."""
    texts = raw[column]
    nested = np.flatnonzero(texts.map(lambda v: isinstance(v, (list, tuple, dict, np.ndarray)))
                            .to_numpy(dtype=bool))
    if len(nested):
        kind = "mapping" if isinstance(texts.iloc[int(nested[0])], dict) else "list"
        raise DataError("data.text_column", column,
                        f"holds {kind} values, not text (first in row {int(nested[0])}); "
                        "point it at a column of strings")
    blank = texts.map(lambda v: isinstance(v, str) and not v.strip()).to_numpy(dtype=bool)
    if blank.all():
        raise DataError("data.text_column", column, "holds only empty texts")
    if blank.any():
        print(f"warning: data.text_column={column!r}: dropped {int(blank.sum())} row(s) "
              "with an empty text", file=sys.stderr)
        raw = raw.loc[~blank].reset_index(drop=True)
    return raw


def load_custom(cfg: DataConfig, task: Task) -> pd.DataFrame:
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
    raw = _usable_texts(raw, cfg.text_column)
    labels = _map_labels(raw[cfg.label_column], cfg, task)
    if cfg.group_column is not None:
        _check_present(raw[cfg.group_column], "data.group_column", cfg.group_column)
        groups: Iterable[Any] = raw[cfg.group_column].map(_raw_key).tolist()
    else:
        groups = [""] * len(raw)
    return pool_frame(raw[cfg.text_column].tolist(), labels, groups)
