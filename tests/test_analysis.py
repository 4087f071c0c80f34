"""Analysis on hand-made result folders (no training, no Ray): loading with the fixed
schema, privacy-utility and communication tables, curves, plots and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

import analysis
from analysis import tables as T
from dplora_ray import results as R
from dplora_ray import tune as S
from dplora_ray.cli import main
from dplora_ray.config import load_config, save_config
from dplora_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
COHORT = 3
PARAMS_PER_RANK = 112  # LoRA parameters per unit of rank in these fake runs
BASE = 10_000  # fake base-model parameter count


def fake_parameters(model: str) -> int | None:
    return BASE if model == "tiny-llama" else None


def make_run(
    folder: Path,
    *,
    eps: float,
    r: int,
    n: int,
    acc: list[float],
    before: float = 0.3,
    audit: dict[str, object] | None = None,
) -> None:
    """A run folder as `dplora-ray train` writes it: 3 clients per round, every second
    round evaluated except the last, which always is."""
    private = math.isfinite(eps)
    overrides = {
        "lora.r": r,
        "federation.num_clients": n,
        "privacy.mode": "dpsgd" if private else "none",
        "privacy.target_epsilon": eps if private else None,
    }
    folder.mkdir(parents=True)
    save_config(load_config(TINY, overrides), folder / "config.yaml")
    per_client = 4 * PARAMS_PER_RANK * r
    rounds, clients = [], []
    for k, a in enumerate(acc, start=1):
        evaluated = k % 2 == 0 or k == len(acc)
        spent = eps * k / len(acc) if private else None
        rounds.append(
            {
                R.SERVER_ROUND: k,
                R.TRAIN_LOSS: 1.0 / k,
                R.EVAL_LOSS: 1.0 / k if evaluated else None,
                R.EVAL_ACCURACY: a if evaluated else None,
                R.EVAL_F1_MACRO: a / 2 if evaluated else None,
                R.NUM_CLIENTS_SAMPLED: COHORT,
                R.NUM_CLIENTS_COMPLETED: COHORT,
                R.BYTES_UP: COHORT * per_client,
                R.BYTES_DOWN: COHORT * per_client,
                R.ROUND_SECONDS: 1.0,
                R.EPSILON: spent,
                R.EPSILON_MEAN: spent,
                R.NOISE_MULTIPLIER: 1.0 if private else None,
            }
        )
        for c in range(COHORT):
            clients.append(
                {
                    R.SERVER_ROUND: k,
                    R.CLIENT_ID: (k + c) % n,
                    R.WORKER: 0,
                    R.STATUS: "ok",
                    R.NUM_EXAMPLES: 50,
                    R.TRAIN_LOSS: 1.0 / k,
                    R.UPDATE_NORM: 0.5,
                    R.BYTES_UP: per_client,
                    R.BYTES_DOWN: per_client,
                    R.SECONDS: 0.1,
                    R.STEPS: 2,
                    R.SAMPLING_RATE: 0.1,
                    R.EPSILON: spent,
                }
            )
    R.write_rounds(rounds, folder / "rounds.parquet")
    R.write_clients(clients, folder / "clients.parquet")
    R.write_json_atomic(
        {
            "eval_accuracy_before": before,
            "eval_f1_macro_before": before / 2,
            "eval_accuracy": acc[-1],
            "eval_f1_macro": acc[-1] / 2,
            "epsilon": eps if private else None,
            "delta": 1e-3 if private else None,
            "noise_multiplier": 1.0 if private else None,
            "privacy_mode": "dpsgd" if private else "none",
            "rounds_completed": len(acc),
            "rounds_planned": len(acc),
            "stop_reason": "completed",
            "bytes_up_total": len(acc) * COHORT * per_client,
            "bytes_down_total": len(acc) * COHORT * per_client,
            "wall_seconds": 2.0,
            "trainable_parameters": PARAMS_PER_RANK * r,
            "model": "tiny-llama",
            **{k: None for k in R.AUDIT_SUMMARY_KEYS},
            **(audit or {}),
        },
        folder / "summary.json",
    )


GRID = [(eps, r, n) for eps in (1.0, 4.0, math.inf) for r in (2, 4) for n in (4, 8)]


def final_acc(eps: float, r: int, n: int) -> float:
    return round((0.4 if math.isinf(eps) else 0.2 + eps / 20) + r / 100 + n / 1000, 6)


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    """A 12-trial sweep folder (epsilon x rank x clients); the last trial failed and the
    one before it has no folder here (as on a cluster without a shared filesystem)."""
    out = tmp_path / "sweep"
    swept = ["privacy.target_epsilon", "lora.r", "federation.num_clients"]
    rows = []
    for i, (eps, r, n) in enumerate(GRID):
        name = f"t{i:03d}"
        folder = out / "trials" / name
        row = {c: None for c in S.SWEEP_COLUMNS}
        row.update(
            {
                S.TRIAL: name,
                S.STATUS: S.STATUS_OK,
                S.TRIAL_DIR: str(folder),
                "privacy.target_epsilon": eps,
                "lora.r": r,
                "federation.num_clients": n,
                "privacy.mode": "none" if math.isinf(eps) else "dpsgd",
                "model.name": "tiny-llama",
            }
        )
        acc = [0.3, 0.32, 0.35, final_acc(eps, r, n)]
        if i == len(GRID) - 1:
            row.update({S.STATUS: S.STATUS_ERROR, S.ERROR: "RuntimeError: boom"})
        else:
            make_run(folder, eps=eps, r=r, n=n, acc=acc)
            row = S.row_from_summary(row, json.loads((folder / "summary.json").read_text()))
        rows.append(row)
    missing = out / "trials" / f"t{len(GRID) - 2:03d}"
    for f in missing.iterdir():
        f.unlink()
    missing.rmdir()
    pq.write_table(S.sweep_table(rows, swept), out / S.SWEEP_FILE)
    (out / "sweep.yaml").write_text(
        yaml.safe_dump(
            {"sweep": {"space": {k: {"grid": []} for k in swept}}, "trials": []}, sort_keys=False
        )
    )
    return out


def test_load_sweep_with_the_fixed_schema(sweep_dir: Path) -> None:
    res = analysis.load_results(sweep_dir)

    assert res.kind == "sweep"
    assert res.swept == ("privacy.target_epsilon", "lora.r", "federation.num_clients")
    assert len(res.trials) == 12 and len(res.ok) == 11
    assert list(res.trials.columns) == list(pd.read_parquet(sweep_dir / S.SWEEP_FILE).columns)
    assert res.missing == ("t010",)
    assert set(res.rounds[S.TRIAL]) == {f"t{i:03d}" for i in range(10)}
    assert list(res.rounds.columns[: 1 + len(R.ROUND_COLUMNS)]) == [S.TRIAL, *R.ROUND_COLUMNS]
    assert {"lora.r", "privacy.target_epsilon"} <= set(res.rounds.columns)
    assert list(res.clients.columns[1 : 1 + len(R.CLIENT_COLUMNS)]) == list(R.CLIENT_COLUMNS)
    assert len(res.rounds) == 10 * 4 and len(res.clients) == 10 * 4 * COHORT


def test_privacy_utility_table_means_over_the_other_keys(sweep_dir: Path) -> None:
    res = analysis.load_results(sweep_dir)

    table = analysis.privacy_utility_table(res.trials)
    pivot = analysis.privacy_utility_pivot(res.trials)

    row = table[(table["privacy.target_epsilon"] == 1.0) & (table["lora.r"] == 2)].iloc[0]
    expected = np.mean([final_acc(1.0, 2, 4), final_acc(1.0, 2, 8)])
    assert row[T.NUM_TRIALS] == 2
    assert row[T.ACCURACY_MEAN] == pytest.approx(expected)
    assert row[T.ACCURACY_MIN] == pytest.approx(final_acc(1.0, 2, 4))
    assert row[T.EPSILON_MEAN] == pytest.approx(1.0)
    assert list(pivot.index) == [1.0, 4.0, math.inf]  # no DP sorts last
    assert list(pivot.columns) == [2, 4]
    # inf x r=4: t010 (n=4; its folder is missing, the sweep row counts) and t011
    # (n=8, failed: not counted)
    assert pivot.loc[math.inf, 4] == pytest.approx(final_acc(math.inf, 4, 4))
    last = table[(table["privacy.target_epsilon"] == math.inf) & (table["lora.r"] == 4)]
    assert last[T.NUM_TRIALS].item() == 1
    assert last[T.ACCURACY_MEAN].item() == pytest.approx(final_acc(math.inf, 4, 4))
    assert math.isnan(last[T.EPSILON_MEAN].item())


def test_communication_table_against_full_fine_tuning(sweep_dir: Path) -> None:
    res = analysis.load_results(sweep_dir)

    comm = analysis.communication_table(res, fake_parameters).set_index(T.RANK)

    for r in (2, 4):
        per_client = 4 * PARAMS_PER_RANK * r
        assert comm.loc[r, T.LORA_PARAMETERS] == PARAMS_PER_RANK * r
        assert comm.loc[r, T.LORA_BYTES_UP_PER_CLIENT_ROUND] == per_client
        assert comm.loc[r, T.LORA_BYTES_DOWN_PER_CLIENT_ROUND] == per_client
        assert comm.loc[r, T.LORA_BYTES_UP_PER_ROUND] == COHORT * per_client
        assert comm.loc[r, T.FULL_FT_BYTES_PER_CLIENT_ROUND] == 4 * BASE
        assert comm.loc[r, T.LORA_FRACTION] == pytest.approx(per_client / (4 * BASE))
    assert comm.loc[2, T.CLIENT_ROUNDS] == 6 * 4 * COHORT  # 6 readable trials at r=2


def test_accuracy_curves_start_at_round_zero_and_skip_unevaluated_rounds(sweep_dir: Path) -> None:
    res = analysis.load_results(sweep_dir)

    curves = analysis.accuracy_curves(res)

    t0 = curves[curves[S.TRIAL] == "t000"]
    assert t0[T.ROUND].tolist() == [0, 2, 4]
    assert t0[S.EVAL_ACCURACY].tolist() == pytest.approx([0.3, 0.32, final_acc(1.0, 2, 4)])
    assert t0[S.EPSILON].tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert curves[curves[S.TRIAL] == "t008"][S.EPSILON].isna().all()  # no DP


def test_report_for_a_sweep(sweep_dir: Path) -> None:
    report = analysis.write_report(sweep_dir, parameters=fake_parameters)

    text = report.path.read_text()
    names = {p.name for p in report.plots}
    assert report.path == sweep_dir / "report.md"
    assert names == {
        "accuracy_vs_epsilon.png",
        "accuracy_vs_clients.png",
        "accuracy_vs_round.png",
        "epsilon_vs_round.png",
        "communication.png",
    }
    for p in report.plots:
        assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 10_000
        assert f"](plots/{p.name})" in text
    assert "inf (no DP)" in text
    assert "t011`: RuntimeError: boom" in text
    assert "t010" in text and "not readable here" in text
    assert "| tiny-llama | 2 | 224 | 10,000 |" in text


def test_report_for_a_single_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    make_run(run, eps=2.0, r=4, n=6, acc=[0.3, 0.4, 0.5])

    code = main(["analyze", str(run), "--out", str(tmp_path / "rep")])

    assert code == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    for name in ("accuracy_vs_round", "loss_vs_round", "epsilon_vs_round", "communication"):
        assert (tmp_path / "rep" / "plots" / f"{name}.png").is_file()
        assert f"](plots/{name}.png)" in text
    assert "| epsilon spent | 2.000 |" in text
    assert "## Clients" in text
    res = analysis.load_results(run)
    assert res.kind == "run" and len(res.trials) == 1
    assert res.trials.loc[0, S.EVAL_ACCURACY] == 0.5
    assert res.trials.loc[0, "lora.r"] == 4
    assert "report:" in capsys.readouterr().out


def audit_keys(eps: float) -> dict[str, object]:
    """Audit summary keys of a fake audited run: leakage falls as epsilon shrinks."""
    e = 8.0 if math.isinf(eps) else eps
    return {
        R.AUDIT_EXPOSURE_MEAN: 1.5 + e,
        R.AUDIT_EXPOSURE_MAX: 3.0 + e,
        R.AUDIT_MIA_AUC: 0.5 + e / 20,
        R.AUDIT_MIA_TPR_AT_1PCT_FPR: e / 100,
        R.AUDIT_EPSILON_LOWER_BOUND: e / 10,
        R.AUDIT_PASSED: True,
    }


def make_audit_sweep(out: Path, audited: bool) -> Path:
    """A 3-trial sweep over epsilon (1, 4, no DP), audited or not."""
    rows = []
    for i, eps in enumerate((1.0, 4.0, math.inf)):
        name = f"t{i:03d}"
        folder = out / "trials" / name
        make_run(folder, eps=eps, r=4, n=4, acc=[0.3, 0.4],
                 audit=audit_keys(eps) if audited else None)
        row = {c: None for c in S.SWEEP_COLUMNS}
        row.update({S.TRIAL: name, S.TRIAL_DIR: str(folder), "privacy.target_epsilon": eps,
                    "lora.r": 4, "federation.num_clients": 4,
                    "privacy.mode": "none" if math.isinf(eps) else "dpsgd",
                    "model.name": "tiny-llama"})
        rows.append(S.row_from_summary(row, json.loads((folder / "summary.json").read_text())))
    pq.write_table(S.sweep_table(rows, ["privacy.target_epsilon"]), out / S.SWEEP_FILE)
    return out


@pytest.mark.parametrize("audited", [True, False])
def test_report_audit_section_for_a_sweep(tmp_path: Path, audited: bool) -> None:
    sweep = make_audit_sweep(tmp_path / "sweep", audited)

    code = main(["analyze", str(sweep)])

    assert code == 0
    text = (sweep / "report.md").read_text()
    png = sweep / "plots" / "leakage_vs_epsilon.png"
    if audited:
        assert "## Empirical privacy audit" in text
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
        assert "](plots/leakage_vs_epsilon.png)" in text
        # t000: epsilon 1 -> exposure 2.50 / 4.00, AUC 0.550, TPR 0.010, bound 0.100
        assert "| t000 | 1 | 1.000 | 2.50 | 4.00 | 0.550 | 0.010 | 0.100 | True |" in text
        assert "| t002 | inf (no DP) |  | 9.50 | 11.00 | 0.900 |" in text
    else:
        assert "Empirical privacy audit" not in text and not png.exists()


def test_report_audit_table_for_a_single_run(tmp_path: Path) -> None:
    plain, audited = tmp_path / "plain", tmp_path / "audited"
    make_run(plain, eps=2.0, r=4, n=6, acc=[0.3, 0.4])
    make_run(audited, eps=2.0, r=4, n=6, acc=[0.3, 0.4], audit=audit_keys(2.0))

    with_audit = analysis.write_report(audited, parameters=fake_parameters)
    without = analysis.write_report(plain, parameters=fake_parameters)

    text = with_audit.path.read_text()
    assert "## Empirical privacy audit" in text
    assert "| 2 | 2.000 | 3.50 | 5.00 | 0.600 | 0.020 | 0.200 | True |" in text
    assert "Empirical privacy audit" not in without.path.read_text()


def test_not_a_results_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="neither a sweep folder"):
        analysis.load_results(tmp_path)

    assert main(["analyze", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_base_model_parameters_from_the_config_on_the_meta_device() -> None:
    from transformers import AutoConfig

    from dplora_ray.config import ModelConfig
    from dplora_ray.models import prepare_model

    cfg = AutoConfig.from_pretrained(prepare_model(ModelConfig(name="tiny-llama")))
    h, inter, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads
    head = h // cfg.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv * head + 3 * h * inter + 2 * h  # attn, mlp, norms
    expected = cfg.vocab_size * h + cfg.num_hidden_layers * per_layer + h  # tied head

    assert analysis.base_model_parameters("tiny-llama") == expected
    assert analysis.base_model_parameters("someorg/somemodel") is None  # hub offline


def test_private_curve_table_and_plot(sweep_dir: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from analysis.loading import load_results
    from analysis.private_curve import curve_table
    from analysis.private_curve import main as curve_main

    # Execute
    table = curve_table(load_results(sweep_dir))
    code = curve_main([str(sweep_dir), "--plot", str(tmp_path / "curve.png")])

    # Assert: finished trials with a readable folder, sorted by target epsilon
    assert code == 0 and (tmp_path / "curve.png").stat().st_size > 0
    assert list(table["target epsilon"]) == sorted(table["target epsilon"])
    assert len(table) == len(GRID) - 1  # the failed trial is left out
    ref = np.mean([final_acc(e, r, n) for e, r, n in GRID[:-1] if math.isinf(e)])
    row = table.iloc[0]
    assert row["no DP minus DP (points)"] == pytest.approx((ref - row["accuracy"]) * 100)
    # 4 rounds x 3 clients x 2 steps x q 0.1 x 50 examples, where the folder is readable
    readable = table.dropna(subset=["examples processed"])
    assert len(readable) == len(table) - 1 and (readable["examples processed"] == 120).all()
    assert "| target epsilon |" in capsys.readouterr().out
