"""The sweep table (``DIR/sweep.parquet``): its schema, one row per trial, writing and
reading it.

A row starts as a trial's *base row* (its name, swept and context keys, ``pending``) and
becomes ``ok`` with the metrics of the trial's ``summary.json`` (:func:`row_from_summary`)
or ``error`` with a one-line message (:func:`row_from_result`). The trial statuses
(:data:`TRIAL_OK`, :data:`TRIAL_ERROR`, :data:`TRIAL_PENDING`) are not the client-round
statuses of :mod:`dplora_ray.results`.

No Ray: the Tune adapter (:mod:`dplora_ray.tune`) and analysis code share this module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dplora_ray import results as R
from dplora_ray.fileio import write_atomic
from dplora_ray.outputs import finished_summary
from dplora_ray.sweeps.spec import TrialSpec, config_value, format_value

__all__ = [
    "BYTES_DOWN",
    "BYTES_UP",
    "CONTEXT_KEYS",
    "DELTA",
    "EPSILON",
    "ERROR",
    "EVAL_ACCURACY",
    "EVAL_ACCURACY_BEFORE",
    "EVAL_F1_MACRO",
    "EVAL_F1_WEIGHTED",
    "NOISE_MULTIPLIER",
    "ROUNDS_COMPLETED",
    "ROUNDS_PLANNED",
    "STATUS",
    "STOP_REASON",
    "SUMMARY_COLUMNS",
    "SWEEP_COLUMNS",
    "SWEEP_FILE",
    "SWEEP_SCHEMA",
    "SweepTrialError",
    "TRAINABLE_PARAMETERS",
    "TRIAL",
    "TRIAL_DIR",
    "TRIAL_ERROR",
    "TRIAL_OK",
    "TRIAL_PENDING",
    "WALL_SECONDS",
    "base_row",
    "error_text",
    "finished_summary",
    "read_sweep",
    "row_from_result",
    "row_from_summary",
    "sweep_table",
    "write_sweep",
]

# ---------------------------------------------------------------- sweep.parquet schema
SWEEP_FILE = "sweep.parquet"
TRIAL = "trial"
STATUS = R.STATUS
ERROR = "error"
EVAL_ACCURACY = R.EVAL_ACCURACY
EVAL_F1_MACRO = R.EVAL_F1_MACRO
EVAL_F1_WEIGHTED = R.EVAL_F1_WEIGHTED
EVAL_ACCURACY_BEFORE = "eval_accuracy_before"
EPSILON = R.EPSILON
DELTA = "delta"
NOISE_MULTIPLIER = R.NOISE_MULTIPLIER
BYTES_UP = R.BYTES_UP  # total over the run (summary.json: bytes_up_total)
BYTES_DOWN = R.BYTES_DOWN  # total over the run (summary.json: bytes_down_total)
ROUNDS_COMPLETED = "rounds_completed"
ROUNDS_PLANNED = "rounds_planned"
STOP_REASON = "stop_reason"
TRAINABLE_PARAMETERS = "trainable_parameters"
WALL_SECONDS = "wall_seconds"
TRIAL_DIR = "trial_dir"

# a trial's status (the STATUS column)
TRIAL_OK = "ok"
TRIAL_ERROR = "error"
TRIAL_PENDING = "pending"  # not run (yet): the sweep was interrupted

SWEEP_SCHEMA = pa.schema(
    [
        (TRIAL, pa.string()),
        (STATUS, pa.string()),
        (ERROR, pa.string()),
        (EVAL_ACCURACY, pa.float64()),
        (EVAL_F1_MACRO, pa.float64()),
        (EVAL_F1_WEIGHTED, pa.float64()),
        (EVAL_ACCURACY_BEFORE, pa.float64()),
        # generation tasks (null otherwise)
        (R.EVAL_PERPLEXITY, pa.float64()),
        (R.EVAL_ROUGE_L, pa.float64()),
        ("eval_perplexity_before", pa.float64()),
        ("eval_rouge_l_before", pa.float64()),
        ("eval_loss", pa.float64()),
        (EPSILON, pa.float64()),
        (DELTA, pa.float64()),
        (NOISE_MULTIPLIER, pa.float64()),
        # true: the trial's noise came from privacy.noise_seed (public, not private)
        ("noise_reproducible", pa.bool_()),
        (BYTES_UP, pa.int64()),
        (BYTES_DOWN, pa.int64()),
        (ROUNDS_COMPLETED, pa.int64()),
        (ROUNDS_PLANNED, pa.int64()),
        (STOP_REASON, pa.string()),
        (TRAINABLE_PARAMETERS, pa.int64()),
        (WALL_SECONDS, pa.float64()),
        (TRIAL_DIR, pa.string()),
        # the empirical privacy audit (null when audit.enabled is false)
        (R.AUDIT_PASSED, pa.bool_()),
        *((k, pa.float64()) for k in R.AUDIT_SUMMARY_KEYS if k != R.AUDIT_PASSED),
    ]
)
SWEEP_COLUMNS: tuple[str, ...] = tuple(SWEEP_SCHEMA.names)

# Config keys recorded for every trial (swept or not), so analysis can group by them.
CONTEXT_KEYS: tuple[str, ...] = (
    "privacy.mode",
    "privacy.target_epsilon",
    "lora.r",
    "federation.num_clients",
    "model.name",
)
_CONTEXT_TYPES = {
    "privacy.mode": pa.string(),
    "privacy.target_epsilon": pa.float64(),
    "lora.r": pa.int64(),
    "federation.num_clients": pa.int64(),
    "model.name": pa.string(),
}

# summary.json key -> sweep column (every metric column of SWEEP_SCHEMA comes from one)
SUMMARY_COLUMNS: dict[str, str] = {
    "eval_accuracy": EVAL_ACCURACY,
    "eval_f1_macro": EVAL_F1_MACRO,
    "eval_f1_weighted": EVAL_F1_WEIGHTED,
    "eval_accuracy_before": EVAL_ACCURACY_BEFORE,
    "eval_perplexity": R.EVAL_PERPLEXITY,
    "eval_rouge_l": R.EVAL_ROUGE_L,
    "eval_perplexity_before": "eval_perplexity_before",
    "eval_rouge_l_before": "eval_rouge_l_before",
    "eval_loss": "eval_loss",
    "epsilon": EPSILON,
    "delta": DELTA,
    "noise_multiplier": NOISE_MULTIPLIER,
    "noise_reproducible": "noise_reproducible",
    "bytes_up_total": BYTES_UP,
    "bytes_down_total": BYTES_DOWN,
    "rounds_completed": ROUNDS_COMPLETED,
    "rounds_planned": ROUNDS_PLANNED,
    "stop_reason": STOP_REASON,
    "trainable_parameters": TRAINABLE_PARAMETERS,
    "wall_seconds": WALL_SECONDS,
    **{k: k for k in R.AUDIT_SUMMARY_KEYS},
}


# ---------------------------------------------------------------- rows
def base_row(trial: TrialSpec, trial_dir: Path) -> dict[str, Any]:
    """A trial's row before it ran: its name, folder, swept and context keys; pending."""
    row: dict[str, Any] = {c: None for c in SWEEP_COLUMNS}
    row[TRIAL] = trial.name
    row[STATUS] = TRIAL_PENDING
    row[TRIAL_DIR] = str(trial_dir)
    for key in list(trial.params) + [k for k in CONTEXT_KEYS if k not in trial.params]:
        row[key] = config_value(trial.config, key)  # the config's type (2 -> 2.0 for floats)
    return row


def row_from_summary(base: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """A finished trial's row: ``base`` (trial, keys, trial_dir) plus the metrics of its
    ``summary.json``."""
    row = dict(base)
    for k, col in SUMMARY_COLUMNS.items():
        v = summary.get(k)
        row[col] = None if isinstance(v, str) and col != STOP_REASON else v
    row[STATUS] = TRIAL_OK
    row[ERROR] = None
    return row


def _column_type(values: Sequence[Any]) -> pa.DataType:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.int64()
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.float64()
    return pa.string()


def sweep_table(rows: Sequence[Mapping[str, Any]], swept: Sequence[str]) -> pa.Table:
    """The sweep table: :data:`SWEEP_COLUMNS`, then the swept keys and :data:`CONTEXT_KEYS`
    (dotted names; each swept key in file order)."""
    fields = list(SWEEP_SCHEMA)
    extra = list(swept) + [k for k in CONTEXT_KEYS if k not in swept]
    cols: dict[str, list[Any]] = {}
    for f in SWEEP_SCHEMA:
        vals = [row.get(f.name) for row in rows]
        if pa.types.is_floating(f.type):
            vals = [None if v is None else float(v) for v in vals]
        elif pa.types.is_integer(f.type):
            vals = [None if v is None else int(v) for v in vals]
        cols[f.name] = vals
    for key in extra:
        vals = [row.get(key) for row in rows]
        tp = _CONTEXT_TYPES.get(key) or _column_type(vals)
        if pa.types.is_string(tp):
            vals = [
                None if v is None else (v if isinstance(v, str) else format_value(v)) for v in vals
            ]
        elif pa.types.is_floating(tp):
            vals = [None if v is None else float(v) for v in vals]
        fields.append(pa.field(key, tp))
        cols[key] = vals
    # order: trial, swept + context keys, then the rest of the schema
    order = [TRIAL] + extra + [c for c in SWEEP_COLUMNS if c != TRIAL]
    schema = pa.schema([next(f for f in fields if f.name == n) for n in order])
    return pa.table({n: cols[n] for n in order}, schema=schema)


def write_sweep(rows: Sequence[Mapping[str, Any]], swept: Sequence[str], out: Path) -> None:
    """Write ``out/sweep.parquet`` (atomically: whole or not at all)."""
    table = sweep_table(rows, swept)
    write_atomic(out / SWEEP_FILE, lambda fh: pq.write_table(table, fh))


def read_sweep(out_dir: str | Path) -> pd.DataFrame:
    """``DIR/sweep.parquet`` as a DataFrame (one row per trial)."""
    return pd.read_parquet(Path(out_dir) / SWEEP_FILE)


# ---------------------------------------------------------------- trial outcomes
class SweepTrialError(RuntimeError):
    """A trial's experiment failed; the message is one line (``Type: message``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):
        return (type(self), (self.message,))


def error_text(err: BaseException | None) -> str:
    """The one-line message of a failed trial (unwrapping Ray's and Tune's wrappers)."""
    if err is None:
        return "unknown error"
    seen = set()
    e: Any = err
    while e is not None and id(e) not in seen:  # unwrap RayTaskError / TuneError
        seen.add(id(e))
        if isinstance(e, SweepTrialError):
            return e.message
        e = getattr(e, "cause", None) or e.__cause__
    text = str(err)
    for line in reversed(text.strip().splitlines()):
        m = re.search(r"SweepTrialError: (.*)$", line)
        if m:
            return m.group(1).strip()
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def row_from_result(
    base: Mapping[str, Any], metrics: Mapping[str, Any] | None, error: BaseException | None
) -> dict[str, Any]:
    """ok (the trial reported its summary), error (it raised), else still pending (it was
    running or waiting when the sweep was interrupted)."""
    if error is None and metrics and "summary_json" in metrics:
        return row_from_summary(base, json.loads(metrics["summary_json"]))
    row = dict(base)
    if error is not None:
        row[STATUS] = TRIAL_ERROR
        row[ERROR] = error_text(error)
    return row
