"""Result files and every schema they follow, defined once.

A run folder holds ``config.yaml`` (resolved), ``rounds.parquet`` (one row per server
round), ``clients.parquet`` (one row per client-round), ``summary.json`` (a
:class:`Summary`), ``ledger.json`` (privacy) and ``adapter/`` (PEFT format). Column
names, the client-round statuses, the evaluation record (:class:`EvalResult`) and the
summary's keys are defined here; the runner and the sweeps write through this module and
analysis code reads through it (the sweep table's schema is in
:mod:`dplora_ray.sweeps.table`, built from these names).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dplora_ray.fileio import write_atomic
from dplora_ray.fileio import write_json_atomic as _write_json

__all__ = [
    "ACCEPTED_STATUSES",
    "AUDIT_ROUND_COLUMNS",
    "AUDIT_SUMMARY_KEYS",
    "CLIENT_COLUMNS",
    "CLIENT_STATUSES",
    "EvalResult",
    "ROUND_COLUMNS",
    "SUMMARY_KEYS",
    "Summary",
    "eval_summary_fields",
    "load_run",
    "write_clients",
    "write_json_atomic",
    "write_rounds",
    "write_summary",
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

# clients.parquet: the status of a client-round
STATUS_OK = "ok"  # its update was aggregated
STATUS_NONFINITE = "rejected_nonfinite"  # non-finite update: not sent, still charged
STATUS_SKIPPED_IRRELEVANT = "skipped_irrelevant"  # CMFL: not uploaded (not an error)
STATUS_FAILED_RETRIED = "failed_retried"  # its worker died; re-run, same RNG, aggregated
STATUS_DROPPED_FAILURE = "dropped_failure"  # its worker died; aggregated without it
STATUS_DROPPED_TIMEOUT = "dropped_timeout"  # not back within runtime.round_timeout_s
STATUS_FAILED = "failed"  # its worker died under on_client_failure=fail: the run ended
STATUS_ABORTED = "aborted"  # in the round that ended the run; not aggregated
CLIENT_STATUSES: tuple[str, ...] = (
    STATUS_OK, STATUS_FAILED_RETRIED, STATUS_NONFINITE, STATUS_DROPPED_FAILURE,
    STATUS_DROPPED_TIMEOUT, STATUS_FAILED, STATUS_ABORTED, STATUS_SKIPPED_IRRELEVANT)
#: statuses whose update was aggregated
ACCEPTED_STATUSES: tuple[str, ...] = (STATUS_OK, STATUS_FAILED_RETRIED)

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



# =========================================================================== evaluation
@dataclass(frozen=True)
class EvalResult:
    """One evaluation of the global adapter on the test split; what a task type does not
    measure is NaN (classification and multiple choice: no perplexity or ROUGE-L;
    generation: no accuracy or F1)."""

    loss: float = math.nan
    accuracy: float = math.nan
    f1_macro: float = math.nan
    f1_weighted: float = math.nan
    perplexity: float = math.nan
    rouge_l: float = math.nan

    def describe(self) -> str:
        if math.isnan(self.accuracy):  # generation
            return (f"perplexity {self.perplexity:.3f}, ROUGE-L {self.rouge_l:.4f}, "
                    f"loss {self.loss:.4f}")
        return (f"accuracy {self.accuracy:.4f}, macro-F1 {self.f1_macro:.4f}, "
                f"weighted F1 {self.f1_weighted:.4f}, loss {self.loss:.4f}")

    def round_columns(self) -> dict[str, float]:
        """The ``eval_*`` columns of ``rounds.parquet``."""
        return {EVAL_LOSS: self.loss, EVAL_ACCURACY: self.accuracy,
                EVAL_F1_MACRO: self.f1_macro, EVAL_F1_WEIGHTED: self.f1_weighted,
                EVAL_PERPLEXITY: self.perplexity, EVAL_ROUGE_L: self.rouge_l}

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> EvalResult:
        return cls(**{f.name: (math.nan if raw.get(f.name) is None else float(raw[f.name]))
                      for f in dataclasses.fields(cls)})


# =========================================================================== summary
@dataclass
class Summary:
    """``summary.json``: one run at a glance (``None`` where a key does not apply, e.g.
    the privacy keys of a non-private run). The audit keys (:data:`AUDIT_SUMMARY_KEYS`)
    follow, null unless ``audit.enabled``."""

    eval_accuracy_before: float | None
    eval_f1_macro_before: float | None
    eval_f1_weighted_before: float | None
    eval_loss_before: float | None
    eval_accuracy: float | None
    eval_f1_macro: float | None
    eval_f1_weighted: float | None
    eval_loss: float | None
    eval_perplexity_before: float | None
    eval_perplexity: float | None
    eval_rouge_l_before: float | None
    eval_rouge_l: float | None
    task_type: str
    epsilon: float | None
    delta: float | None
    noise_multiplier: float | None
    effective_noise_multiplier: float | None
    planned_epsilon: float | None
    privacy_mode: str
    privacy_unit: str
    accountant: str | None
    #: true: the noise is a public function of privacy.noise_seed (not private against
    #: anyone who knows it); false: a secret key from the OS; null without privacy
    noise_reproducible: bool | None
    rounds_completed: int
    rounds_planned: int
    stop_reason: str
    bytes_up_total: int
    bytes_down_total: int
    wall_seconds: float
    trainable_parameters: int
    model: str
    num_train_examples: int
    num_test_examples: int
    clients_not_aggregated: int
    resumed_from_round: int | None
    output_dir: str
    audit: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "audit"}
        out.update(self.audit or dict.fromkeys(AUDIT_SUMMARY_KEYS))
        return out


def eval_summary_fields(before: EvalResult | None, last: EvalResult | None
                        ) -> dict[str, float | None]:
    """The ``eval_*`` keys of :class:`Summary` (NaN -> None)."""
    def val(ev: EvalResult | None, name: str) -> float | None:
        x = getattr(ev, name) if ev is not None else None
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else x

    out: dict[str, float | None] = {}
    for name in ("accuracy", "f1_macro", "f1_weighted", "loss", "perplexity", "rouge_l"):
        out[f"eval_{name}_before"] = val(before, name)
        out[f"eval_{name}"] = val(last, name)
    return out


#: every key of summary.json
SUMMARY_KEYS: tuple[str, ...] = (
    *(f.name for f in dataclasses.fields(Summary) if f.name != "audit"),
    *AUDIT_SUMMARY_KEYS)


def _table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    cols = {name: [row.get(name) for row in rows] for name in schema.names}
    for name in schema.names:  # NaN stands for "not measured" in float columns
        if pa.types.is_floating(schema.field(name).type):
            cols[name] = [None if v is None or (isinstance(v, float) and math.isnan(v))
                          else float(v) for v in cols[name]]
    return pa.table(cols, schema=schema)


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    write_atomic(path, lambda fh: pq.write_table(table, fh))


def write_rounds(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    _write_parquet_atomic(_table(rows, ROUND_SCHEMA), Path(path))


def write_clients(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    _write_parquet_atomic(_table(rows, CLIENT_SCHEMA), Path(path))


def write_json_atomic(obj: Any, path: str | Path) -> None:
    _write_json(obj, path)


def write_summary(summary: Summary, path: str | Path) -> dict[str, Any]:
    out = summary.to_dict()
    _write_json(out, path)
    return out


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Load one run folder: ``{"rounds": DataFrame, "clients": DataFrame, "summary": dict}``."""
    d = Path(run_dir)
    return {
        "rounds": pd.read_parquet(d / "rounds.parquet"),
        "clients": pd.read_parquet(d / "clients.parquet"),
        "summary": json.loads((d / "summary.json").read_text()),
    }
