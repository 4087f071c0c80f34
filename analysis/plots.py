"""PNG plots (matplotlib, Agg backend: no display needed).

Every function takes loaded results, writes one PNG into ``out_dir`` and returns its
path, or None when the plot does not apply (e.g. accuracy vs epsilon when the sweep did
not vary epsilon). Target epsilon ``inf`` (no privacy) is drawn at the right end of the
epsilon axis, labelled ``∞ (no DP)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.loading import Results
from analysis.tables import (
    ACCURACY_MAX,
    ACCURACY_MEAN,
    ACCURACY_MIN,
    CLIENTS,
    EPSILON_TARGET,
    FULL_FT_BYTES_PER_CLIENT_ROUND,
    LORA_BYTES_UP_PER_CLIENT_ROUND,
    MODEL,
    RANK,
    ROUND,
    accuracy_curves,
    privacy_utility_table,
)
from dplora_ray import results as R
from dplora_ray import tune as S

__all__ = [
    "plot_accuracy_vs_clients",
    "plot_accuracy_vs_epsilon",
    "plot_accuracy_vs_round",
    "plot_communication",
    "plot_epsilon_vs_round",
    "plot_leakage_vs_epsilon",
    "plot_loss_vs_round",
]

_DPI = 120
_LABELS = {EPSILON_TARGET: "ε", RANK: "r", CLIENTS: "clients"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        if math.isinf(v):
            return "∞ (no DP)"
        return f"{v:g}"
    return str(v)


def _label(key: str, value: Any) -> str:
    if key == EPSILON_TARGET and isinstance(value, (float, np.floating)) and math.isinf(value):
        return "no DP (ε=∞)"
    return f"{_LABELS.get(key, key)}={_fmt(value)}"


def _varied(df: pd.DataFrame, key: str) -> bool:
    return key in df.columns and df[key].nunique(dropna=True) > 1


def _save(fig: Any, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    _plt().close(fig)
    return path


def _epsilon_positions(values: Sequence[float]) -> dict[float, float]:
    """x position of each target epsilon on a log axis; inf goes one step past the max."""
    finite = sorted(v for v in set(values) if math.isfinite(v))
    pos = {v: v for v in finite}
    if any(math.isinf(v) for v in values):
        pos[math.inf] = (finite[-1] * 2.5) if finite else 1.0
    return pos


def _spread(y: np.ndarray, t: pd.DataFrame) -> np.ndarray:
    """Asymmetric min-max error bars around the means ``y`` (zero where one trial)."""
    return np.vstack([y - t[ACCURACY_MIN].to_numpy(), t[ACCURACY_MAX].to_numpy() - y])


def _before_line(ax: Any, ok: pd.DataFrame) -> None:
    before = ok[S.EVAL_ACCURACY_BEFORE].dropna()
    if len(before):
        ax.axhline(
            float(before.mean()), color="0.5", linestyle=":", linewidth=1.2, label="before training"
        )


def plot_accuracy_vs_epsilon(results: Results, out_dir: Path) -> Path | None:
    """Test accuracy against the target epsilon, one line per LoRA rank (mean over the
    other keys; bars: min-max)."""
    ok = results.ok
    if ok.empty or not _varied(ok, EPSILON_TARGET):
        return None
    plt = _plt()
    table = privacy_utility_table(ok, by=(RANK, EPSILON_TARGET))
    pos = _epsilon_positions(table[EPSILON_TARGET].astype(float).tolist())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (rank, t) in enumerate(table.groupby(RANK, sort=True)):
        t = t.sort_values(EPSILON_TARGET)
        x = np.array([pos[float(e)] for e in t[EPSILON_TARGET]])
        y = t[ACCURACY_MEAN].to_numpy()
        yerr = _spread(y, t)
        finite = np.isfinite(t[EPSILON_TARGET].astype(float).to_numpy())
        color = f"C{i}"
        cap = 3 if np.any(yerr > 0) else 0
        ax.errorbar(
            x[finite],
            y[finite],
            yerr=yerr[:, finite],
            color=color,
            marker="o",
            capsize=cap,
            label=_label(RANK, rank),
        )
        if (~finite).any():
            ax.errorbar(
                x[~finite],
                y[~finite],
                yerr=yerr[:, ~finite],
                color=color,
                marker="s",
                capsize=cap,
                linestyle="none",
            )
            if finite.any():
                last = np.flatnonzero(finite)[-1]
                ax.plot(
                    [x[last], x[~finite][0]],
                    [y[last], y[~finite][0]],
                    color=color,
                    linestyle=":",
                    linewidth=1,
                )
    _before_line(ax, ok)
    ax.set_xscale("log")
    ticks = sorted(pos.items(), key=lambda kv: kv[1])
    ax.set_xticks([p for _, p in ticks])
    ax.set_xticklabels([_fmt(e) for e, _ in ticks])
    ax.minorticks_off()
    ax.set_xlabel("target privacy budget ε (log scale)")
    ax.set_ylabel("test accuracy")
    n = int(table["num_trials"].max())
    extra = f" (mean of up to {n} trials; bars: min-max)" if n > 1 else ""
    ax.set_title("Accuracy vs privacy budget, by LoRA rank" + extra, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(title="LoRA rank", fontsize=9)
    return _save(fig, out_dir, "accuracy_vs_epsilon.png")


def plot_accuracy_vs_clients(results: Results, out_dir: Path) -> Path | None:
    """Test accuracy against the number of clients, one line per target epsilon."""
    ok = results.ok
    if ok.empty or not _varied(ok, CLIENTS):
        return None
    plt = _plt()
    by_eps = _varied(ok, EPSILON_TARGET)
    table = privacy_utility_table(ok, by=(EPSILON_TARGET, CLIENTS) if by_eps else (CLIENTS,))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = table.groupby(EPSILON_TARGET, sort=True) if by_eps else [(None, table)]
    for i, (eps, t) in enumerate(groups):
        t = t.sort_values(CLIENTS)
        y = t[ACCURACY_MEAN].to_numpy()
        yerr = _spread(y, t)
        ax.errorbar(
            t[CLIENTS],
            y,
            yerr=yerr,
            marker="o",
            capsize=3 if np.any(yerr > 0) else 0,
            color=f"C{i}",
            label=_label(EPSILON_TARGET, eps) if eps is not None else "all trials",
        )
    _before_line(ax, ok)
    ax.set_xticks(sorted(table[CLIENTS].unique()))
    ax.set_xlabel("number of clients (federation.num_clients)")
    ax.set_ylabel("test accuracy")
    n = int(table["num_trials"].max())
    extra = f" (mean of up to {n} trials; bars: min-max)" if n > 1 else ""
    ax.set_title("Accuracy vs number of clients" + extra, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(title="privacy budget", fontsize=9)
    return _save(fig, out_dir, "accuracy_vs_clients.png")


def _curve_groups(
    results: Results, curves: pd.DataFrame, keys: Sequence[str], run_label: str
) -> list[tuple[str, pd.DataFrame]]:
    """(label, frame) per line: one per trial for a run, else per value combination of
    ``keys`` that vary (mean over the rest)."""
    if results.kind == "run":
        return [(run_label, curves)]
    keys = [k for k in keys if _varied(curves, k)]
    if not keys:
        return [("all trials", curves)]
    out = []
    for vals, g in curves.groupby(keys, sort=True):
        vals = vals if isinstance(vals, tuple) else (vals,)
        out.append((", ".join(_label(k, v) for k, v in zip(keys, vals)), g))
    return out


def _mean_curve(
    g: pd.DataFrame, col: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    s = g.groupby(ROUND)[col]
    m = s.mean()
    return (
        m.index.to_numpy(),
        m.to_numpy(),
        s.min().to_numpy(),
        s.max().to_numpy(),
        int(g[S.TRIAL].nunique()),
    )


def plot_accuracy_vs_round(results: Results, out_dir: Path) -> Path | None:
    """Test accuracy after each evaluated round (round 0: untrained). A sweep gets one
    panel per LoRA rank and one line per target epsilon (mean over the other keys, band:
    min-max)."""
    curves = accuracy_curves(results)
    if curves.empty:
        return None
    plt = _plt()
    panels: list[tuple[str | None, pd.DataFrame]] = [(None, curves)]
    if results.kind == "sweep" and _varied(curves, RANK) and curves[RANK].nunique() <= 4:
        panels = [(_label(RANK, r) + " (LoRA rank)", g) for r, g in curves.groupby(RANK, sort=True)]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.2 * len(panels) + 1.2, 4.3), sharey=True, squeeze=False
    )
    for ax, (title, pc) in zip(axes[0], panels):
        keys = (
            [EPSILON_TARGET]
            if _varied(curves, EPSILON_TARGET)
            else [k for k in results.swept if k != RANK][:2]
        )
        for i, (label, g) in enumerate(_curve_groups(results, pc, keys, "accuracy")):
            x, y, lo, hi, n = _mean_curve(g, S.EVAL_ACCURACY)
            ax.plot(
                x, y, marker="o", color=f"C{i}", label=label + (f" ({n} trials)" if n > 1 else "")
            )
            if n > 1:
                ax.fill_between(x, lo, hi, color=f"C{i}", alpha=0.15)
            if results.kind == "run":
                xf, yf, *_ = _mean_curve(g.dropna(subset=[S.EVAL_F1_MACRO]), S.EVAL_F1_MACRO)
                ax.plot(xf, yf, marker="s", linestyle="--", color="C1", label="macro-F1")
        ax.set_xlabel("server round (0 = before training)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        if title:
            ax.set_title(title, fontsize=10)
    axes[0][0].set_ylabel("test accuracy" if results.kind == "sweep" else "test metric")
    fig.suptitle("Accuracy vs round", fontsize=11)
    return _save(fig, out_dir, "accuracy_vs_round.png")


def plot_epsilon_vs_round(results: Results, out_dir: Path) -> Path | None:
    """Epsilon spent after each round (the ledger's worst-case unit), private trials only;
    one line per target epsilon and number of clients (the sampling rates), dashed: the
    targets."""
    rounds = results.rounds
    if rounds.empty or rounds[R.EPSILON].notna().sum() == 0:
        return None
    plt = _plt()
    priv = rounds[rounds[R.EPSILON].notna()]
    start = priv.groupby(S.TRIAL, as_index=False).first()
    start[ROUND] = 0
    start[R.EPSILON] = 0.0
    priv = pd.concat([start, priv], ignore_index=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = _curve_groups(results, priv, [EPSILON_TARGET, CLIENTS], "ε spent")
    for i, (label, g) in enumerate(groups):
        x, y, lo, hi, n = _mean_curve(g, R.EPSILON)
        ax.plot(x, y, marker="o", color=f"C{i % 10}", label=label)
        if n > 1 and np.any(hi - lo > 1e-9):
            ax.fill_between(x, lo, hi, color=f"C{i % 10}", alpha=0.15)
    targets = (
        sorted({float(t) for t in priv[EPSILON_TARGET].dropna() if math.isfinite(float(t))})
        if EPSILON_TARGET in priv
        else []
    )
    for t in targets:
        ax.axhline(t, color="0.4", linestyle="--", linewidth=0.8)
    if targets:
        ax.plot([], [], color="0.4", linestyle="--", linewidth=0.8, label="target ε")
    ax.set_xlabel("server round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("ε spent (worst-case client, δ fixed)")
    ax.set_title("Privacy spent vs round", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(groups) > 6 else 1)
    return _save(fig, out_dir, "epsilon_vs_round.png")


def plot_loss_vs_round(results: Results, out_dir: Path) -> Path | None:
    """Mean client training loss and test loss per round (single runs)."""
    rounds = results.rounds
    if rounds.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    r = rounds.sort_values(ROUND)
    ax.plot(r[ROUND], r[R.TRAIN_LOSS], marker="o", label="train loss (mean over clients)")
    ev = r[r[R.EVAL_LOSS].notna()]
    ax.plot(ev[ROUND], ev[R.EVAL_LOSS], marker="s", linestyle="--", label="test loss")
    ax.set_xlabel("server round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("cross-entropy over the label words")
    ax.set_title("Loss vs round", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    return _save(fig, out_dir, "loss_vs_round.png")


def plot_communication(comm: pd.DataFrame, out_dir: Path) -> Path | None:
    """Upload per client and round: LoRA at each rank vs full fine-tuning (log scale)."""
    comm = comm.dropna(subset=[LORA_BYTES_UP_PER_CLIENT_ROUND])
    if comm.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels: list[str] = []
    values: list[float] = []
    colors: list[str] = []
    fractions: list[float | None] = []
    multi = comm[MODEL].nunique() > 1
    for model, g in comm.groupby(MODEL, sort=True):
        for _, row in g.sort_values(RANK).iterrows():
            labels.append((f"{model}\n" if multi else "") + f"LoRA r={row[RANK]}")
            values.append(row[LORA_BYTES_UP_PER_CLIENT_ROUND])
            colors.append("C0")
            full = row[FULL_FT_BYTES_PER_CLIENT_ROUND]
            fractions.append(values[-1] / full if pd.notna(full) and full else None)
        full = g[FULL_FT_BYTES_PER_CLIENT_ROUND].iloc[0]
        if pd.notna(full):
            labels.append((f"{model}\n" if multi else "") + "full fine-tuning")
            values.append(full)
            colors.append("C3")
            fractions.append(None)
    bars = ax.bar(range(len(values)), values, color=colors)
    for b, v, f in zip(bars, values, fractions):
        text = _bytes(v) + (f"\n{100 * f:.3g}% of full" if f is not None else "")
        ax.annotate(text, (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("bytes uploaded per client per round (log)")
    model_names = ", ".join(str(m) for m in comm[MODEL].unique())
    ax.set_title(f"Communication: LoRA vs full fine-tuning ({model_names}, float32)", fontsize=10)
    ax.set_ylim(top=max(values) * 8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, out_dir, "communication.png")


def _bytes(v: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= k:
            return f"{v / k:.3g} {unit}"
    return f"{v:.0f} B"


def audited(trials: pd.DataFrame) -> pd.DataFrame:
    """The finished trials with an empirical privacy audit (``audit_exposure_mean`` not
    null); empty when the audit was off everywhere (or the table predates it)."""
    if R.AUDIT_EXPOSURE_MEAN not in trials.columns:
        return trials.iloc[0:0]
    ok = trials[trials[S.STATUS] == S.STATUS_OK] if S.STATUS in trials.columns else trials
    return ok[pd.to_numeric(ok[R.AUDIT_EXPOSURE_MEAN], errors="coerce").notna()]


def plot_leakage_vs_epsilon(results: Results, out_dir: Path) -> Path | None:
    """Exposure, membership-inference AUC and the empirical epsilon lower bound against
    the accountant's epsilon (:func:`dplora_ray.audit.plots.plot_leakage_vs_epsilon`), for
    the audited trials; ``None`` when no trial was audited."""
    from dplora_ray.audit.plots import plot_leakage_vs_epsilon as _plot

    frame = audited(results.trials)
    if frame.empty:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    return _plot(frame, out_dir / "leakage_vs_epsilon.png")
