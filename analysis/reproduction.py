"""Tables of the paper reproduction (docs/reproduction.md) from a folder of runs.

``analysis/reproduce_smollm2.sh OUT`` writes one ``dplora-ray train`` run per folder
``OUT/<name>``; this module reads each run's ``summary.json``, ``config.yaml`` and
``clients.parquet`` and prints the Markdown tables:

* per data set: the metric by target epsilon with the epsilon actually spent (the run's
  ledger), the noise multiplier and the relative change from the non-private run;
* the paper's mechanism against DP-SGD at equal epsilon;
* per data set where it ran: the DP-SGD private recipe (FFA-LoRA, ``configs/paper/
  *_dpsgd.yaml``) at each target epsilon against the same recipe without privacy;
* communication: bytes per client-round, per round (the cohort up and down) and in total,
  for every strategy that ran, plus full-model T-FedAvg computed from the byte formula
  the tests check against real payloads (no run).

Usage: ``python -m analysis.reproduction OUT [--markdown FILE]``. Nothing here is
hard-coded: every figure comes from the run folders (or the model's parameter shapes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.tables import markdown_table

__all__ = ["communication", "load_runs", "main", "mechanism_table", "plot_utility",
           "recipe_table", "utility_table"]

PAPER_LIVEQA = (69.4, 55.9)  # Llama-2-7B on LiveQA: no DP, epsilon = 2 (the paper)
_ORDER = ("fpb", "tfns", "pubmedqa", "medquad", "piqa")


def _recipes(df: pd.DataFrame) -> list[str]:
    """The data sets present, the paper's in domain order first."""
    return sorted(df["recipe"].unique(),
                  key=lambda r: (_ORDER.index(r) if r in _ORDER else len(_ORDER), r))


def load_runs(root: str | Path) -> pd.DataFrame:
    """One row per finished run folder under ``root``: name, data set, mode, target and
    spent epsilon, metrics, bytes, statuses."""
    from dplora_ray.config import load_config

    rows = []
    for summary_path in sorted(Path(root).glob("*/summary.json")):
        run = summary_path.parent
        s = json.loads(summary_path.read_text())
        cfg = load_config(run / "config.yaml")
        clients = pd.read_parquet(run / "clients.parquet")
        rows.append({
            "run": run.name,
            "recipe": cfg.data.recipe,
            "task_type": s.get("task_type", "classification"),
            "mode": s["privacy_mode"],
            "strategy": cfg.federation.strategy,
            "compression": cfg.federation.compression,
            "train_a": cfg.lora.train_a,
            "target_epsilon": (cfg.privacy.target_epsilon if cfg.privacy.enabled
                               else math.inf),
            "epsilon": s["epsilon"],
            "noise_multiplier": s["noise_multiplier"],
            "clipping_norm": cfg.privacy.clipping_norm,
            "local_steps": cfg.federation.local_steps,
            "accuracy_before": s["eval_accuracy_before"],
            "accuracy": s["eval_accuracy"],
            "f1_weighted": s["eval_f1_weighted"],
            "f1_macro": s["eval_f1_macro"],
            "perplexity_before": s.get("eval_perplexity_before"),
            "perplexity": s.get("eval_perplexity"),
            "rouge_l_before": s.get("eval_rouge_l_before"),
            "rouge_l": s.get("eval_rouge_l"),
            "rounds": s["rounds_completed"],
            "clients_per_round": cfg.federation.clients_per_round,
            "bytes_up_total": s["bytes_up_total"],
            "bytes_down_total": s["bytes_down_total"],
            "uploads": int((clients["bytes_up"] > 0).sum()),
            "client_rounds": len(clients),
            "trainable_parameters": s["trainable_parameters"],
            "wall_seconds": s["wall_seconds"],
            "test_examples": s["num_test_examples"],
            "stop_reason": s["stop_reason"],
            "model": cfg.model.name,
        })
    return pd.DataFrame(rows)


def _plain_lora(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["strategy"] == "lora") & (df["compression"] == "none") & df["train_a"]]


def utility_table(df: pd.DataFrame, recipe: str, mode: str = "paper") -> pd.DataFrame:
    """Metric by target epsilon for one data set (``mode`` runs plus the non-private
    one), with the change relative to the non-private run."""
    runs = _plain_lora(df[df["recipe"] == recipe])
    runs = runs[runs["mode"].isin([mode, "none"])].sort_values("target_epsilon")
    if runs.empty:
        return pd.DataFrame()
    ref = runs[runs["mode"] == "none"]
    generation = runs["task_type"].iloc[0] == "generation"
    metric = "rouge_l" if generation else "accuracy"
    base = float(ref[metric].iloc[0]) if not ref.empty else math.nan
    out = pd.DataFrame({
        "target epsilon": runs["target_epsilon"],
        "epsilon spent": runs["epsilon"],
        "noise multiplier": runs["noise_multiplier"],
    })
    if generation:
        out["ROUGE-L before"] = runs["rouge_l_before"]
        out["ROUGE-L"] = runs["rouge_l"]
        out["perplexity before"] = runs["perplexity_before"]
        out["perplexity"] = runs["perplexity"]
    else:
        out["accuracy before"] = runs["accuracy_before"]
        out["accuracy"] = runs["accuracy"]
        out["weighted F1"] = runs["f1_weighted"]
        out["macro-F1"] = runs["f1_macro"]
    name = "ROUGE-L" if generation else "accuracy"
    out[f"{name} change vs no DP"] = [
        f"{(v - base) / base:+.1%}" if math.isfinite(base) and base else ""
        for v in runs[metric]]
    return out.reset_index(drop=True)


def _ffa_recipe(df: pd.DataFrame) -> pd.DataFrame:
    """The private recipe's runs (FFA-LoRA, plain LoRA transfer; DP-SGD or no privacy)."""
    return df[(df["strategy"] == "lora") & (df["compression"] == "none") & ~df["train_a"]
              & df["mode"].isin(["dpsgd", "none"])]


def recipe_table(df: pd.DataFrame, recipe: str) -> pd.DataFrame:
    """The DP-SGD private recipe (FFA-LoRA: ``train_a`` false) by target epsilon on one
    data set, with the accuracy difference to the same recipe without privacy in points
    (positive: privacy costs accuracy). Empty when a data set has no such DP-SGD run."""
    runs = _ffa_recipe(df[df["recipe"] == recipe]).sort_values("target_epsilon")
    if (runs["mode"] != "dpsgd").all():
        return pd.DataFrame()
    ref = runs[runs["mode"] == "none"]
    base = float(ref["accuracy"].iloc[0]) if not ref.empty else math.nan
    return pd.DataFrame({
        "target epsilon": runs["target_epsilon"],
        "epsilon spent": runs["epsilon"],
        "noise multiplier": runs["noise_multiplier"],
        "rounds x local steps": [f"{int(r)} x {int(s)}" for r, s in
                                 zip(runs["rounds"], runs["local_steps"])],
        "accuracy before": runs["accuracy_before"],
        "accuracy": runs["accuracy"],
        "weighted F1": runs["f1_weighted"],
        "macro-F1": runs["f1_macro"],
        "no DP minus DP (points)": [round(100 * (base - v), 1) if math.isfinite(base)
                                    else math.nan for v in runs["accuracy"]],
    }).reset_index(drop=True)


def mechanism_table(df: pd.DataFrame, recipe: str = "fpb") -> pd.DataFrame:
    """Every ``paper`` and ``dpsgd`` run at a target epsilon some ``dpsgd`` run used, with
    its clipping norm and local steps."""
    runs = _plain_lora(df[df["recipe"] == recipe])
    eps = sorted(set(runs.loc[runs["mode"] == "dpsgd", "target_epsilon"]))
    runs = runs[runs["mode"].isin(["paper", "dpsgd"]) & runs["target_epsilon"].isin(eps)]
    runs = runs.sort_values(["target_epsilon", "mode", "clipping_norm", "local_steps"],
                            ascending=[True, False, False, True])
    return pd.DataFrame({
        "target epsilon": runs["target_epsilon"], "mechanism": runs["mode"],
        "C": runs["clipping_norm"], "local steps": runs["local_steps"],
        "epsilon spent": runs["epsilon"], "noise multiplier": runs["noise_multiplier"],
        "accuracy": runs["accuracy"], "weighted F1": runs["f1_weighted"],
    }).reset_index(drop=True)


def _full_model_ternary_bytes(model_name: str) -> int | None:
    """Bytes of one full-model ternary update (T-FedAvg as published), from the model's
    parameter shapes and :func:`dplora_ray.federated.compression.ternary_bytes`."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from dplora_ray.config import ModelConfig
        from dplora_ray.federated.compression import ternary_bytes
        from dplora_ray.models import prepare_model

        config = AutoConfig.from_pretrained(prepare_model(ModelConfig(name=model_name)))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return int(sum(ternary_bytes(p.numel()) for p in model.parameters()))
    except Exception:  # noqa: BLE001 - an unavailable model: no computed row
        return None


def communication(df: pd.DataFrame, recipe: str = "fpb", paper_rounds: int = 50
                  ) -> pd.DataFrame:
    """Bytes per strategy (non-private baselines and DP-LoRA at epsilon 2) on one data set."""
    runs = df[df["recipe"] == recipe]

    def pick(**cond: Any) -> pd.Series | None:
        r = runs
        for k, v in cond.items():
            r = r[r[k] == v]
        return None if r.empty else r.iloc[0]

    choices = [
        ("DP-LoRA (paper mechanism, eps 2)", pick(mode="paper", target_epsilon=2.0,
                                                  strategy="lora", compression="none",
                                                  train_a=True)),
        ("LoRA, no DP", pick(mode="none", strategy="lora", compression="none", train_a=True)),
        ("FFA-LoRA (B only), no DP", pick(mode="none", strategy="lora", train_a=False)),
        ("T-FedAvg on LoRA (ternary), no DP", pick(mode="none", compression="ternary",
                                                   strategy="lora")),
        ("CMFL on LoRA, no DP", pick(mode="none", compression="cmfl", strategy="lora")),
        ("Vanilla FL (full model), no DP", pick(mode="none", strategy="full")),
    ]
    rows = []
    for label, r in choices:
        if r is None:
            continue
        per_round_up = r["bytes_up_total"] / r["rounds"]
        per_round_down = r["bytes_down_total"] / r["rounds"]
        rows.append({
            "strategy": label,
            "parameters sent": int(r["trainable_parameters"]),
            "bytes up per upload": int(r["bytes_up_total"] / max(1, r["uploads"])),
            "uploads / client-rounds": f"{r['uploads']}/{r['client_rounds']}",
            "bytes per round (up+down)": int(per_round_up + per_round_down),
            f"total, {int(r['rounds'])} rounds": int(r["bytes_up_total"] + r["bytes_down_total"]),
            f"total, {paper_rounds} rounds (x{paper_rounds}/{int(r['rounds'])})":
                int((per_round_up + per_round_down) * paper_rounds),
            "accuracy": r["accuracy"],
        })
    full = pick(mode="none", strategy="full")
    if full is not None:
        tern = _full_model_ternary_bytes(str(full["model"]))
        if tern is not None:
            k = int(full["clients_per_round"])
            down = full["bytes_down_total"] / full["rounds"]
            rows.append({
                "strategy": "T-FedAvg (full model, ternary), computed",
                "parameters sent": int(full["trainable_parameters"]),
                "bytes up per upload": tern,
                "uploads / client-rounds": "",
                "bytes per round (up+down)": int(k * tern + down),
                f"total, {int(full['rounds'])} rounds": int((k * tern + down) * full["rounds"]),
                f"total, {paper_rounds} rounds (x{paper_rounds}/{int(full['rounds'])})":
                    int((k * tern + down) * paper_rounds),
                "accuracy": math.nan,
            })
    return pd.DataFrame(rows)


def plot_utility(df: pd.DataFrame, path: str | Path) -> Path | None:
    """One panel per data set: the metric at each target epsilon (paper mechanism; DP-SGD
    where it ran) with the non-private run as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = [r for r in _recipes(df) if not utility_table(df, r).empty]
    if not recipes:
        return None
    fig, axes = plt.subplots(1, len(recipes), figsize=(4.2 * len(recipes), 3.4), squeeze=False)
    for ax, recipe in zip(axes[0], recipes):
        runs = _plain_lora(df[df["recipe"] == recipe])
        generation = runs["task_type"].iloc[0] == "generation"
        metric, label = ("rouge_l", "ROUGE-L") if generation else ("accuracy", "accuracy")
        private = runs[runs["mode"].isin(["paper", "dpsgd"])]
        for (mode, c, steps), r in private.groupby(["mode", "clipping_norm", "local_steps"]):
            r = r.sort_values("target_epsilon")
            ax.plot(r["target_epsilon"], r[metric], "o-" if mode == "paper" else "s--",
                    label=f"{mode}, C={c:g}, {steps} local step(s)")
        ffa = _ffa_recipe(df[df["recipe"] == recipe])
        ffa_private = ffa[ffa["mode"] == "dpsgd"].sort_values("target_epsilon")
        if not ffa_private.empty and not generation:
            ax.plot(ffa_private["target_epsilon"], ffa_private[metric], "D-", color="C3",
                    label="DP-SGD private recipe (FFA)")
            ffa_ref = ffa[ffa["mode"] == "none"]
            if not ffa_ref.empty:
                ax.axhline(float(ffa_ref[metric].iloc[0]), color="C3", ls="-.", lw=1,
                           label="private recipe, no DP")
        ref = runs[runs["mode"] == "none"]
        if not ref.empty:
            ax.axhline(float(ref[metric].iloc[0]), color="k", ls="--", lw=1, label="no DP")
            ax.axhline(float(ref[f"{metric}_before"].iloc[0]), color="grey", ls=":", lw=1,
                       label="before training")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("target epsilon (delta 1e-5)")
        ax.set_ylabel(label)
        ax.set_title(recipe)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.reproduction", description=__doc__)
    p.add_argument("root", help="folder of runs (analysis/reproduce_smollm2.sh OUT)")
    p.add_argument("--markdown", default=None, help="also write the tables to this file")
    p.add_argument("--plot", default=None, help="write the utility-vs-epsilon plot (PNG)")
    args = p.parse_args(argv)
    df = load_runs(args.root)
    if df.empty:
        print(f"no finished runs under {args.root}", file=sys.stderr)
        return 2
    fmt = {"accuracy": ".4f", "accuracy before": ".4f", "weighted F1": ".4f",
           "macro-F1": ".4f", "ROUGE-L": ".4f", "ROUGE-L before": ".4f",
           "perplexity": ".2f", "perplexity before": ".2f", "epsilon spent": ".3f",
           "noise multiplier": ".4g"}
    parts = []
    for recipe in _recipes(df):
        t = utility_table(df, recipe)
        if not t.empty:
            parts.append(f"### {recipe}\n\n{markdown_table(t, fmt)}")
        t = recipe_table(df, recipe)
        if not t.empty:
            parts.append(f"### {recipe}: the DP-SGD private recipe (FFA-LoRA)\n\n"
                         f"{markdown_table(t, fmt)}")
    mech = mechanism_table(df)
    if not mech.empty:
        parts.append(f"### paper mechanism vs DP-SGD (fpb)\n\n{markdown_table(mech, fmt)}")
    comm = communication(df)
    if not comm.empty:
        parts.append(f"### communication (fpb)\n\n{markdown_table(comm, fmt)}")
    runs = df[["run", "epsilon", "accuracy", "rouge_l", "wall_seconds", "stop_reason"]]
    parts.append(f"### runs\n\n{markdown_table(runs, {'wall_seconds': '.0f'})}")
    text = "\n\n".join(parts) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.plot and plot_utility(df, args.plot):
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
