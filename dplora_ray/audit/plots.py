"""Leakage against epsilon: exposure and membership AUC next to the privacy budget.

For the analysis report (``analysis/`` builds on the public columns only): give
:func:`plot_leakage_vs_epsilon` a DataFrame with one row per run, e.g. ``sweep.parquet``
(the sweep copies the ``audit_*`` summary keys, see docs/audit.md) or
:func:`audit_frame` of some run folders. Runs without privacy (``epsilon`` missing or
infinite) are drawn at the right edge, labelled "no DP". matplotlib is imported lazily.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from dplora_ray import results as R

__all__ = ["audit_frame", "plot_leakage_vs_epsilon"]

EPSILON = "epsilon"


def audit_frame(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """One row per run folder: ``epsilon``, ``privacy_mode`` and the audit summary keys
    (runs without ``summary.json`` are skipped)."""
    rows = []
    for d in run_dirs:
        p = Path(d) / "summary.json"
        if not p.is_file():
            continue
        s = json.loads(p.read_text())
        rows.append({"run": str(d), EPSILON: s.get(EPSILON),
                     "privacy_mode": s.get("privacy_mode"),
                     **{k: s.get(k) for k in R.AUDIT_SUMMARY_KEYS}})
    return pd.DataFrame(rows, columns=["run", EPSILON, "privacy_mode", *R.AUDIT_SUMMARY_KEYS])


def plot_leakage_vs_epsilon(frame: pd.DataFrame, path: str | Path, *,
                            chance_exposure: float | None = None,
                            title: str = "Measured leakage vs epsilon") -> Path:
    """Two panels against epsilon (log scale): secret exposure (bits) and membership
    AUC, with the epsilon lower bound as a third series on a twin axis of the first.

    Args:
        frame: rows with ``epsilon`` and :data:`~dplora_ray.results.AUDIT_SUMMARY_KEYS`.
        path: the PNG to write.
        chance_exposure: drawn as a dashed line (e.g. ``chance_exposure(candidates)``).
        title: figure title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = frame.copy()
    eps = pd.to_numeric(df[EPSILON], errors="coerce").to_numpy(dtype=np.float64)
    private = np.isfinite(eps) & (eps > 0)
    right = float(np.nanmax(eps[private])) * 4 if private.any() else 10.0
    x = np.where(private, eps, right)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series = [(R.AUDIT_EXPOSURE_MEAN, "exposure, mean (bits)", "o"),
              (R.AUDIT_EXPOSURE_MAX, "exposure, max (bits)", "^")]
    for col, label, marker in series:
        y = pd.to_numeric(df.get(col), errors="coerce")
        axes[0].scatter(x, y, marker=marker, label=label)
    if chance_exposure is not None:
        axes[0].axhline(chance_exposure, linestyle="--", color="grey", label="chance")
    axes[0].set_ylabel("exposure (bits)")
    auc = pd.to_numeric(df.get(R.AUDIT_MIA_AUC), errors="coerce")
    axes[1].scatter(x, auc, label="membership AUC (canaries)")
    nat = pd.to_numeric(df.get(R.AUDIT_NATURAL_MIA_AUC), errors="coerce")
    if nat.notna().any():
        axes[1].scatter(x, nat, marker="s", label="membership AUC (natural)")
    axes[1].axhline(0.5, linestyle="--", color="grey", label="chance")
    axes[1].set_ylabel("ROC AUC")
    lb = pd.to_numeric(df.get(R.AUDIT_EPSILON_LOWER_BOUND), errors="coerce")
    twin = axes[0].twinx()
    twin.scatter(x, lb, marker="x", color="black", label="epsilon lower bound (95%)")
    lim = max(right, float(np.nanmax(lb)) if lb.notna().any() else 1.0)
    twin.plot([min(x.min(), 1e-2), lim], [min(x.min(), 1e-2), lim], ":", color="black",
              linewidth=0.8, label="bound = epsilon")
    twin.set_ylabel("empirical epsilon lower bound")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("epsilon (accountant)" + ("; right edge: no DP" if (~private).any()
                                                 else ""))
        ax.legend(fontsize=8, loc="upper left")
    twin.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
