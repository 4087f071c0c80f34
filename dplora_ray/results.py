"""Result files and their fixed column schema.

A run folder holds ``config.yaml`` (resolved), ``rounds.parquet`` (one row per server
round), ``clients.parquet`` (one row per client-round), ``summary.json``, ``ledger.json``
(privacy) and ``adapter/`` (PEFT format). Column names are defined here once; analysis
code builds on them and nothing else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "AUDIT_ROUND_COLUMNS",
    "AUDIT_SUMMARY_KEYS",
    "CLIENT_COLUMNS",
    "ROUND_COLUMNS",
    "SUMMARY_KEYS",
    "load_run",
    "write_clients",
    "write_json_atomic",
    "write_rounds",
]

# rounds.parquet
SERVER_ROUND = "server_round"
TRAIN_LOSS = "train_loss"
EVAL_LOSS = "eval_loss"
EVAL_ACCURACY = "eval_accuracy"
EVAL_F1_MACRO = "eval_f1_macro"
# support-weighted mean of per-label F1 (financial sentiment benchmarks report it)
EVAL_F1_WEIGHTED = "eval_f1_weighted"
# generation tasks (NaN otherwise): teacher-forced answer perplexity, ROUGE-L F of the
# greedy answer against the reference's first data.max_new_tokens tokens
EVAL_PERPLEXITY = "eval_perplexity"
EVAL_ROUGE_L = "eval_rouge_l"
NUM_CLIENTS_SAMPLED = "num_clients_sampled"
NUM_CLIENTS_COMPLETED = "num_clients_completed"
BYTES_UP = "bytes_up"
BYTES_DOWN = "bytes_down"
ROUND_SECONDS = "round_seconds"
EPSILON = "epsilon"
EPSILON_MEAN = "epsilon_mean"
NOISE_MULTIPLIER = "noise_multiplier"
# rounds.parquet, filled in the final round when audit.enabled (issue 8; docs/audit.md)
AUDIT_EXPOSURE_MEAN = "audit_exposure_mean"
AUDIT_EXPOSURE_MAX = "audit_exposure_max"
AUDIT_MIA_AUC = "audit_mia_auc"
AUDIT_MIA_TPR_AT_1PCT_FPR = "audit_mia_tpr_at_1pct_fpr"
AUDIT_EPSILON_LOWER_BOUND = "audit_epsilon_lower_bound"
# summary.json only
AUDIT_PASSED = "audit_passed"
AUDIT_NATURAL_MIA_AUC = "audit_natural_mia_auc"
AUDIT_EPSILON_COMPARED = "audit_epsilon_compared"
AUDIT_SECONDS = "audit_seconds"

# clients.parquet
CLIENT_ID = "client_id"
NUM_EXAMPLES = "num_examples"
UPDATE_NORM = "update_norm"
SECONDS = "seconds"
STEPS = "steps"
SAMPLING_RATE = "sampling_rate"
STATUS = "status"
WORKER = "worker"

ROUND_SCHEMA = pa.schema([
    (SERVER_ROUND, pa.int64()),
    (TRAIN_LOSS, pa.float64()),
    (EVAL_LOSS, pa.float64()),
    (EVAL_ACCURACY, pa.float64()),
    (EVAL_F1_MACRO, pa.float64()),
    (EVAL_F1_WEIGHTED, pa.float64()),
    (EVAL_PERPLEXITY, pa.float64()),
    (EVAL_ROUGE_L, pa.float64()),
    (NUM_CLIENTS_SAMPLED, pa.int64()),
    (NUM_CLIENTS_COMPLETED, pa.int64()),
    (BYTES_UP, pa.int64()),
    (BYTES_DOWN, pa.int64()),
    (ROUND_SECONDS, pa.float64()),
    (EPSILON, pa.float64()),
    (EPSILON_MEAN, pa.float64()),
    (NOISE_MULTIPLIER, pa.float64()),
    (AUDIT_EXPOSURE_MEAN, pa.float64()),
    (AUDIT_EXPOSURE_MAX, pa.float64()),
    (AUDIT_MIA_AUC, pa.float64()),
    (AUDIT_MIA_TPR_AT_1PCT_FPR, pa.float64()),
    (AUDIT_EPSILON_LOWER_BOUND, pa.float64()),
])
CLIENT_SCHEMA = pa.schema([
    (SERVER_ROUND, pa.int64()),
    (CLIENT_ID, pa.int64()),
    (WORKER, pa.int64()),
    (STATUS, pa.string()),
    (NUM_EXAMPLES, pa.int64()),
    (TRAIN_LOSS, pa.float64()),
    (UPDATE_NORM, pa.float64()),
    (BYTES_UP, pa.int64()),
    (BYTES_DOWN, pa.int64()),
    (SECONDS, pa.float64()),
    (STEPS, pa.int64()),
    (SAMPLING_RATE, pa.float64()),
    (EPSILON, pa.float64()),
])
ROUND_COLUMNS: tuple[str, ...] = tuple(ROUND_SCHEMA.names)
CLIENT_COLUMNS: tuple[str, ...] = tuple(CLIENT_SCHEMA.names)
TIMING_COLUMNS: tuple[str, ...] = (ROUND_SECONDS, SECONDS)
AUDIT_ROUND_COLUMNS: tuple[str, ...] = (
    AUDIT_EXPOSURE_MEAN, AUDIT_EXPOSURE_MAX, AUDIT_MIA_AUC, AUDIT_MIA_TPR_AT_1PCT_FPR,
    AUDIT_EPSILON_LOWER_BOUND,
)
#: in every summary.json (null when audit.enabled is false)
AUDIT_SUMMARY_KEYS: tuple[str, ...] = (
    AUDIT_PASSED, *AUDIT_ROUND_COLUMNS, AUDIT_NATURAL_MIA_AUC, AUDIT_EPSILON_COMPARED,
    AUDIT_SECONDS,
)

SUMMARY_KEYS: tuple[str, ...] = (
    "eval_accuracy_before", "eval_f1_macro_before", "eval_accuracy", "eval_f1_macro",
    "eval_f1_weighted_before", "eval_f1_weighted", "eval_perplexity_before",
    "eval_perplexity", "eval_rouge_l_before", "eval_rouge_l", "task_type",
    "epsilon", "delta", "noise_multiplier", "noise_reproducible", "privacy_mode",
    "privacy_unit",
    "rounds_completed", "rounds_planned", "stop_reason", "bytes_up_total",
    "bytes_down_total", "wall_seconds", "trainable_parameters", "model",
)


def _table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    cols = {name: [row.get(name) for row in rows] for name in schema.names}
    for name in schema.names:  # NaN stands for "not measured" in float columns
        if pa.types.is_floating(schema.field(name).type):
            cols[name] = [None if v is None or (isinstance(v, float) and math.isnan(v))
                          else float(v) for v in cols[name]]
    return pa.table(cols, schema=schema)


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def write_rounds(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    _write_parquet_atomic(_table(rows, ROUND_SCHEMA), Path(path))


def write_clients(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    _write_parquet_atomic(_table(rows, CLIENT_SCHEMA), Path(path))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _json_safe(obj.item())
    return obj


def write_json_atomic(obj: Any, path: str | Path) -> None:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(obj), indent=2) + "\n")
    tmp.replace(p)


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Load one run folder: ``{"rounds": DataFrame, "clients": DataFrame, "summary": dict}``."""
    d = Path(run_dir)
    return {
        "rounds": pd.read_parquet(d / "rounds.parquet"),
        "clients": pd.read_parquet(d / "clients.parquet"),
        "summary": json.loads((d / "summary.json").read_text()),
    }
