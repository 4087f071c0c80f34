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
    """Three panels against epsilon (log scale): secret exposure (bits), membership AUC
    and the empirical epsilon lower bound (with the line bound = epsilon).

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
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    series = [(R.AUDIT_EXPOSURE_MEAN, "exposure, mean", "o"),
              (R.AUDIT_EXPOSURE_MAX, "exposure, max", "^")]
    for col, label, marker in series:
        axes[0].scatter(x, pd.to_numeric(df.get(col), errors="coerce"), marker=marker,
                        label=label)
    if chance_exposure is not None:
        axes[0].axhline(chance_exposure, linestyle="--", color="grey", label="chance")
    axes[0].set_ylabel("exposure of the secrets (bits)")
    axes[1].scatter(x, pd.to_numeric(df.get(R.AUDIT_MIA_AUC), errors="coerce"),
                    label="canaries (calibrated)")
    nat = pd.to_numeric(df.get(R.AUDIT_NATURAL_MIA_AUC), errors="coerce")
    if nat.notna().any():
        axes[1].scatter(x, nat, marker="s", label="natural examples (calibrated)")
    axes[1].axhline(0.5, linestyle="--", color="grey", label="chance")
    axes[1].set_ylabel("membership inference ROC AUC")
    lb = pd.to_numeric(df.get(R.AUDIT_EPSILON_LOWER_BOUND), errors="coerce")
    axes[2].scatter(x, lb, marker="x", color="black", label="empirical lower bound (95%)")
    top = max(1.0, 1.3 * float(np.nanmax(lb))) if lb.notna().any() else 1.0
    grid = np.geomspace(max(1e-3, float(np.nanmin(x)) / 2), right * 2, 100)
    axes[2].plot(grid, grid, ":", color="black", linewidth=0.8,
                 label="accountant's epsilon (bound must stay below)")
    axes[2].set_ylim(0, top)
    axes[2].set_ylabel("epsilon lower bound")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("epsilon (accountant)" + ("; right edge: no DP" if (~private).any()
                                                 else ""))
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
