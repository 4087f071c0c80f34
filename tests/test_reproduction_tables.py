"""analysis.reproduction (the tables of docs/reproduction.md) on real tiny runs: the
utility table's relative change, the mechanism comparison and the communication table's
byte arithmetic against the runs' own files."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from analysis import reproduction as REP
from dplora_ray.config import load_config
from dplora_ray.federated.runner import run_experiment

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
RUNS = {
    "paper_eps2": ["privacy.mode=paper", "privacy.target_epsilon=2"],
    "dpsgd_eps2": ["privacy.mode=dpsgd", "privacy.target_epsilon=2"],
    "none": ["privacy.mode=none"],
    "ffa": ["privacy.mode=none", "lora.train_a=false"],
    "ffa_dpsgd_eps2": ["privacy.mode=dpsgd", "privacy.target_epsilon=2", "lora.train_a=false"],
    "ternary": ["privacy.mode=none", "federation.compression=ternary"],
    "full": ["privacy.mode=none", "federation.strategy=full"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the synthetic recipe stands in for fpb: the tables select by recipe name
    root = tmp_path_factory.mktemp("repro")
    for name, sets in RUNS.items():
        cfg = load_config(TINY, ["runtime.backend=inline", "federation.rounds=2",
                                 "federation.clients_per_round=3", *sets])
        run_experiment(cfg, root / name, progress=False)
    return root


def test_load_runs_reads_every_run(runs: Path) -> None:
    df = REP.load_runs(runs)
    assert sorted(df["run"]) == sorted(RUNS)
    private = df[df["mode"] != "none"]
    assert (private["epsilon"] <= 2.0 + 1e-9).all() and (private["epsilon"] > 0).all()
    assert math.isinf(df.set_index("run").loc["none", "target_epsilon"])


def test_utility_table_relative_change(runs: Path) -> None:
    df = REP.load_runs(runs)
    t = REP.utility_table(df, "synthetic")
    assert list(t["target epsilon"]) == [2.0, math.inf]
    base = df.set_index("run").loc["none", "accuracy"]
    paper = df.set_index("run").loc["paper_eps2", "accuracy"]
    assert t["accuracy change vs no DP"].iloc[0] == f"{(paper - base) / base:+.1%}"
    assert t["accuracy change vs no DP"].iloc[1] == "+0.0%"


def test_mechanism_table_pairs_modes_at_equal_epsilon(runs: Path) -> None:
    t = REP.mechanism_table(REP.load_runs(runs), "synthetic")
    assert list(t["mechanism"]) == ["paper", "dpsgd"]
    assert (t["target epsilon"] == 2.0).all()


def test_recipe_table_compares_the_ffa_recipe_with_itself_without_privacy(runs: Path) -> None:
    df = REP.load_runs(runs)
    t = REP.recipe_table(df, "synthetic")
    assert list(t["target epsilon"]) == [2.0, math.inf]
    by_run = df.set_index("run")
    private, ref = by_run.loc["ffa_dpsgd_eps2"], by_run.loc["ffa"]
    assert t["epsilon spent"].iloc[0] == private["epsilon"]
    assert t["no DP minus DP (points)"].iloc[0] == round(
        100 * (ref["accuracy"] - private["accuracy"]), 1)
    assert t["no DP minus DP (points)"].iloc[1] == 0.0
    assert list(t["rounds x local steps"]) == ["2 x 3", "2 x 3"]
    # the paper-setting runs (A and B trained) are not the recipe's
    assert REP.recipe_table(df[df["run"] != "ffa_dpsgd_eps2"], "synthetic").empty


def test_communication_table_bytes_match_the_run_files(runs: Path) -> None:
    t = REP.communication(REP.load_runs(runs), "synthetic", paper_rounds=50).set_index(
        "strategy")
    lora = t.loc["LoRA, no DP"]
    clients = pd.read_parquet(runs / "none" / "clients.parquet")
    assert lora["bytes up per upload"] == clients["bytes_up"].iloc[0] == 3584
    # per round: 3 uploads + 3 downloads of the same tensors
    assert lora["bytes per round (up+down)"] == 6 * 3584
    assert lora["total, 50 rounds (x50/2)"] == 50 * 6 * 3584
    assert t.loc["FFA-LoRA (B only), no DP", "bytes up per upload"] == 4 * 384
    assert t.loc["T-FedAvg on LoRA (ternary), no DP", "bytes up per upload"] == 256
    assert t.loc["Vanilla FL (full model), no DP", "bytes up per upload"] == 4 * 33_472
    computed = t.loc["T-FedAvg (full model, ternary), computed", "bytes up per upload"]
    assert 33_472 / 4 < computed < 33_472 / 4 + 4 * 30  # 2 bits per weight + scales


def test_cli_prints_tables_and_writes_the_plot(runs: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    md, png = tmp_path / "t.md", tmp_path / "u.png"
    assert REP.main([str(runs), "--markdown", str(md), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "### communication (fpb)" not in out  # no fpb runs here
    assert "### synthetic" in out and "### runs" in out and md.read_text().strip() == out.strip()
    assert "### synthetic: the DP-SGD private recipe (FFA-LoRA)" in out
    assert png.stat().st_size > 5000
    assert REP.main([str(tmp_path / "empty")]) == 2
