"""``report.md`` with its tables and PNG plots, for a sweep folder or a run folder."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis import plots as P
from analysis.loading import Results, key_columns, load_results
from analysis.params import base_model_parameters
from analysis.tables import (
    ACCURACY_MEAN,
    ACCURACY_STD,
    BASE_PARAMETERS,
    CLIENT_ROUNDS,
    CLIENTS,
    EPSILON_MEAN,
    EPSILON_TARGET,
    F1_MEAN,
    FULL_FT_BYTES_PER_CLIENT_ROUND,
    LORA_BYTES_DOWN_PER_CLIENT_ROUND,
    LORA_BYTES_UP_PER_CLIENT_ROUND,
    LORA_BYTES_UP_PER_ROUND,
    LORA_FRACTION,
    LORA_PARAMETERS,
    MODEL,
    NUM_TRIALS,
    RANK,
    communication_table,
    markdown_table,
    privacy_utility_pivot,
    privacy_utility_table,
)
from dplora_ray import results as R
from dplora_ray import tune as S
from dplora_ray.fileio import write_text_atomic

__all__ = ["REPORT_FILE", "Report", "write_report"]

REPORT_FILE = "report.md"
PLOTS_DIR = "plots"


@dataclass
class Report:
    """What :func:`write_report` wrote."""

    path: Path
    plots: list[Path] = field(default_factory=list)
    results: Results | None = None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def _img(path: Path, root: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(root).as_posix()})"


def _comm_section(comm: pd.DataFrame) -> list[str]:
    if comm.empty:
        return ["No finished trials."]
    show = comm.copy()
    show[LORA_FRACTION] = show[LORA_FRACTION] * 100
    show = show.rename(columns={LORA_FRACTION: "lora_%_of_full_ft"})
    fmt = {
        LORA_PARAMETERS: ",.0f",
        BASE_PARAMETERS: ",.0f",
        CLIENT_ROUNDS: ",.0f",
        LORA_BYTES_UP_PER_ROUND: ",.0f",
        LORA_BYTES_UP_PER_CLIENT_ROUND: ",.0f",
        LORA_BYTES_DOWN_PER_CLIENT_ROUND: ",.0f",
        FULL_FT_BYTES_PER_CLIENT_ROUND: ",.0f",
        "lora_%_of_full_ft": ".4f",
    }
    lines = [markdown_table(show, fmt), ""]
    lines.append(
        "A client-round is one client taking part in one round. LoRA bytes are the measured "
        "transfers of the adapter tensors (`clients.parquet`); full fine-tuning would send "
        "every base-model parameter as float32 (4 bytes) each way, each client-round "
        "(parameter count from the model config on PyTorch's meta device; tied embeddings "
        "counted once). The same ratio holds for the download."
    )
    if comm[BASE_PARAMETERS].isna().any():
        lines.append(
            "\nThe base model's config was not available here for some models: no "
            "full fine-tuning baseline for them."
        )
    return lines


_AUDIT_FORMATS = {
    S.EPSILON: ".3f",
    R.AUDIT_EXPOSURE_MEAN: ".2f",
    R.AUDIT_EXPOSURE_MAX: ".2f",
    R.AUDIT_MIA_AUC: ".3f",
    R.AUDIT_MIA_TPR_AT_1PCT_FPR: ".3f",
    R.AUDIT_EPSILON_LOWER_BOUND: ".3f",
}


def _audit_section(res: Results, plots: dict[str, Path | None], root: Path) -> list[str]:
    """``## Empirical privacy audit``: one row per audited trial (nothing when no trial
    was audited)."""
    audited = P.audited(res.trials)
    if audited.empty:
        return []
    cols = [S.TRIAL] if res.kind == "sweep" else []
    cols += [c for c in (EPSILON_TARGET, S.EPSILON) if c in audited.columns]
    cols += [
        R.AUDIT_EXPOSURE_MEAN,
        R.AUDIT_EXPOSURE_MAX,
        R.AUDIT_MIA_AUC,
        R.AUDIT_MIA_TPR_AT_1PCT_FPR,
        R.AUDIT_EPSILON_LOWER_BOUND,
        R.AUDIT_PASSED,
    ]
    table = audited[[c for c in cols if c in audited.columns]]
    if EPSILON_TARGET in table.columns:
        table = table.sort_values([EPSILON_TARGET], kind="stable")
    lines = [
        "## Empirical privacy audit",
        "",
        "Measured leakage of the final adapter (docs/audit.md): exposure of the planted "
        "secret canaries (bits), the calibrated membership-inference ROC AUC and its TPR at "
        "1% FPR, and the empirical epsilon lower bound, which must stay below the "
        "accountant's `epsilon` (`audit_passed`).",
        "",
        markdown_table(table, _AUDIT_FORMATS),
        "",
    ]
    if plots.get("leakage_vs_epsilon"):
        lines += [_img(plots["leakage_vs_epsilon"], root, "leakage vs epsilon"), ""]
    return lines


def _trials_section(res: Results) -> list[str]:
    t = res.trials
    keys = list(res.swept) or key_columns(t)
    cols = [
        S.TRIAL,
        *keys,
        S.STATUS,
        S.EVAL_ACCURACY,
        S.EVAL_F1_MACRO,
        S.EPSILON,
        S.NOISE_MULTIPLIER,
        S.ROUNDS_COMPLETED,
        S.STOP_REASON,
        S.WALL_SECONDS,
        S.ERROR,
    ]
    cols = [c for c in cols if c in t.columns]
    fmt = {
        S.EVAL_ACCURACY: ".4f",
        S.EVAL_F1_MACRO: ".4f",
        S.EPSILON: ".3f",
        S.NOISE_MULTIPLIER: ".4g",
        S.WALL_SECONDS: ".1f",
        S.ROUNDS_COMPLETED: ".0f",
    }
    return [markdown_table(t[cols], fmt)]


def _sweep_body(
    res: Results,
    plots: dict[str, Path | None],
    root: Path,
    tables: dict[str, pd.DataFrame],
    comm: pd.DataFrame,
) -> list[str]:
    t = res.trials
    counts = t[S.STATUS].value_counts().to_dict()
    lines = [
        f"Sweep folder `{res.path}`: {len(t)} trial(s), "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + "."
    ]
    if res.swept:
        lines.append("Swept keys: " + ", ".join(f"`{k}`" for k in res.swept) + ".")
    lines.append("Target epsilon `inf` means no differential privacy (`privacy.mode=none`).")
    if res.missing:
        lines.append(
            f"\n{len(res.missing)} finished trial folder(s) are not readable here "
            "(a cluster run without a shared filesystem?): their per-round curves "
            "are missing: " + ", ".join(res.missing[:10]) + "."
        )
    errors = t[t[S.STATUS] == S.STATUS_ERROR]
    if len(errors):
        lines += ["", "### Failed trials", ""]
        lines += [f"- `{r[S.TRIAL]}`: {r[S.ERROR]}" for _, r in errors.iterrows()]

    lines += ["", "## Privacy-utility", ""]
    pivot = privacy_utility_pivot(t)
    if not pivot.empty:
        tables["privacy_utility_pivot"] = pivot
        show = pivot.copy()
        show.columns = [f"r={c}" for c in show.columns]
        lines += [
            "Mean test accuracy by target epsilon (rows) and LoRA rank (columns), over "
            "the other swept keys:",
            "",
            markdown_table(show, {c: ".4f" for c in show.columns}, index=True),
            "",
        ]
    by = [k for k in (EPSILON_TARGET, RANK, CLIENTS) if k in t.columns and t[k].nunique() > 1]
    long = privacy_utility_table(t, by=by or (EPSILON_TARGET,))
    tables["privacy_utility"] = long
    lines += [
        "Per group (epsilon spent: what the ledger charged, mean over the group):",
        "",
        markdown_table(
            long,
            {
                ACCURACY_MEAN: ".4f",
                ACCURACY_STD: ".4f",
                "accuracy_min": ".4f",
                "accuracy_max": ".4f",
                F1_MEAN: ".4f",
                EPSILON_MEAN: ".3f",
                NUM_TRIALS: "d",
            },
        ),
        "",
    ]
    for key, alt in (
        ("accuracy_vs_epsilon", "accuracy vs epsilon"),
        ("accuracy_vs_clients", "accuracy vs number of clients"),
    ):
        if plots.get(key):
            lines += [_img(plots[key], root, alt), ""]

    lines += ["## Communication", ""] + _comm_section(comm) + [""]
    if plots.get("communication"):
        lines += [_img(plots["communication"], root, "communication"), ""]

    lines += _audit_section(res, plots, root)
    lines += ["## Training curves", ""]
    for key, alt in (
        ("accuracy_vs_round", "accuracy vs round"),
        ("epsilon_vs_round", "epsilon vs round"),
    ):
        if plots.get(key):
            lines += [_img(plots[key], root, alt), ""]
    lines += ["## Trials", ""] + _trials_section(res)
    return lines


def _run_body(
    res: Results, plots: dict[str, Path | None], root: Path, comm: pd.DataFrame
) -> list[str]:
    row = res.trials.iloc[0]

    def num(v: object, spec: str) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    private = row["privacy.mode"] != "none"
    lines = [
        f"Run folder `{res.path}`: model `{row[MODEL]}`, LoRA rank {row[RANK]}, "
        f"{row[CLIENTS]} clients, privacy mode `{row['privacy.mode']}`.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| test accuracy before training | {num(row[S.EVAL_ACCURACY_BEFORE], '.4f')} |",
        f"| test accuracy after training | {num(row[S.EVAL_ACCURACY], '.4f')} |",
        f"| test macro-F1 after training | {num(row[S.EVAL_F1_MACRO], '.4f')} |",
        f"| epsilon spent | {num(row[S.EPSILON], '.3f') if private else 'no DP'} |",
        f"| delta | {num(row[S.DELTA], 'g') if private else ''} |",
        f"| noise multiplier | {num(row[S.NOISE_MULTIPLIER], '.4g') if private else ''} |",
        f"| rounds | {row[S.ROUNDS_COMPLETED]} of {row[S.ROUNDS_PLANNED]} ({row[S.STOP_REASON]}) |",
        f"| bytes up / down (total) | {row[S.BYTES_UP]:,} / {row[S.BYTES_DOWN]:,} |",
        f"| wall time | {num(row[S.WALL_SECONDS], '.1f')} s |",
        "",
    ]
    lines += ["## Curves", ""]
    for key, alt in (
        ("accuracy_vs_round", "accuracy vs round"),
        ("loss_vs_round", "loss vs round"),
        ("epsilon_vs_round", "epsilon vs round"),
    ):
        if plots.get(key):
            lines += [_img(plots[key], root, alt), ""]
    lines += ["## Communication", ""] + _comm_section(comm) + [""]
    if plots.get("communication"):
        lines += [_img(plots["communication"], root, "communication"), ""]
    lines += _audit_section(res, plots, root)
    clients = res.clients
    if not clients.empty:
        g = clients.groupby(R.CLIENT_ID)
        per = pd.DataFrame(
            {
                "rounds_joined": g[R.SERVER_ROUND].nunique(),
                "examples": g[R.NUM_EXAMPLES].max(),
                "mean_train_loss": g[R.TRAIN_LOSS].mean(),
                "mean_update_norm": g[R.UPDATE_NORM].mean(),
                "epsilon_spent": g[R.EPSILON].max(),
            }
        ).reset_index()
        lines += [
            "## Clients",
            "",
            markdown_table(
                per, {"mean_train_loss": ".4f", "mean_update_norm": ".4g", "epsilon_spent": ".3f"}
            ),
        ]
    return lines


def write_report(
    path: str | Path,
    out_dir: str | Path | None = None,
    *,
    parameters: Callable[[str], int | None] = base_model_parameters,
) -> Report:
    """Analyse a sweep or run folder: write ``report.md`` and ``plots/*.png``.

    Args:
        path: the sweep or run folder.
        out_dir: where to write (default: ``path`` itself).
        parameters: model name -> base-model parameter count (for the full fine-tuning
            baseline).
    """
    res = load_results(path)
    root = Path(out_dir) if out_dir is not None else res.path
    plot_dir = root / PLOTS_DIR
    comm = communication_table(res, parameters)
    plots: dict[str, Path | None] = {}
    if res.kind == "sweep":
        plots["accuracy_vs_epsilon"] = P.plot_accuracy_vs_epsilon(res, plot_dir)
        plots["accuracy_vs_clients"] = P.plot_accuracy_vs_clients(res, plot_dir)
        plots["leakage_vs_epsilon"] = P.plot_leakage_vs_epsilon(res, plot_dir)
    else:
        plots["loss_vs_round"] = P.plot_loss_vs_round(res, plot_dir)
    plots["accuracy_vs_round"] = P.plot_accuracy_vs_round(res, plot_dir)
    plots["epsilon_vs_round"] = P.plot_epsilon_vs_round(res, plot_dir)
    plots["communication"] = P.plot_communication(comm, plot_dir)
    tables: dict[str, pd.DataFrame] = {"communication": comm}
    title = "Sweep report" if res.kind == "sweep" else "Run report"
    lines = [
        f"# {title}: {res.path.name}",
        "",
        f"_Written by `dplora-ray analyze` on {time.strftime('%Y-%m-%d %H:%M')}._",
        "",
    ]
    if res.kind == "sweep":
        lines += _sweep_body(res, plots, root, tables, comm)
    else:
        lines += _run_body(res, plots, root, comm)
    root.mkdir(parents=True, exist_ok=True)
    report = root / REPORT_FILE
    write_text_atomic(report, "\n".join(lines) + "\n")
    return Report(
        path=report, plots=[p for p in plots.values() if p is not None], results=res, tables=tables
    )
