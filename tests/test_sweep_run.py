"""A real (tiny) sweep on the session's Ray: Tune trials, sweep.parquet, a failing trial,
resume after an interruption, and the analysis report of the result."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dplora_ray import results as R
from dplora_ray import tune as S
from dplora_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray

# 2 x 2 trials; privacy.delta=0.5 passes config validation but is rejected at run start
# (delta must be below 1/n) in the private trial: that trial fails, the sweep goes on.
SWEEP = {
    "name": "unit",
    "base": str(ROOT / "configs" / "tiny.yaml"),
    "overrides": {
        "runtime.backend": "inline",
        "runtime.torch_threads": 1,
        "privacy.mode": "dpsgd",
        "federation.rounds": 2,
        "federation.local_steps": 2,
        "data.test_size": 30,
    },
    "space": {
        "privacy.target_epsilon": {"grid": [4, "inf"]},
        "privacy.delta": {"grid": [1e-3, 0.5]},
    },
    "max_concurrent_trials": 2,
    "resources": {"cpu": 1},
}
OK_PRIVATE = "t000_target_epsilon=4_delta=0.001"
FAILS = "t001_target_epsilon=4_delta=0.5"
OK_PUBLIC = "t002_target_epsilon=inf_delta=0.001"


@pytest.fixture(scope="module")
def sweep(
    ray_session: object, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, pd.DataFrame]:
    tmp = tmp_path_factory.mktemp("sweep")
    path = tmp / "unit.yaml"
    path.write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    out = tmp / "out"
    df = S.run_sweep(S.load_sweep(path), out, verbose=0)
    return path, out, df


def test_one_row_per_trial_with_the_schema(sweep: tuple[Path, Path, pd.DataFrame]) -> None:
    _, out, df = sweep

    on_disk = pd.read_parquet(out / S.SWEEP_FILE)

    pd.testing.assert_frame_equal(df, on_disk)
    assert list(df[S.TRIAL]) == [OK_PRIVATE, FAILS, OK_PUBLIC, "t003_target_epsilon=inf_delta=0.5"]
    assert list(df.columns[:3]) == [S.TRIAL, "privacy.target_epsilon", "privacy.delta"]
    assert set(S.SWEEP_COLUMNS) <= set(df.columns)
    assert list(df[S.STATUS]) == ["ok", "error", "ok", "ok"]
    ok = df[df[S.STATUS] == "ok"].set_index(S.TRIAL)
    assert ok[S.ROUNDS_COMPLETED].tolist() == [2, 2, 2]
    assert ok[S.EVAL_ACCURACY].between(0, 1).all()
    assert (ok[S.BYTES_UP] > 0).all() and (ok[S.BYTES_DOWN] > 0).all()
    assert ok.loc[OK_PRIVATE, S.EPSILON] <= 4.0 + 1e-9
    assert ok.loc[OK_PRIVATE, S.NOISE_MULTIPLIER] > 0
    assert ok.loc[OK_PRIVATE, "privacy.mode"] == "dpsgd"
    assert math.isinf(ok.loc[OK_PUBLIC, "privacy.target_epsilon"])
    assert ok.loc[OK_PUBLIC, "privacy.mode"] == "none"
    assert math.isnan(ok.loc[OK_PUBLIC, S.EPSILON])


def test_trials_write_the_train_files_and_tune_stays_in_the_folder(
    sweep: tuple[Path, Path, pd.DataFrame],
) -> None:
    _, out, df = sweep

    for name in (OK_PRIVATE, OK_PUBLIC):
        folder = Path(df.set_index(S.TRIAL).loc[name, S.TRIAL_DIR])
        assert folder == out / "trials" / name
        for f in (
            "config.yaml",
            "rounds.parquet",
            "clients.parquet",
            "summary.json",
            "ledger.json",
            "adapter",
        ):
            assert (folder / f).exists(), f
        assert len(R.load_run(folder)["rounds"]) == 2
    assert (out / "tune" / "run-1").is_dir()
    assert (out / "sweep.yaml").is_file()


def test_failed_trial_is_recorded_with_its_error(sweep: tuple[Path, Path, pd.DataFrame]) -> None:
    _, _, df = sweep

    row = df.set_index(S.TRIAL).loc[FAILS]

    assert row[S.STATUS] == S.STATUS_ERROR
    assert "privacy.delta" in row[S.ERROR] and "must be below 1/n" in row[S.ERROR]
    assert "\n" not in row[S.ERROR]
    assert math.isnan(row[S.EVAL_ACCURACY])


def test_rerun_without_resume_refuses_the_folder(
    sweep: tuple[Path, Path, pd.DataFrame], capsys: pytest.CaptureFixture[str]
) -> None:
    path, out, _ = sweep

    code = main(["sweep", str(path), "--out", str(out), "--quiet"])

    assert code == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_reruns_only_unfinished_and_failed_trials(
    sweep: tuple[Path, Path, pd.DataFrame],
) -> None:
    path, out, _ = sweep
    # Prepare: the state an interruption leaves: OK_PRIVATE half-written and pending
    interrupted = out / "trials" / OK_PRIVATE
    (interrupted / "summary.json").unlink()
    (interrupted / "adapter").rename(interrupted / "adapter-partial")
    table = pd.read_parquet(out / S.SWEEP_FILE)
    table.loc[table[S.TRIAL] == OK_PRIVATE, S.STATUS] = S.STATUS_PENDING
    table.to_parquet(out / S.SWEEP_FILE)
    kept = out / "trials" / OK_PUBLIC / "summary.json"
    kept_mtime = os.stat(kept).st_mtime_ns

    code = main(["sweep", str(path), "--out", str(out), "--resume", "--quiet"])

    df = pd.read_parquet(out / S.SWEEP_FILE).set_index(S.TRIAL)
    assert code == 0
    assert df[S.STATUS].tolist() == ["ok", "error", "ok", "ok"]
    assert (interrupted / "summary.json").is_file()
    # continued from its last round checkpoint (here: all rounds were done), not rerun
    resumed = json.loads((interrupted / "summary.json").read_text())
    assert resumed["resumed_from_round"] == resumed["rounds_completed"] > 0
    assert (interrupted / "adapter" / "adapter_model.safetensors").is_file()
    assert os.stat(kept).st_mtime_ns == kept_mtime  # finished trial not rerun
    assert (out / "tune" / "run-2").is_dir()
    assert {p.name for p in (out / "tune" / "run-2").iterdir() if p.is_dir()} == {OK_PRIVATE, FAILS}


def test_analyze_the_sweep(
    sweep: tuple[Path, Path, pd.DataFrame], capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = sweep

    code = main(["analyze", str(out)])

    assert code == 0
    report = (out / "report.md").read_text()
    assert "## Privacy-utility" in report and "## Communication" in report
    assert FAILS in report and "must be below 1/n" in report
    for name in ("accuracy_vs_epsilon", "accuracy_vs_round", "epsilon_vs_round", "communication"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert f"](plots/{name}.png)" in report
    assert not (out / "plots" / "accuracy_vs_clients.png").exists()  # clients not swept
    assert "report:" in capsys.readouterr().out


def test_trial_with_worker_actors_in_its_placement_group(
    ray_session: object, tmp_path: Path
) -> None:
    doc = {
        "base": str(ROOT / "configs" / "tiny.yaml"),
        "overrides": {
            "runtime.backend": "actors",
            "runtime.num_workers": 2,
            "runtime.cpus_per_worker": 0.5,
            "federation.rounds": 1,
            "data.test_size": 30,
        },
        "space": {"lora.r": [2]},
        "resources": {"cpu": 0.5},
    }
    path = tmp_path / "actors.yaml"
    path.write_text(yaml.safe_dump(doc))
    spec = S.load_sweep(path)
    assert S.trial_resources(spec, S.expand_trials(spec)[0].config) == [{"CPU": 0.5}] * 3

    df = S.run_sweep(spec, tmp_path / "out", verbose=0)

    assert df[S.STATUS].tolist() == ["ok"], df[S.ERROR].tolist()
    clients = R.load_run(df[S.TRIAL_DIR].iloc[0])["clients"]
    assert sorted(clients[R.WORKER].unique()) == [0, 1]  # both worker actors trained
