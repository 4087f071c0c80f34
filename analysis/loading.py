"""Load a run folder or a sweep folder into pandas with a fixed schema.

Builds only on the package's public result API: the column constants and the files
:func:`~dplora_ray.results.load_run` reads, of :mod:`dplora_ray.results`, the sweep table
of :mod:`dplora_ray.tune` (``sweep.parquet``) and :func:`~dplora_ray.config.load_config`.
A file that cannot be read (damaged, cut short, not UTF-8) is a ConfigError naming it
(``dplora-ray analyze`` exits 2 with one line).

Invariants:
    * ``Results.trials`` has the sweep-table schema (:data:`dplora_ray.tune.SWEEP_COLUMNS`
      plus the dotted key columns) for a sweep and for a single run alike (a run is a
      one-row table), so every table and plot works on both.
    * ``Results.rounds`` / ``Results.clients`` hold :data:`dplora_ray.results.ROUND_COLUMNS`
      / :data:`~dplora_ray.results.CLIENT_COLUMNS` plus ``trial`` and the key columns, for
      every finished trial whose folder is readable here; the others are listed in
      ``Results.missing`` (a sweep run on a cluster without a shared filesystem).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import pandas as pd

from dplora_ray import results as R
from dplora_ray import tune as S
from dplora_ray.config import load_config
from dplora_ray.config.yamlfile import read_yaml_file
from dplora_ray.errors import ConfigError
from dplora_ray.fileio import one_line

T = TypeVar("T")

__all__ = ["Results", "key_columns", "load_results"]


@dataclass(frozen=True)
class Results:
    """Everything ``analyze`` reads from one folder.

    Attributes:
        kind: ``run`` (one experiment) or ``sweep``.
        path: the folder.
        trials: one row per trial (one row for a run).
        rounds: one row per trial and server round (no round 0: the untrained adapter is
            ``eval_accuracy_before`` in ``trials``).
        clients: one row per trial, round and client.
        swept: the swept dotted keys, in sweep-file order (empty for a run).
        missing: finished trials whose folder could not be read here.
    """

    kind: Literal["run", "sweep"]
    path: Path
    trials: pd.DataFrame
    rounds: pd.DataFrame
    clients: pd.DataFrame
    swept: tuple[str, ...]
    missing: tuple[str, ...] = ()

    @property
    def ok(self) -> pd.DataFrame:
        """The trials that finished."""
        return self.trials[self.trials[S.STATUS] == S.STATUS_OK]


def key_columns(trials: pd.DataFrame) -> list[str]:
    """The dotted config-key columns of a trials table (swept keys and context keys)."""
    return [c for c in trials.columns if c not in S.SWEEP_COLUMNS]


def _empty(columns: tuple[str, ...], extra: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64") for c in (S.TRIAL, *columns, *extra)})


def _attach(frame: pd.DataFrame, trial_row: pd.Series, keys: list[str]) -> pd.DataFrame:
    frame = frame.copy()
    frame.insert(0, S.TRIAL, trial_row[S.TRIAL])
    for k in keys:
        frame[k] = trial_row[k]
    return frame


def _trial_folder(root: Path, row: pd.Series) -> Path | None:
    """The trial's folder: where the sweep wrote it, else ``root/trials/<name>`` (a sweep
    folder copied or mounted elsewhere)."""
    for cand in (Path(str(row[S.TRIAL_DIR])), root / "trials" / str(row[S.TRIAL])):
        if (cand / "summary.json").is_file() and (cand / "rounds.parquet").is_file():
            return cand
    return None


def _readable(folder: Path, what: str, read: Callable[[], T]) -> T:
    """``read()``, or a ConfigError ``DIR=folder: <what> cannot be read (...)``: a file
    damaged or cut short (a copy that stopped half-way, a full disk) is bad input."""
    try:
        return read()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - JSON, Arrow, Unicode, OS errors alike
        raise ConfigError("DIR", str(folder), f"{what} cannot be read "
                          f"({one_line(exc, 200)})") from None


def _run_files(folder: Path) -> dict[str, Any]:
    """:func:`dplora_ray.results.load_run`'s files, each read on its own so that a
    damaged one is named."""
    run = {
        "rounds": _readable(folder, "rounds.parquet",
                            lambda: pd.read_parquet(folder / "rounds.parquet")),
        "clients": _readable(folder, "clients.parquet",
                             lambda: pd.read_parquet(folder / "clients.parquet")),
        "summary": _readable(folder, "summary.json",
                             lambda: json.loads((folder / "summary.json").read_bytes())),
    }
    if not isinstance(run["summary"], dict):
        raise ConfigError("DIR", str(folder), "summary.json cannot be read (not a JSON "
                          "object)")
    return run


def _load_sweep(path: Path) -> Results:
    trials = _readable(path, S.SWEEP_FILE, lambda: S.read_sweep(path))
    missing_cols = [c for c in (S.TRIAL, S.STATUS, S.TRIAL_DIR) if c not in trials.columns]
    if missing_cols:
        raise ConfigError("DIR", str(path), f"{S.SWEEP_FILE} lacks the column "
                          f"{missing_cols[0]!r} (not a dplora-ray sweep table)")
    swept: list[str] = []
    plan = path / "sweep.yaml"
    if plan.is_file():
        doc = read_yaml_file(plan, "DIR")
        doc = doc if isinstance(doc, dict) else {}
        swept = [k for k in ((doc.get("sweep") or {}).get("space") or {}) if k in trials]
    keys = key_columns(trials)
    rounds, clients, missing = [], [], []
    for _, row in trials.iterrows():
        if row[S.STATUS] != S.STATUS_OK:
            continue
        folder = _trial_folder(path, row)
        if folder is None:
            missing.append(str(row[S.TRIAL]))
            continue
        run = _run_files(folder)
        rounds.append(_attach(run["rounds"], row, keys))
        clients.append(_attach(run["clients"], row, keys))
    return Results(
        kind="sweep",
        path=path,
        trials=trials,
        rounds=pd.concat(rounds, ignore_index=True) if rounds else _empty(R.ROUND_COLUMNS, keys),
        clients=pd.concat(clients, ignore_index=True)
        if clients
        else _empty(R.CLIENT_COLUMNS, keys),
        swept=tuple(swept),
        missing=tuple(missing),
    )


def _load_run(path: Path) -> Results:
    run = _run_files(path)
    cfg = load_config(path / "config.yaml")
    base = {c: None for c in S.SWEEP_COLUMNS}
    base[S.TRIAL] = path.name
    base[S.TRIAL_DIR] = str(path)
    for k in S.CONTEXT_KEYS:
        base[k] = S.config_value(cfg, k)
    row = S.row_from_summary(base, run["summary"])
    trials = S.sweep_table([row], swept=()).to_pandas()
    keys = key_columns(trials)
    first = trials.iloc[0]
    return Results(
        kind="run",
        path=path,
        trials=trials,
        rounds=_attach(run["rounds"], first, keys),
        clients=_attach(run["clients"], first, keys),
        swept=(),
    )


def load_results(path: str | Path) -> Results:
    """Load a sweep folder (``sweep.parquet``) or a run folder (``summary.json``).

    Raises:
        ConfigError: the folder is neither.
    """
    p = Path(path).expanduser()
    if (p / S.SWEEP_FILE).is_file():
        return _load_sweep(p)
    if (p / "summary.json").is_file() and (p / "rounds.parquet").is_file():
        return _load_run(p)
    raise ConfigError(
        "DIR",
        str(path),
        "is neither a sweep folder (sweep.parquet) nor a "
        "finished run folder (summary.json, rounds.parquet)",
    )
