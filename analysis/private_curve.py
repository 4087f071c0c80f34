"""The measured privacy-utility curve (docs/reproduction.md) from epsilon sweeps.

``sweeps/private_curve_vader.yaml`` and ``sweeps/private_curve_fpb.yaml`` run one recipe
at target epsilon 1, 2, 4, 8 and inf (no privacy). This module reads each sweep folder
with :func:`analysis.loading.load_results` and prints, per data set, a Markdown table:
target and spent epsilon, the noise multiplier, accuracy and macro-F1 (before and after),
the gap to the non-private trial of the same sweep (no DP minus DP, in accuracy
points: negative where the private run scored higher), the examples processed and the wall
time; and it draws accuracy against epsilon, one line per data set.

"Examples processed" is the expected count under Poisson sampling: the sum over every
client-round of ``steps x sampling rate x the client's examples`` (``clients.parquet``),
i.e. steps x the expected logical batch; the realised count varies around it.

Usage: ``python -m analysis.private_curve SWEEP_DIR[,RUN_DIR...] [...] [--plot FILE]``
(folders joined by commas are one data set: a sweep plus runs that complete it).
Every figure comes from the sweep folders; nothing is typed in.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analysis.loading import Results, load_results
from analysis.tables import markdown_table
from dplora_ray import tune as S
from dplora_ray.config import load_config

__all__ = ["curve_table", "main", "plot_curves"]

TARGET = "privacy.target_epsilon"
RECIPE = "data.recipe"


def _examples(res: Results) -> pd.Series:
    """Expected examples processed per trial (Poisson: steps x q x n per client-round)."""
    c = res.clients
    if c.empty:
        return pd.Series(dtype=float)
    ok = c[c["status"] == "ok"]
    expected = ok["steps"] * ok["sampling_rate"] * ok["num_examples"]
    return expected.groupby(ok["trial"]).sum()


def _recipe(ok: pd.DataFrame) -> str:
    """The data recipe of a sweep that does not vary it: from a trial's saved config."""
    for folder in ok[S.TRIAL_DIR].dropna():
        path = Path(str(folder)) / "config.yaml"
        if path.is_file():
            return load_config(path).data.recipe
    return ""


def curve_table(*results: Results) -> pd.DataFrame:
    """One row per finished trial of one or more epsilon sweeps (or single runs) of the
    same recipe and data, sorted by target epsilon."""
    ok = pd.concat([r.ok for r in results], ignore_index=True)
    if ok.empty:
        return pd.DataFrame()
    ok[TARGET] = ok[TARGET].astype(float).fillna(math.inf)
    ok = ok.sort_values(TARGET)
    ref = ok[ok[TARGET] == math.inf]
    ref_acc = float(ref[S.EVAL_ACCURACY].mean()) if not ref.empty else math.nan
    examples = pd.concat([_examples(r) for r in results])
    return pd.DataFrame(
        {
            "data": ok[RECIPE] if RECIPE in ok else _recipe(ok),
            "target epsilon": ok[TARGET],
            "epsilon spent": ok[S.EPSILON],
            "noise multiplier": ok[S.NOISE_MULTIPLIER],
            "accuracy before": ok[S.EVAL_ACCURACY_BEFORE],
            "accuracy": ok[S.EVAL_ACCURACY],
            "macro-F1": ok[S.EVAL_F1_MACRO],
            "no DP minus DP (points)": (ref_acc - ok[S.EVAL_ACCURACY]) * 100.0,
            "examples processed": ok[S.TRIAL].map(examples).round(0),
            "wall seconds": ok[S.WALL_SECONDS],
        }
    ).reset_index(drop=True)


def plot_curves(tables: Sequence[pd.DataFrame], path: str | Path) -> Path | None:
    """Accuracy against target epsilon (log scale; ``inf`` drawn at the right as a square),
    one line per data set, with each data set's accuracy before training dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = [t for t in tables if not t.empty]
    if not tables:
        return None
    finite = sorted({float(e) for t in tables for e in t["target epsilon"] if math.isfinite(e)})
    inf_x = (finite[-1] * 2.0) if finite else 1.0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, t in enumerate(tables):
        color = f"C{i}"
        name = str(t["data"].iloc[0]).upper()
        fin = t[t["target epsilon"].map(math.isfinite)]
        ax.plot(fin["target epsilon"], fin["accuracy"], marker="o", color=color,
                label=f"{name}, DP-SGD")
        nodp = t[~t["target epsilon"].map(math.isfinite)]
        if not nodp.empty:
            ax.plot([inf_x], [float(nodp["accuracy"].iloc[0])], marker="s", color=color,
                    linestyle="none", label=f"{name}, no privacy")
        ax.axhline(float(t["accuracy before"].iloc[0]), color=color, linestyle=":",
                   linewidth=1)
    ax.set_xscale("log")
    ax.set_xticks([*finite, inf_x])
    ax.set_xticklabels([f"{e:g}" for e in finite] + ["inf"])
    ax.minorticks_off()
    ax.set_xlabel("target privacy budget ε (example-level, δ = 1e-5; log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("SmolLM2-135M, the private recipe: accuracy vs ε "
                 "(one trial per point; dotted: before training)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.private_curve", description=__doc__)
    p.add_argument("sweeps", nargs="+",
                   help="one data set per argument: a sweep folder, or several sweep or "
                        "run folders of the same recipe joined by commas")
    p.add_argument("--plot", help="write the accuracy-vs-epsilon figure here (PNG)")
    args = p.parse_args(argv)
    tables = []
    for folder in args.sweeps:
        table = curve_table(*(load_results(f) for f in folder.split(",")))
        tables.append(table)
        print(f"### {folder}\n")
        print(markdown_table(table, formats={
            "target epsilon": "g", "epsilon spent": ".3f", "noise multiplier": ".3f",
            "accuracy before": ".3f", "accuracy": ".3f", "macro-F1": ".3f",
            "no DP minus DP (points)": ".1f", "examples processed": ".0f", "wall seconds": ".0f",
        }))
        print()
    if args.plot:
        out = plot_curves(tables, args.plot)
        print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
