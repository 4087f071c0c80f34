"""Experiment tracking (issue 21): the ``tracking`` config section, read back with the
tools' own readers (``mlflow.MlflowClient`` on a sqlite store, TensorBoard's
``EventAccumulator``).

* ``train`` with both trackers: one MLflow run with one point per round, the config as
  params, privacy tags equal to ``summary.json``, the adapter as an artifact (never the
  checkpoint); TensorBoard scalars one per round, the config as hyperparameters.
* A run that fails after some rounds and is resumed has exactly one point per round in
  both trackers, in the same MLflow run, even when TensorBoard had a round on disk that
  ``tracking.json`` did not confirm; a finished run resumed with another experiment is
  logged there whole.
* A tracker failing mid-run warns once and the run goes on; ``--resume`` fills the gap.
  Ctrl-C ends the MLflow run ``KILLED``.
* A missing package, a sqlite folder that does not exist, an MLflow server that does not
  answer, or a malformed URI: exit 2, one line naming the key, nothing written.
* A sweep: one MLflow run per trial (Tune's MLflowLoggerCallback on the driver), rounds
  reported to Tune; a resumed sweep reopens the trial's run without duplicating rounds;
  trials that would log to different MLflow experiments are refused before anything.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow  # the tracking extra (make setup installs it)
import pytest
import yaml
from tensorboard.backend.event_processing import event_accumulator

from dplora_ray import results as R
from dplora_ray.cli import main
from dplora_ray.config import load_config
from dplora_ray.errors import ConfigError
from dplora_ray.federated import runner
from dplora_ray.tracking import TRACKING_FILE, check_tracking
from dplora_ray.tracking.sinks import MlflowRun, tag_text

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
ROUNDS = 3
RUN = ("runtime.backend=inline", "privacy.mode=dpsgd", f"federation.rounds={ROUNDS}",
       "federation.local_steps=2", "data.test_size=30", "privacy.noise_seed=5")


def _argv(out: Path, db: Path, *extra: str, experiment: str = "dplora_ray") -> list[str]:
    sets = [*RUN, f"tracking.mlflow_uri=sqlite:///{db}", "tracking.tensorboard=true",
            f"tracking.mlflow_experiment={experiment}", *extra]
    return ["train", str(TINY), "--out", str(out), "--no-progress",
            *[a for s in sets for a in ("--set", s)]]


def _runs(db: Path, experiment: str = "dplora_ray") -> list[Any]:
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _steps(db: Path, run_id: str, key: str) -> list[int]:
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _scalars(out: Path) -> Any:
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """One tracked train run (MLflow's artifacts land under the temp folder)."""
    tmp = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow puts a sqlite store's artifacts in ./mlruns
        assert main(_argv(tmp / "run", tmp / "m.db")) == 0
        yield tmp / "run", tmp / "m.db"


# --------------------------------------------------------------------------- train
def test_mlflow_run_has_every_round_once_params_tags_and_artifacts(
        tracked: tuple[Path, Path]) -> None:
    out, db = tracked
    summary = json.loads((out / "summary.json").read_text())

    runs = _runs(db)

    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    for key in (R.EVAL_ACCURACY, R.EPSILON, R.TRAIN_LOSS, R.BYTES_UP, R.ROUND_SECONDS,
                R.NUM_CLIENTS_COMPLETED):
        assert _steps(db, run.info.run_id, key) == [1, 2, 3], key
    last = mlflow.MlflowClient(f"sqlite:///{db}").get_metric_history(
        run.info.run_id, R.EPSILON)
    assert max(last, key=lambda m: m.step).value == pytest.approx(summary["epsilon"])
    params = run.data.params
    assert params["lora.r"] == "4" and params["federation.rounds"] == str(ROUNDS)
    assert params["privacy.mode"] == "dpsgd" and params["seed"] == "0"
    assert params["lora.target_modules"] == '["q_proj", "v_proj"]'
    assert not any(k.startswith("tracking.") for k in params)
    for key in ("privacy_mode", "privacy_unit", "epsilon"):
        assert run.data.tags[key] == tag_text(summary[key]), key
    assert run.data.tags["privacy_unit"] == "example"
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "summary.json", "config.yaml", "rounds.parquet", "report.md",
            "plots"} <= top
    assert not {"checkpoint.pt", TRACKING_FILE, "clients.parquet"} & top  # the secret stays
    adapter = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter_model.safetensors", "README.md"} <= adapter  # README.md: the model card


def test_tensorboard_has_every_round_once_and_the_config(tracked: tuple[Path, Path]) -> None:
    out, _ = tracked

    acc = _scalars(out)

    for key in (R.EVAL_ACCURACY, R.EPSILON, R.TRAIN_LOSS, R.EVAL_LOSS, R.BYTES_DOWN,
                R.ROUND_SECONDS, R.NUM_CLIENTS_COMPLETED):
        assert [e.step for e in acc.Scalars(key)] == [1, 2, 3], key
    rounds = R.load_run(out)["rounds"]
    assert [e.value for e in acc.Scalars(R.EVAL_ACCURACY)] == pytest.approx(
        rounds[R.EVAL_ACCURACY].tolist())
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    assert "config/text_summary" in acc.Tags()["tensors"]
    state = json.loads((out / TRACKING_FILE).read_text())
    assert state["tensorboard"] == {"rounds": 3, "finished": True}
    assert state["mlflow"]["finished"] is True


# --------------------------------------------------------------------------- resume
def test_failed_then_resumed_run_has_each_round_once_in_both(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: round 3's checkpoint write dies, so rounds 1-2 are kept and logged
    monkeypatch.chdir(tmp_path)
    out, db = tmp_path / "run", tmp_path / "m.db"
    real_save = runner.torch.save

    def dying_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(obj, dict) and obj.get("server_round") == 3:
            raise OSError("disk pulled out")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(runner.torch, "save", dying_save)
    assert main(_argv(out, db)) == 1
    monkeypatch.setattr(runner.torch, "save", real_save)
    (run,) = _runs(db)
    assert run.info.status == "FAILED"
    assert _steps(db, run.info.run_id, R.EVAL_ACCURACY) == [1, 2]
    # a kill between TensorBoard's write of round 2 and tracking.json's record of it
    state = json.loads((out / TRACKING_FILE).read_text())
    assert state["tensorboard"]["rounds"] == 2
    state["tensorboard"]["rounds"] = 1
    (out / TRACKING_FILE).write_text(json.dumps(state))

    # Execute
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0

    # Assert: the same MLflow run, one point per round in each tracker
    (again,) = _runs(db)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    for key in (R.EVAL_ACCURACY, R.EPSILON, R.ROUND_SECONDS):
        assert _steps(db, run.info.run_id, key) == [1, 2, 3], key
        assert [e.step for e in _scalars(out).Scalars(key)] == [1, 2, 3], key
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_round"] == 2
    assert again.data.tags["epsilon"] == tag_text(summary["epsilon"])

    # Execute: the finished run resumed again, now into another experiment
    assert main(["train", "--resume", str(out), "--no-progress", "--set",
                 "tracking.mlflow_experiment=backfill"]) == 0

    # Assert: a whole new run there; the first one untouched
    (filled,) = _runs(db, "backfill")
    assert _steps(db, filled.info.run_id, R.EVAL_ACCURACY) == [1, 2, 3]
    assert filled.info.status == "FINISHED" and "adapter" in {
        a.path for a in mlflow.MlflowClient(f"sqlite:///{db}").list_artifacts(
            filled.info.run_id)}
    assert len(_runs(db)) == 1
    assert [e.step for e in _scalars(out).Scalars(R.EVAL_ACCURACY)] == [1, 2, 3]


def test_mlflow_failing_mid_run_warns_once_and_resume_fills_the_gap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the MLflow store goes away after round 1
    monkeypatch.chdir(tmp_path)
    out, db = tmp_path / "run", tmp_path / "m.db"
    real = MlflowRun.log_round

    def flaky(self: MlflowRun, row: Any) -> bool:
        if int(row[R.SERVER_ROUND]) >= 2:
            raise ConnectionError("server gone")
        return real(self, row)

    monkeypatch.setattr(MlflowRun, "log_round", flaky)

    # Execute
    code = main(_argv(out, db))

    # Assert: the run finished; one warning; TensorBoard unaffected
    err = capsys.readouterr().err
    assert code == 0
    assert err.count("warning: tracking: MLflow failed") == 1 and "server gone" in err
    assert json.loads((out / "summary.json").read_text())["rounds_completed"] == ROUNDS
    (run,) = _runs(db)
    assert _steps(db, run.info.run_id, R.EVAL_ACCURACY) == [1]
    assert [e.step for e in _scalars(out).Scalars(R.EVAL_ACCURACY)] == [1, 2, 3]

    # Execute: resume the finished run once the store is back
    monkeypatch.setattr(MlflowRun, "log_round", real)
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0

    # Assert
    (run,) = _runs(db)
    assert _steps(db, run.info.run_id, R.EVAL_ACCURACY) == [1, 2, 3]
    assert run.info.status == "FINISHED" and run.data.tags["privacy_mode"] == "dpsgd"


def test_ctrl_c_ends_the_mlflow_run_killed(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out, db = tmp_path / "run", tmp_path / "m.db"
    real_save = runner.torch.save

    def interrupted_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(obj, dict) and obj.get("server_round") == 2:
            raise KeyboardInterrupt
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(runner.torch, "save", interrupted_save)

    code = main(_argv(out, db))

    (run,) = _runs(db)
    assert code == 130
    assert run.info.status == "KILLED"
    assert _steps(db, run.info.run_id, R.EVAL_ACCURACY) == [1]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("setting", "missing", "words"), [
    ("tracking.mlflow_uri=sqlite:///{tmp}/m.db", "mlflow", "needs the mlflow package"),
    ("tracking.mlflow_uri=sqlite:///{tmp}/m.db", "alembic", "sqlalchemy and alembic"),
    ("tracking.tensorboard=true", "tensorboardX", "needs the tensorboardX package"),
])
def test_missing_package_is_one_line_naming_the_key_and_the_extra(
        setting: str, missing: str, words: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # not importable
    out = tmp_path / "run"

    code = main(["train", str(TINY), "--out", str(out), "--set",
                 setting.format(tmp=tmp_path)])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert setting.split("=")[0] in err[0] and words in err[0]
    assert "pip install 'dplora-ray[tracking]'" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(("uri", "words"), [
    ("sqlite:///{tmp}/no/such/folder/m.db", "does not exist"),
    ("http://127.0.0.1:9", "no MLflow server answers at 127.0.0.1:9"),
    ("ftp://host/x", "unknown scheme 'ftp'"),
    ("sqlite://", "needs a database file"),
    ("http://:5000", "names no host"),
])
def test_unusable_mlflow_uri_is_refused_before_any_work(
        uri: str, words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"

    code = main(["train", str(TINY), "--out", str(out), "--set",
                 f"tracking.mlflow_uri={uri.format(tmp=tmp_path)}"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("dplora-ray: error: tracking.mlflow_uri=") and words in err[0]
    assert not out.exists()


def test_tracking_keys_load_validate_and_may_change_on_resume(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["tracking.tensorboard=true", "tracking.mlflow_uri=file:./mlruns",
                             "tracking.mlflow_experiment=x"])
    assert (cfg.tracking.tensorboard, cfg.tracking.mlflow_uri,
            cfg.tracking.mlflow_experiment) == (True, "file:./mlruns", "x")
    assert load_config(TINY).tracking.mlflow_uri is None
    with pytest.raises(ConfigError, match="tracking.mlflow_experiment"):
        load_config(TINY, ["tracking.mlflow_experiment= "])
    with pytest.raises(ConfigError, match="did you mean 'tracking.tensorboard'"):
        load_config(TINY, ["tracking.tensorbord=true"])
    check_tracking(cfg.tracking)  # installed here: nothing to refuse

    from dplora_ray.federated.checkpoint import compare_configs

    changed = compare_configs(load_config(TINY), cfg, tmp_path)
    assert [c.split(":")[0] for c in changed] == [
        "tracking.mlflow_experiment", "tracking.mlflow_uri", "tracking.tensorboard"]


# --------------------------------------------------------------------------- sweeps
def test_sweep_refuses_trials_with_different_mlflow_stores_before_writing(
        tmp_path: Path) -> None:
    from dplora_ray import tune as S

    doc = {"base": str(TINY), "space": {"tracking.mlflow_experiment": {"grid": ["a", "b"]}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))

    with pytest.raises(ConfigError, match="tracking.mlflow_experiment='b': differs between"):
        S.run_sweep(S.load_sweep(path), tmp_path / "out", verbose=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_logs_one_mlflow_run_per_trial_and_resumes_without_duplicates(
        ray_session: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dplora_ray import tune as S

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "m.db"
    doc = {
        "name": "tracked",
        "base": str(TINY),
        "overrides": {"runtime.backend": "inline", "runtime.torch_threads": 1,
                      "federation.rounds": 2, "federation.local_steps": 2,
                      "data.test_size": 30, "tracking.mlflow_uri": f"sqlite:///{db}",
                      "tracking.tensorboard": True},
        "space": {"lora.r": {"grid": [2, 4]}},
        "max_concurrent_trials": 2,
        "resources": {"cpu": 1},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "out"

    # Execute
    df = S.run_sweep(S.load_sweep(path), out, verbose=0)

    # Assert: one finished MLflow run per trial, named after it, every round once
    assert df[S.STATUS].tolist() == ["ok", "ok"], df[S.ERROR].tolist()
    names = df[S.TRIAL].tolist()
    runs = {r.info.run_name: r for r in _runs(db)}
    assert sorted(runs) == sorted(names)
    for name in names:
        run = runs[name]
        assert run.info.status == "FINISHED"
        assert _steps(db, run.info.run_id, R.EVAL_ACCURACY) == [1, 2]
        assert _steps(db, run.info.run_id, R.ROUND_SECONDS) == [1, 2]
        assert run.data.tags["privacy_mode"] == "none" and run.data.tags["epsilon"] == "null"
        assert run.data.params["lora.r"] == name.split("=")[-1]
        client = mlflow.MlflowClient(f"sqlite:///{db}")
        assert "adapter" in {a.path for a in client.list_artifacts(run.info.run_id)}
        trial = out / "trials" / name
        assert [e.step for e in _scalars(trial).Scalars(R.EVAL_ACCURACY)] == [1, 2]
        assert not (trial / TRACKING_FILE).exists() or "mlflow" not in json.loads(
            (trial / TRACKING_FILE).read_text())  # the trial's runner logs no MLflow
    # Tune's own TensorBoard logger got the rounds as they came
    tune_tb = event_accumulator.EventAccumulator(str(out / "tune" / "run-1" / names[0]))
    tune_tb.Reload()
    assert [e.step for e in tune_tb.Scalars("ray/tune/round/eval_accuracy")] == [1, 2]

    # Prepare: the first trial interrupted after its last checkpoint (as tests/
    # test_sweep_run.py does it), its MLflow run left running
    first = out / "trials" / names[0]
    (first / "summary.json").unlink()
    table = S.read_sweep(out)
    table.loc[table[S.TRIAL] == names[0], S.STATUS] = S.STATUS_PENDING
    table.to_parquet(out / S.SWEEP_FILE)
    mlflow.MlflowClient(f"sqlite:///{db}").update_run(runs[names[0]].info.run_id,
                                                      status="RUNNING")

    # Execute
    assert main(["sweep", str(path), "--out", str(out), "--resume", "--quiet"]) == 0

    # Assert: the same runs, still one point per round
    again = {r.info.run_name: r for r in _runs(db)}
    assert {n: r.info.run_id for n, r in again.items()} == {
        n: r.info.run_id for n, r in runs.items()}
    for name in names:
        assert again[name].info.status == "FINISHED"
        assert _steps(db, again[name].info.run_id, R.EVAL_ACCURACY) == [1, 2]
    assert [e.step for e in _scalars(first).Scalars(R.EVAL_ACCURACY)] == [1, 2]
