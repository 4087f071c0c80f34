"""The paper's reproduction sweeps (issue 7): ``cases`` (settings that go together,
crossed with the grid), ``--set`` overrides from the command line, and every
``sweeps/paper_*.yaml`` run end to end on the tiny model through Ray Tune (each trial
shortened with ``--set``), one sweep.parquet row per trial with the metrics of its task
type.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dplora_ray import tune as S
from dplora_ray.cli import main
from dplora_ray.errors import ConfigError
from dplora_ray.federated.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TINY = ROOT / "configs" / "tiny.yaml"
EPSILONS = [1.0, 2.0, 4.0, 8.0, math.inf]

# what turns a paper sweep into a seconds-long tiny one (every trial, every case)
TINY_SET = [
    "model.name=tiny-llama", "model.max_length=48", "lora.r=2",
    "federation.rounds=1", "federation.local_steps=1", "federation.eval_every=1",
    "data.test_size=12", "data.max_train_examples=80", "data.max_new_tokens=4",
    "privacy.delta=1e-3", "runtime.backend=inline", "runtime.torch_threads=1",
]


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ---------------------------------------------------------------- cases and --set


def test_cases_are_crossed_with_the_grid_and_become_columns(tmp_path: Path) -> None:
    spec = S.load_sweep(_write(tmp_path, {
        "base": str(TINY),
        "overrides": {"privacy.mode": "dpsgd"},
        "cases": [{"data.test_size": 30, "lora.r": 2}, {"data.test_size": 45}],
        "space": {"privacy.target_epsilon": [2, "inf"]},
    }))
    trials = S.expand_trials(spec)
    assert [(t.config.data.test_size, t.config.lora.r, t.config.privacy.enabled)
            for t in trials] == [(30, 2, True), (30, 2, False), (45, 4, True), (45, 4, False)]
    assert spec.swept == ["data.test_size", "lora.r", "privacy.target_epsilon"]
    assert len({t.name for t in trials}) == 4


@pytest.mark.parametrize(("doc", "key", "words"), [
    ({"cases": {"lora.r": 2}}, "cases", "non-empty list"),
    ({"cases": [{}]}, "cases[0]", "non-empty mapping"),
    ({"cases": [{"lora.r": 2}], "overrides": {"lora.r": 4}}, "cases[0].lora.r",
     "also a fixed override"),
    ({"cases": [{"lora.r": 2}], "space": {"lora.r": [4]}}, "cases[0].lora.r",
     "also swept in space"),
    ({"cases": [{"lora.rr": 2}]}, "lora.rr", "did you mean"),
])
def test_bad_cases_name_the_key(tmp_path: Path, doc: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        S.expand_trials(S.load_sweep(_write(tmp_path, {"base": str(TINY), **doc})))
    assert info.value.key == key and words in str(info.value)


def test_cli_set_overrides_every_trial_but_not_swept_keys(tmp_path: Path) -> None:
    spec = S.load_sweep(_write(tmp_path, {
        "base": str(TINY),
        "overrides": {"federation.rounds": 7},
        "cases": [{"data.test_size": 30}, {"data.test_size": 45, "lora.r": 2}],
        "space": {"privacy.target_epsilon": [2]},
    }))
    got = S.with_cli_overrides(spec, ["federation.rounds=2", "data.test_size=15"])
    trials = S.expand_trials(got)
    assert [(t.config.federation.rounds, t.config.data.test_size, t.config.lora.r)
            for t in trials] == [(2, 15, 4), (2, 15, 2)]
    with pytest.raises(ConfigError) as info:
        S.with_cli_overrides(spec, ["privacy.target_epsilon=3"])
    assert info.value.key == "--set privacy.target_epsilon"
    with pytest.raises(ConfigError):
        S.with_cli_overrides(spec, ["no-equals-sign"])


def test_cli_set_bad_value_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sweep", str(ROOT / "sweeps" / "paper_general.yaml"), "--validate",
                 "--set", "federation.rounds=0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "federation.rounds" in err


# ------------------------------------------------------------- the paper's sweeps


@pytest.mark.parametrize(("name", "trials"), [
    ("paper_finance", 10), ("paper_medical", 10), ("paper_general", 5)])
def test_paper_sweep_files_validate(name: str, trials: int) -> None:
    spec = S.load_sweep(ROOT / "sweeps" / f"{name}.yaml")
    expanded = S.expand_trials(spec)
    assert len(expanded) == trials
    cfgs = [t.config for t in expanded]
    assert {c.federation.num_clients for c in cfgs} == {5}
    assert {c.federation.rounds for c in cfgs} == {50}
    assert {c.federation.batch_size for c in cfgs} == {8}
    assert {c.federation.learning_rate for c in cfgs} == {5e-4}
    assert {c.privacy.clipping_norm for c in cfgs} == {10.0}
    eps = sorted({S.config_value(c, "privacy.target_epsilon") for c in cfgs})
    assert eps == EPSILONS
    assert {c.privacy.mode for c in cfgs} == {"paper", "none"}


@pytest.mark.ray
@pytest.mark.usefixtures("shared_data")  # fails (never skips) without ../shared/data
@pytest.mark.parametrize("name", ["paper_finance", "paper_medical", "paper_general"])
def test_paper_sweep_runs_on_the_tiny_model(
    name: str, ray_session: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setenv("DPLORA_DATA_DIR", str(DATA))
    spec = S.with_cli_overrides(S.load_sweep(ROOT / "sweeps" / f"{name}.yaml"), TINY_SET)
    spec = S.SweepSpec(**{**spec.__dict__, "max_concurrent_trials": 2})

    # Execute
    df = S.run_sweep(spec, tmp_path / "out", verbose=0)

    # Assert: every trial ran, epsilon within its target, the task's metrics filled
    assert (df[S.STATUS] == S.STATUS_OK).all(), df[[S.TRIAL, S.ERROR]].to_string()
    assert len(df) == len(S.expand_trials(spec))
    for rec in df.to_dict("records"):
        target = rec["privacy.target_epsilon"]
        if math.isinf(target):
            assert rec[S.EPSILON] is None or math.isnan(rec[S.EPSILON])
        else:
            assert 0 < rec[S.EPSILON] <= target * (1 + 1e-9)
        summary = pd.read_json(Path(rec[S.TRIAL_DIR]) / "summary.json", typ="series")
        if summary["task_type"] == "generation":
            assert rec["eval_perplexity"] > 1.0 and 0.0 <= rec["eval_rouge_l"] <= 1.0
        else:
            assert 0.0 <= rec[S.EVAL_ACCURACY] <= 1.0
    if name == "paper_medical":
        assert set(df["data.recipe"]) == {"pubmedqa", "medquad"}
    # every private trial drew its own secret noise key (issue 12): no two adapters of the
    # sweep share a noise stream
    keys = [load_checkpoint(Path(d))["noise_key"] for d in df[S.TRIAL_DIR]]
    private = [k for k in keys if k is not None]
    assert len(private) == int((~df["privacy.target_epsilon"].map(math.isinf)).sum()) >= 2
    assert not any(k["reproducible"] for k in private)
    assert len({k["secret"] for k in private}) == len(private)
    assert not df["noise_reproducible"].fillna(False).any()
