"""Privacy-utility and communication tables, and accuracy-vs-round curves.

All functions take :class:`~analysis.loading.Results` (or its frames) and return new
DataFrames; inputs are not modified. Only finished trials (status ``ok``) count. Means are
taken over every trial that shares the grouping keys (other swept keys, seeds).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from analysis.loading import Results
from analysis.params import FULL_FT_BYTES_PER_PARAMETER, base_model_parameters
from dplora_ray import results as R
from dplora_ray import tune as S

__all__ = [
    "ACCURACY_MAX",
    "ACCURACY_MEAN",
    "ACCURACY_MIN",
    "ACCURACY_STD",
    "BASE_PARAMETERS",
    "CLIENTS",
    "CLIENT_ROUNDS",
    "EPSILON_MEAN",
    "EPSILON_TARGET",
    "F1_MEAN",
    "FULL_FT_BYTES_PER_CLIENT_ROUND",
    "LORA_BYTES_DOWN_PER_CLIENT_ROUND",
    "LORA_BYTES_UP_PER_CLIENT_ROUND",
    "LORA_BYTES_UP_PER_ROUND",
    "LORA_FRACTION",
    "LORA_PARAMETERS",
    "MODEL",
    "NUM_TRIALS",
    "RANK",
    "ROUND",
    "accuracy_curves",
    "communication_table",
    "privacy_utility_pivot",
    "privacy_utility_table",
]

# dotted config keys the tables group by (columns of the trials table)
EPSILON_TARGET = "privacy.target_epsilon"
RANK = "lora.r"
CLIENTS = "federation.num_clients"
MODEL = "model.name"
ROUND = R.SERVER_ROUND

# privacy_utility_table
NUM_TRIALS = "num_trials"
ACCURACY_MEAN = "accuracy_mean"
ACCURACY_STD = "accuracy_std"
ACCURACY_MIN = "accuracy_min"
ACCURACY_MAX = "accuracy_max"
F1_MEAN = "f1_macro_mean"
EPSILON_MEAN = "epsilon_spent_mean"
ROUGE_L_MEAN = "rouge_l_mean"  # generation tasks (NaN otherwise)
PERPLEXITY_MEAN = "perplexity_mean"

# communication_table
LORA_PARAMETERS = "lora_parameters"
BASE_PARAMETERS = "base_parameters"
CLIENT_ROUNDS = "client_rounds"
LORA_BYTES_UP_PER_ROUND = "lora_bytes_up_per_round"
LORA_BYTES_UP_PER_CLIENT_ROUND = "lora_bytes_up_per_client_round"
LORA_BYTES_DOWN_PER_CLIENT_ROUND = "lora_bytes_down_per_client_round"
FULL_FT_BYTES_PER_CLIENT_ROUND = "full_ft_bytes_per_client_round"
LORA_FRACTION = "lora_fraction_of_full_ft"


def privacy_utility_table(
    trials: pd.DataFrame, by: Sequence[str] = (EPSILON_TARGET, RANK)
) -> pd.DataFrame:
    """Accuracy by ``by`` (default: target epsilon x LoRA rank), over finished trials.

    Columns: ``by``, ``num_trials``, accuracy mean/std/min/max, macro-F1 mean, the
    epsilon actually spent (mean; NaN for non-private trials), and for generation tasks
    ROUGE-L and perplexity means (NaN otherwise). Target epsilon ``inf``
    (no privacy) sorts last.
    """
    ok = trials[trials[S.STATUS] == S.STATUS_OK]
    by = [k for k in by if k in ok.columns]
    cols = [
        *by,
        NUM_TRIALS,
        ACCURACY_MEAN,
        ACCURACY_STD,
        ACCURACY_MIN,
        ACCURACY_MAX,
        F1_MEAN,
        EPSILON_MEAN,
        ROUGE_L_MEAN,
        PERPLEXITY_MEAN,
    ]
    if ok.empty:
        return pd.DataFrame(columns=cols)
    g = ok.groupby(by, dropna=False, sort=True) if by else ok.groupby(lambda _: 0)
    out = pd.DataFrame(
        {
            NUM_TRIALS: g[S.EVAL_ACCURACY].size(),
            ACCURACY_MEAN: g[S.EVAL_ACCURACY].mean(),
            ACCURACY_STD: g[S.EVAL_ACCURACY].std(ddof=0),
            ACCURACY_MIN: g[S.EVAL_ACCURACY].min(),
            ACCURACY_MAX: g[S.EVAL_ACCURACY].max(),
            F1_MEAN: g[S.EVAL_F1_MACRO].mean(),
            EPSILON_MEAN: g[S.EPSILON].mean(),
            ROUGE_L_MEAN: (g[R.EVAL_ROUGE_L].mean() if R.EVAL_ROUGE_L in ok
                           else g[S.EVAL_ACCURACY].mean() * math.nan),
            PERPLEXITY_MEAN: (g[R.EVAL_PERPLEXITY].mean() if R.EVAL_PERPLEXITY in ok
                              else g[S.EVAL_ACCURACY].mean() * math.nan),
        }
    )
    out = out.reset_index() if by else out.reset_index(drop=True)
    return out[cols]


def privacy_utility_pivot(
    trials: pd.DataFrame, index: str = EPSILON_TARGET, columns: str = RANK
) -> pd.DataFrame:
    """Mean accuracy, ``index`` down (default target epsilon) x ``columns`` across
    (default LoRA rank)."""
    table = privacy_utility_table(trials, by=(index, columns))
    if table.empty or index not in table or columns not in table:
        return pd.DataFrame()
    return table.pivot(index=index, columns=columns, values=ACCURACY_MEAN).sort_index()


def communication_table(
    results: Results, parameters: Callable[[str], int | None] = base_model_parameters
) -> pd.DataFrame:
    """Bytes per round by model and LoRA rank, against full fine-tuning of the same model.

    A client-round is one client's participation in one round. LoRA bytes come from the
    measured transfers (``clients.parquet`` where readable, else the sweep totals over
    ``trainable_parameters``); full fine-tuning sends ``base parameters x 4`` bytes
    (float32) per client-round and direction.

    Args:
        results: loaded results.
        parameters: model name -> base-model parameter count (None: unknown).
    """
    ok = results.ok
    cols = [
        MODEL,
        RANK,
        LORA_PARAMETERS,
        BASE_PARAMETERS,
        CLIENT_ROUNDS,
        LORA_BYTES_UP_PER_ROUND,
        LORA_BYTES_UP_PER_CLIENT_ROUND,
        LORA_BYTES_DOWN_PER_CLIENT_ROUND,
        FULL_FT_BYTES_PER_CLIENT_ROUND,
        LORA_FRACTION,
    ]
    if ok.empty:
        return pd.DataFrame(columns=cols)
    clients = results.clients
    per_trial = []
    for _, row in ok.iterrows():
        c = clients[clients[S.TRIAL] == row[S.TRIAL]] if not clients.empty else clients
        if len(c):
            done = c[c[R.STATUS] == "ok"] if R.STATUS in c else c
            n = len(done)
            up = float(done[R.BYTES_UP].sum()) / n if n else math.nan
            down = float(done[R.BYTES_DOWN].mean()) if n else math.nan
        else:  # folder not readable here: the sweep table's totals
            n, up, down = 0, math.nan, math.nan
        rounds = row[S.ROUNDS_COMPLETED] or 0
        per_trial.append(
            {
                MODEL: row[MODEL],
                RANK: row[RANK],
                LORA_PARAMETERS: row[S.TRAINABLE_PARAMETERS],
                CLIENT_ROUNDS: n,
                LORA_BYTES_UP_PER_ROUND: row[S.BYTES_UP] / rounds if rounds else math.nan,
                LORA_BYTES_UP_PER_CLIENT_ROUND: up,
                LORA_BYTES_DOWN_PER_CLIENT_ROUND: down,
            }
        )
    df = pd.DataFrame(per_trial)
    g = df.groupby([MODEL, RANK], sort=True)
    out = pd.DataFrame(
        {
            LORA_PARAMETERS: g[LORA_PARAMETERS].max(),
            CLIENT_ROUNDS: g[CLIENT_ROUNDS].sum(),
            LORA_BYTES_UP_PER_ROUND: g[LORA_BYTES_UP_PER_ROUND].mean(),
            LORA_BYTES_UP_PER_CLIENT_ROUND: g[LORA_BYTES_UP_PER_CLIENT_ROUND].mean(),
            LORA_BYTES_DOWN_PER_CLIENT_ROUND: g[LORA_BYTES_DOWN_PER_CLIENT_ROUND].mean(),
        }
    ).reset_index()
    base = {m: parameters(str(m)) for m in out[MODEL].unique()}
    out[BASE_PARAMETERS] = [base[m] if base[m] is not None else np.nan for m in out[MODEL]]
    out[FULL_FT_BYTES_PER_CLIENT_ROUND] = out[BASE_PARAMETERS] * FULL_FT_BYTES_PER_PARAMETER
    out[LORA_FRACTION] = out[LORA_BYTES_UP_PER_CLIENT_ROUND] / out[FULL_FT_BYTES_PER_CLIENT_ROUND]
    return out[cols]


def accuracy_curves(results: Results) -> pd.DataFrame:
    """Accuracy, macro-F1 and epsilon spent after each evaluated round, per trial.

    Round 0 is the untrained adapter (``eval_accuracy_before``, epsilon 0). Rounds that
    were not evaluated (``federation.eval_every``) are left out. Columns: ``trial``,
    ``server_round``, ``eval_accuracy``, ``eval_f1_macro``, ``epsilon`` and the key
    columns of the trials table.
    """
    from analysis.loading import key_columns

    keys = key_columns(results.trials)
    cols = [S.TRIAL, ROUND, S.EVAL_ACCURACY, S.EVAL_F1_MACRO, S.EPSILON, *keys]
    parts = []
    rounds = results.rounds
    for _, row in results.ok.iterrows():
        r = rounds[rounds[S.TRIAL] == row[S.TRIAL]]
        if r.empty:
            continue
        start = {
            S.TRIAL: row[S.TRIAL],
            ROUND: 0,
            S.EVAL_ACCURACY: row[S.EVAL_ACCURACY_BEFORE],
            S.EVAL_F1_MACRO: np.nan,
            S.EPSILON: 0.0 if pd.notna(row[S.EPSILON]) else np.nan,
            **{k: row[k] for k in keys},
        }
        ev = r[r[R.EVAL_ACCURACY].notna()][
            [S.TRIAL, ROUND, R.EVAL_ACCURACY, R.EVAL_F1_MACRO, R.EPSILON, *keys]
        ]
        parts.append(pd.concat([pd.DataFrame([start]), ev], ignore_index=True))
    if not parts:
        return pd.DataFrame(columns=cols)
    return pd.concat(parts, ignore_index=True)[cols]


def markdown_table(
    df: pd.DataFrame, formats: Mapping[str, str] | None = None, index: bool = False
) -> str:
    """A GitHub-flavoured Markdown table (``inf`` target epsilon shown as ``inf (no DP)``)."""
    formats = dict(formats or {})
    if index:
        df = df.reset_index()
    header = [str(c) for c in df.columns]

    def cell(col: str, v: object) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float) and math.isinf(v):
            return "inf (no DP)" if col == EPSILON_TARGET else "inf"
        if col in formats:
            try:
                return format(v, formats[col])
            except (TypeError, ValueError):
                return str(v)
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rec in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(c, v) for c, v in zip(df.columns, rec)) + " |")
    return "\n".join(lines)
