"""Checkpoint and resume.

* After every round ``checkpoint.pt`` holds the global adapter, the server optimizer's
  state, the ledger, the RNG position (the round: every public stream is derived from the
  seed and the round, every noise stream from the noise key and the round), the noise
  key, the cohort history and the rows so far.
* A crash while the checkpoint is written leaves the previous one intact, and the run
  resumes from it.
* Acceptance: a run on the actors backend killed with SIGKILL in the middle of round 2
  and resumed with ``--resume DIR`` (no CONFIG) ends with the same adapter bytes, the
  same ``rounds.parquet`` / ``clients.parquet`` (timing and worker columns aside) and the
  same ledger as the run that was never interrupted.
* ``--resume`` refuses a config that differs outside ``runtime.*`` (exit 2, one line);
  ``run_experiment(..., resume=True)`` starts a new run in an empty folder and returns
  the summary of a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from dplora_ray import results as R
from dplora_ray.cli import main
from dplora_ray.config import config_to_dict, load_config
from dplora_ray.federated import runner
from dplora_ray.federated.runner import CHECKPOINT_FILE, load_checkpoint, sample_cohorts

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
#: the run of these tests: local DP (a ledger entry per client and round), 6 short
#: rounds, so that however late the poller sees round 1 finish, the kill lands mid-run;
#: a reproducible noise key, so that the reference (another run) draws the same noise
#: (tests/test_noise_key.py resumes runs with secret keys)
RUN = ("privacy.mode=local", "federation.rounds=6", "privacy.noise_seed=3")
ROUNDS = 6


def _argv(out: Path, *overrides: str, config: Path | None = TINY) -> list[str]:
    argv = ["train"] + ([str(config)] if config else []) + ["--out", str(out), "--no-progress"]
    for o in overrides:
        argv += ["--set", o]
    return argv


def _frames(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    rounds = pd.read_parquet(out / "rounds.parquet").drop(columns=[R.ROUND_SECONDS])
    clients = pd.read_parquet(out / "clients.parquet").drop(columns=[R.SECONDS, R.WORKER])
    return rounds, clients


def assert_same_run(out: Path, ref: Path) -> None:
    """Same results (timing and worker columns aside), adapter bytes and ledger."""
    got_rounds, got_clients = _frames(out)
    want_rounds, want_clients = _frames(ref)
    pd.testing.assert_frame_equal(got_rounds, want_rounds)
    pd.testing.assert_frame_equal(got_clients, want_clients)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / "adapter" / name).read_bytes() == (ref / "adapter" / name).read_bytes()
    assert json.loads((out / "ledger.json").read_text()) == json.loads(
        (ref / "ledger.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run (inline: the backend does not change results, see
    tests/test_determinism.py)."""
    out = tmp_path_factory.mktemp("resume") / "reference"
    assert main(_argv(out, *RUN, "runtime.backend=inline")) == 0
    return out


# --------------------------------------------------------------------------- contents
def test_checkpoint_holds_what_a_resume_needs(reference: Path) -> None:
    # Execute
    ck = load_checkpoint(reference)

    # Assert
    assert ck is not None and ck["format"] == "dplora_ray.checkpoint/v3"
    assert ck["noise_key"]["reproducible"] is True and len(ck["noise_key"]["secret"]) == 64
    assert ck["server_round"] == ROUNDS and ck["finished"] is True
    cfg = load_config(reference / "config.yaml")
    assert ck["config"] == config_to_dict(cfg)
    assert ck["rng"]["seed"] == cfg.seed and ck["rng"]["next_round"] == ROUNDS + 1
    assert ck["cohorts"] == [[int(c) for c in co] for co in sample_cohorts(cfg)]
    opt = ck["aggregator"]["server_optimizer"]
    assert opt["name"] == "fedavg" and opt["server_learning_rate"] == 1.0
    state = ck["aggregator"]["global_state"]
    assert len(state) == 8 and all(v.dtype == torch.float32 for v in state.values())
    saved = json.loads((reference / "ledger.json").read_text())
    assert ck["ledger"]["entries"] == saved["entries"]
    assert len(ck["rounds"]) == ROUNDS
    assert len(ck["clients"]) == len(pd.read_parquet(reference / "clients.parquet"))
    assert set(ck["eval_before"]) == {"loss", "accuracy", "f1_macro", "f1_weighted",
                                      "perplexity", "rouge_l"}  # an EvalResult
    assert not list(reference.glob(".*.tmp"))


# --------------------------------------------------------------------------- crash in write
def test_crash_while_writing_the_checkpoint_keeps_the_previous_one(
        tmp_path: Path, reference: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the checkpoint write of round 2 dies half-way through
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if isinstance(obj, dict) and obj.get("server_round") == 2:
            f.write(b"half a checkpoint")
            raise OSError("disk pulled out")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(runner.torch, "save", dying_save)

    # Execute
    with pytest.raises(OSError, match="disk pulled out"):
        runner.run_experiment(load_config(TINY, [*RUN, "runtime.backend=inline"]), out,
                              progress=False)
    monkeypatch.setattr(runner.torch, "save", real_save)
    ck = load_checkpoint(out)
    summary = json.loads((out / "summary.json").read_text())

    # Assert: round 1's checkpoint survived, no temporary file is left, and the folder
    # says it is not complete
    assert ck is not None and ck["server_round"] == 1 and ck["finished"] is False
    assert not list(out.glob(".*.tmp"))
    assert summary["stop_reason"].startswith("error: OSError: disk pulled out")
    assert not (out / "adapter").exists()

    # Execute: resume (CONFIG omitted: read from the folder)
    rc = main(["train", "--resume", str(out), "--no-progress"])

    # Assert
    assert rc == 0
    assert_same_run(out, reference)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "completed" and summary["resumed_from_round"] == 1


# --------------------------------------------------------------------------- SIGKILL
def _processes_marked(mark: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if f"DPLORA_TEST_MARK={mark}".encode() in fh.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _rounds_done(out: Path) -> int:
    try:
        return max(pq.read_table(out / "clients.parquet").column("server_round").to_pylist(),
                   default=0)
    except (OSError, ValueError):  # not there yet
        return 0


@pytest.mark.ray
def test_run_killed_mid_round_resumes_to_the_uninterrupted_result(
        ray_session: Any, tmp_path: Path, reference: Path) -> None:
    # Prepare: the CLI in its own process group, a driver of the session's Ray (its
    # actors die with it), actors backend; every process it starts inherits a marker in
    # its environment, so none can outlive the test
    out = tmp_path / "killed"
    ray_tmp = tempfile.mkdtemp(prefix="/tmp/rk")  # short: Ray's socket paths are limited
    mark = uuid.uuid4().hex
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, DPLORA_TEST_MARK=mark, HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    address = ray_session.get_runtime_context().gcs_address
    argv = [sys.executable, "-m", "dplora_ray", *_argv(
        out, *RUN, "runtime.backend=actors", "runtime.num_workers=2",
        "runtime.cpus_per_worker=0.5", f"runtime.address={address}")]
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Execute: kill the whole group once round 1 is on disk (round 2 is running)
        deadline = time.monotonic() + 300
        while _rounds_done(out) < 1:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        print(f"SIGKILL after {_rounds_done(out)} round(s) on disk")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        # Ray's processes of the killed driver end with it (fate sharing); make sure
        for pid in _processes_marked(mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    killed_at = load_checkpoint(out)
    # the killed driver's actors are gone: Ray gives their CPUs back
    total = ray_session.cluster_resources()["CPU"]
    deadline = time.monotonic() + 60
    while ray_session.available_resources().get("CPU", 0.0) < total:
        assert time.monotonic() < deadline, "the killed run's actors linger"
        time.sleep(0.2)

    # Assert: it really died in the middle of the run
    assert proc.returncode == -signal.SIGKILL
    assert killed_at is not None and 1 <= killed_at["server_round"] < ROUNDS
    assert not killed_at["finished"]
    assert not (out / "summary.json").exists() and not (out / "adapter").exists()

    # Execute: resume in this process (the session's Ray), config read from the folder
    rc = main(["train", "--resume", str(out), "--no-progress"])

    # Assert
    assert rc == 0
    assert_same_run(out, reference)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "completed"
    assert summary["rounds_completed"] == ROUNDS
    assert summary["resumed_from_round"] == killed_at["server_round"]


# --------------------------------------------------------------------------- refusals
def test_resume_refuses_a_different_config(
        tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a copy of the finished run, minus its summary (so it has work to do)
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    before = sorted(p.name for p in out.iterdir())

    # Execute
    rc = main(["train", str(TINY), "--resume", str(out), "--no-progress",
               "--set", "runtime.backend=inline", *sum((["--set", o] for o in RUN), []),
               "--set", "seed=5"])

    # Assert
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1, err
    assert err.startswith("dplora-ray: error: seed=5: differs from the run being resumed")
    assert sorted(p.name for p in out.iterdir()) == before


def test_resume_of_a_finished_run_returns_its_summary(reference: Path, tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    cfg = load_config(out / "config.yaml")

    # Execute
    summary = runner.run_experiment(cfg, out, resume=True, progress=False)

    # Assert: nothing re-run
    assert summary == json.loads((reference / "summary.json").read_text())


def test_resume_in_an_empty_folder_starts_a_new_run(tmp_path: Path) -> None:
    # Prepare (as a sweep does for a trial that never started)
    out = tmp_path / "trial"
    out.mkdir()
    cfg = load_config(TINY, ["runtime.backend=inline", "federation.rounds=1"])

    # Execute
    summary = runner.run_experiment(cfg, out, resume=True, progress=False)

    # Assert
    assert summary["stop_reason"] == "completed" and summary["resumed_from_round"] is None
    assert (out / CHECKPOINT_FILE).is_file()
