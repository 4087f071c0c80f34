"""Sweep files: parsing, validation, trial expansion, resources, sweep.parquet schema.

No Ray here: everything is checked before a sweep starts Ray.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from dplora_ray import tune as S
from dplora_ray.cli import main
from dplora_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def write_sweep(tmp_path: Path, doc: dict, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def test_smoke_sweep_file_expands_to_eight_valid_trials() -> None:
    spec = S.load_sweep(ROOT / "sweeps" / "smoke.yaml")
    trials = S.expand_trials(spec)

    assert spec.base == TINY.resolve()
    assert len(trials) == 8
    assert [t.name for t in trials[:2]] == [
        "t000_target_epsilon=2_r=2_num_clients=4",
        "t001_target_epsilon=2_r=2_num_clients=6",
    ]
    assert {
        (t.params["privacy.target_epsilon"], t.params["lora.r"], t.params["federation.num_clients"])
        for t in trials
    } == {(e, r, n) for e in (2, math.inf) for r in (2, 4) for n in (4, 6)}
    assert all(t.config.runtime.backend == "inline" for t in trials)


def test_inf_epsilon_means_no_privacy() -> None:
    trials = S.expand_trials(S.load_sweep(ROOT / "sweeps" / "smoke.yaml"))

    private = [t for t in trials if math.isfinite(t.params["privacy.target_epsilon"])]
    public = [t for t in trials if math.isinf(t.params["privacy.target_epsilon"])]

    assert len(public) == 4
    for t in public:
        assert t.config.privacy.mode == "none"
        assert t.config.privacy.target_epsilon is None
        assert S.config_value(t.config, "privacy.target_epsilon") == math.inf
    for t in private:
        assert t.config.privacy.mode == "dpsgd"
        assert t.config.privacy.target_epsilon == 2.0


def test_privacy_budget_sweep_is_valid_and_reserves_worker_bundles() -> None:
    spec = S.load_sweep(ROOT / "sweeps" / "privacy_budget.yaml")
    trials = S.expand_trials(spec)

    assert len(trials) == 6 * 3 * 3
    assert {t.config.model.name for t in trials} == {"smollm2-135m"}
    assert {t.params["lora.r"] for t in trials} == {4, 8, 16}
    assert {t.params["federation.num_clients"] for t in trials} == {5, 10, 20}
    assert sum(t.config.privacy.mode == "none" for t in trials) == 9
    assert S.trial_resources(spec, trials[0].config) == [{"CPU": 1.0}] * 3


def test_random_distributions_are_seeded_and_in_range(tmp_path: Path) -> None:
    doc = {
        "base": str(TINY),
        "seed": 7,
        "num_samples": 3,
        "space": {
            "lora.r": [2, 4],
            "federation.learning_rate": {"loguniform": [1e-3, 1e-1]},
            "lora.dropout": {"uniform": [0.0, 0.2]},
            "federation.local_steps": {"randint": [1, 4]},
            "seed": {"choice": [0, 1, 2]},
        },
    }
    path = write_sweep(tmp_path, doc)

    a = S.expand_trials(S.load_sweep(path))
    b = S.expand_trials(S.load_sweep(path))

    assert len(a) == 2 * 3
    assert [t.params for t in a] == [t.params for t in b]
    assert [t.params["lora.r"] for t in a] == [2, 2, 2, 4, 4, 4]
    for t in a:
        assert 1e-3 <= t.config.federation.learning_rate <= 1e-1
        assert 0.0 <= t.config.lora.dropout <= 0.2
        assert t.config.federation.local_steps in (1, 2, 3)
        assert t.config.seed in (0, 1, 2)
    assert len({t.params["federation.learning_rate"] for t in a}) == 6
    assert len({t.name for t in a}) == 6


def test_base_path_is_relative_to_the_sweep_file(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text(TINY.read_text())
    (tmp_path / "sweeps").mkdir()
    path = write_sweep(
        tmp_path / "sweeps", {"base": "../configs/base.yaml", "space": {"lora.r": [2]}}
    )

    spec = S.load_sweep(path)

    assert spec.base == (tmp_path / "configs" / "base.yaml").resolve()


@pytest.mark.parametrize(
    ("doc", "key", "words"),
    [
        ({"base": str(TINY), "spaces": {"lora.r": [2]}}, "spaces", "did you mean 'space'"),
        ({"base": str(TINY), "space": {"lora.rank": [2]}}, "lora.rank", "unknown key"),
        (
            {"base": str(TINY), "space": {"lora.r": {"gird": [2]}}},
            "space.lora.r",
            "unknown distribution",
        ),
        ({"base": str(TINY), "space": {"lora.r": [0, 2]}}, "lora.r", "trial t000_r=0"),
        (
            {"base": str(TINY), "space": {"privacy.delta": {"uniform": [0.1]}}},
            "space.privacy.delta",
            "[low, high]",
        ),
        (
            {"base": str(TINY), "space": {"lora.r": [2]}, "resources": {"tpu": 1}},
            "resources.tpu",
            "unknown resource",
        ),
        ({"base": "nope.yaml", "space": {"lora.r": [2]}}, "base", "no such file"),
        (
            {"base": str(TINY), "overrides": {"lora.r": 2}, "space": {"lora.r": [4]}},
            "space.lora.r",
            "also a fixed override",
        ),
        ({"base": str(TINY), "max_concurrent_trials": 0}, "max_concurrent_trials", ">= 1"),
    ],
)
def test_bad_sweep_files_name_the_key(tmp_path: Path, doc: dict, key: str, words: str) -> None:
    path = write_sweep(tmp_path, doc)

    with pytest.raises(ConfigError) as info:
        S.expand_trials(S.load_sweep(path))

    assert info.value.key == key
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_bad_sweep_exits_2_with_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_sweep(tmp_path, {"base": str(TINY), "space": {"lora.rr": [2, 4]}})
    out = tmp_path / "out"

    code = main(["sweep", str(path), "--out", str(out)])

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "lora.rr" in err and "did you mean 'lora.r'" in err
    assert not out.exists()


def test_cli_validate_lists_trials(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sweep", str(ROOT / "sweeps" / "smoke.yaml"), "--validate"])

    out = capsys.readouterr().out
    assert code == 0
    assert "8 trial(s)" in out and "t007_target_epsilon=inf_r=4_num_clients=6" in out


def test_actor_trials_reserve_fractional_worker_bundles(tmp_path: Path) -> None:
    path = write_sweep(
        tmp_path,
        {
            "base": str(TINY),
            "resources": {"cpu": 0.5, "gpu": 0.25},
            "overrides": {
                "runtime.backend": "actors",
                "runtime.num_workers": 3,
                "runtime.cpus_per_worker": 0.5,
                "runtime.gpus_per_worker": 0.5,
            },
            "space": {"lora.r": [2]},
        },
    )
    spec = S.load_sweep(path)
    (trial,) = S.expand_trials(spec)

    bundles = S.trial_resources(spec, trial.config)

    assert bundles == [{"CPU": 0.5, "GPU": 0.25}] + [{"CPU": 0.5, "GPU": 0.5}] * 3


def test_inline_trials_reserve_one_bundle(tmp_path: Path) -> None:
    path = write_sweep(
        tmp_path,
        {"base": str(TINY), "overrides": {"runtime.backend": "inline"}, "space": {"lora.r": [2]}},
    )
    spec = S.load_sweep(path)

    assert S.trial_resources(spec, S.expand_trials(spec)[0].config) == [{"CPU": 1.0}]


def test_sweep_table_schema(tmp_path: Path) -> None:
    spec = S.load_sweep(ROOT / "sweeps" / "smoke.yaml")
    trials = S.expand_trials(spec)
    swept = [p.key for p in spec.space]
    rows = []
    for t in trials[:2]:
        base = {c: None for c in S.SWEEP_COLUMNS}
        base.update({S.TRIAL: t.name, S.STATUS: S.STATUS_PENDING, S.TRIAL_DIR: "x"})
        base.update({k: S.config_value(t.config, k) for k in [*swept, *S.CONTEXT_KEYS]})
        rows.append(base)
    summary = {
        "eval_accuracy": 0.5,
        "eval_f1_macro": 0.4,
        "eval_accuracy_before": 0.3,
        "epsilon": 1.9,
        "delta": 1e-3,
        "noise_multiplier": 1.1,
        "bytes_up_total": 100,
        "bytes_down_total": 200,
        "rounds_completed": 3,
        "rounds_planned": 3,
        "stop_reason": "completed",
        "trainable_parameters": 10,
        "wall_seconds": 1.5,
    }
    rows[0] = S.row_from_summary(rows[0], summary)
    rows[1][S.STATUS] = S.STATUS_ERROR
    rows[1][S.ERROR] = "privacy.delta=0.5: must be below 1/n"
    pq.write_table(S.sweep_table(rows, swept), tmp_path / S.SWEEP_FILE)

    df = pd.read_parquet(tmp_path / S.SWEEP_FILE)

    assert list(df.columns) == [
        S.TRIAL,
        *swept,
        "privacy.mode",
        "model.name",
        *[c for c in S.SWEEP_COLUMNS if c != S.TRIAL],
    ]
    for col in (
        "trial",
        "status",
        "error",
        "eval_accuracy",
        "eval_f1_macro",
        "epsilon",
        "delta",
        "noise_multiplier",
        "bytes_up",
        "bytes_down",
        "rounds_completed",
        "wall_seconds",
        "trial_dir",
    ):
        assert col in S.SWEEP_COLUMNS
    assert str(df["bytes_up"].dtype) == "int64" or df["bytes_up"].isna().any()
    assert df["eval_accuracy"].dtype == "float64"
    assert df["privacy.target_epsilon"].dtype == "float64"
    assert df.loc[0, S.STATUS] == "ok" and df.loc[0, S.BYTES_UP] == 100
    assert df.loc[1, S.STATUS] == "error" and "privacy.delta" in df.loc[1, S.ERROR]
    assert math.isnan(df.loc[1, S.EVAL_ACCURACY])


def test_trial_outcomes_ok_error_or_still_pending() -> None:
    base = {c: None for c in S.SWEEP_COLUMNS} | {S.TRIAL: "t000", S.STATUS: S.STATUS_PENDING}
    summary = {"eval_accuracy": 0.5, "rounds_completed": 2, "stop_reason": "completed"}

    ok = S._row_from_result(base, {"summary_json": json.dumps(summary)}, None)
    failed = S._row_from_result(base, {}, S.SweepTrialError("privacy.delta=0.5: too big"))
    interrupted = S._row_from_result(base, {}, None)

    assert (ok[S.STATUS], ok[S.EVAL_ACCURACY], ok[S.ROUNDS_COMPLETED]) == ("ok", 0.5, 2)
    assert (failed[S.STATUS], failed[S.ERROR]) == ("error", "privacy.delta=0.5: too big")
    assert (interrupted[S.STATUS], interrupted[S.ERROR]) == ("pending", None)


def test_only_runs_that_finished_count_as_finished(tmp_path: Path) -> None:
    done, failed, empty = tmp_path / "done", tmp_path / "failed", tmp_path / "empty"
    for d in (done, failed, empty):
        d.mkdir()
    (done / "summary.json").write_text(json.dumps({"stop_reason": "privacy_budget"}))
    (failed / "summary.json").write_text(json.dumps({"stop_reason": "error: worker died"}))

    assert S._finished_summary(done) == {"stop_reason": "privacy_budget"}
    assert S._finished_summary(failed) is None
    assert S._finished_summary(empty) is None
