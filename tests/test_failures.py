"""Worker failures and stragglers (``runtime.on_client_failure``, ``round_timeout_s``,
``kill_worker_at_round``).

* ``retry`` on the actors backend: worker 0's process really dies (``os._exit(1)``) when
  it starts its round-2 work; Ray restarts it, the lost client work is re-run with the
  same RNG stream, and the run ends exactly where the run without a failure ends.
* ``drop`` and ``fail`` on the inline backend (the loss is simulated there; the runner's
  handling is the same code): the dropped client is recorded and still charged; ``fail``
  ends the run with exit code 1, one line, the results so far and an error summary, and
  the run can be resumed.
* A client that is not back within ``round_timeout_s`` is dropped and charged.

In every case the ledger equals that of the run without failures: every sampled client is
charged, whether it completed, was retried, dropped or late.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from dplora_ray import results as R
from dplora_ray.cli import main
from dplora_ray.config import load_config
from dplora_ray.federated import runner
from dplora_ray.federated.backends import RuntimeWorker, WorkerLost
from dplora_ray.federated.client import ClientWorker
from dplora_ray.federated.runner import sample_cohorts
from dplora_ray.privacy import PrivacyLedger

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
#: a reproducible noise key: the runs compared with the reference draw its noise
RUN = ("privacy.mode=dpsgd", "federation.rounds=3", "privacy.noise_seed=2")
ROUNDS, PER_ROUND, KILL_AT = 3, 3, 2


def _train(out: Path, *overrides: str) -> int:
    argv = ["train", str(TINY), "--out", str(out), "--no-progress"]
    for o in (*RUN, *overrides):
        argv += ["--set", o]
    return main(argv)


def _clients(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "clients.parquet")


def _ledger(out: Path) -> PrivacyLedger:
    return PrivacyLedger.load(out / "ledger.json")


def _cohort(server_round: int) -> list[int]:
    cfg = load_config(TINY, list(RUN))
    return [int(c) for c in sample_cohorts(cfg)[server_round - 1]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run without any failure."""
    out = tmp_path_factory.mktemp("failures") / "reference"
    assert _train(out, "runtime.backend=inline") == 0
    return out


def test_failure_settings_are_recorded_in_the_config(reference: Path) -> None:
    cfg = load_config(reference / "config.yaml")
    assert cfg.runtime.on_client_failure == "retry"
    assert cfg.runtime.round_timeout_s is None
    assert cfg.runtime.kill_worker_at_round is None


# --------------------------------------------------------------------------- retry (Ray)
@pytest.mark.ray
def test_killed_worker_is_restarted_and_its_clients_retried(
        ray_session: Any, tmp_path: Path, reference: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: before the run ends, wait until the killed worker answers again (it would
    # raise a permanent WorkerLost if Ray had not restarted it)
    out = tmp_path / "retry"
    finish = runner._Run.finish
    answered: list[int] = []

    def finish_after_restart(self: Any) -> Any:
        deadline = time.monotonic() + 120
        while not answered:
            try:
                answered.append(self.backend.get(self.backend.submit(
                    self.backend.workers[0], "ping")))
            except WorkerLost as exc:
                assert not exc.permanent, exc.reason
                assert time.monotonic() < deadline, "worker 0 was not restarted"
                time.sleep(0.25)
        return finish(self)

    monkeypatch.setattr(runner._Run, "finish", finish_after_restart)

    # Execute
    rc = _train(out, "runtime.backend=actors", "runtime.num_workers=2",
                "runtime.cpus_per_worker=0.5", f"runtime.kill_worker_at_round={KILL_AT}",
                "runtime.on_client_failure=retry")

    # Assert: the run completed and says what happened
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"round {KILL_AT}: worker 0 lost while training client" in err
    assert "same RNG stream" in err
    clients, ref_clients = _clients(out), _clients(reference)
    retried = clients[clients[R.STATUS] == "failed_retried"]
    assert len(retried) >= 1
    assert set(retried[R.SERVER_ROUND]) == {KILL_AT}
    assert set(clients[R.STATUS]) <= {"ok", "failed_retried"}
    assert answered == [0]  # Ray restarted worker 0
    # same RNG stream: the retried clients' results, the adapter and every round are
    # those of the run without a failure
    cols = [R.SERVER_ROUND, R.CLIENT_ID, R.TRAIN_LOSS, R.UPDATE_NORM, R.BYTES_UP, R.STEPS]
    pd.testing.assert_frame_equal(clients[cols], ref_clients[cols])
    rounds = pd.read_parquet(out / "rounds.parquet").drop(columns=[R.ROUND_SECONDS])
    ref_rounds = pd.read_parquet(reference / "rounds.parquet").drop(columns=[R.ROUND_SECONDS])
    pd.testing.assert_frame_equal(rounds, ref_rounds)
    adapter = "adapter/adapter_model.safetensors"
    assert (out / adapter).read_bytes() == (reference / adapter).read_bytes()
    # the affected clients were charged exactly once, like everybody else
    assert _ledger(out).entries == _ledger(reference).entries


# --------------------------------------------------------------------------- drop
def test_drop_aggregates_without_the_lost_client_and_still_charges_it(
        tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    out = tmp_path / "drop"

    # Execute
    rc = _train(out, "runtime.backend=inline", f"runtime.kill_worker_at_round={KILL_AT}",
                "runtime.on_client_failure=drop")

    # Assert
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "dropped from the round (runtime.on_client_failure=drop)" in err
    clients = _clients(out)
    dropped = clients[clients[R.STATUS] == "dropped_failure"]
    first = min(_cohort(KILL_AT))  # inline: the round's first job was the one lost
    assert dropped[[R.SERVER_ROUND, R.CLIENT_ID]].values.tolist() == [[KILL_AT, first]]
    assert dropped[R.BYTES_UP].tolist() == [0] and dropped[R.STEPS].tolist() == [0]
    rounds = pd.read_parquet(out / "rounds.parquet")
    assert rounds[R.NUM_CLIENTS_SAMPLED].tolist() == [PER_ROUND] * ROUNDS
    assert rounds[R.NUM_CLIENTS_COMPLETED].tolist() == [3, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "completed" and summary["clients_not_aggregated"] == 1
    ledger = _ledger(out)
    assert ledger.entries == _ledger(reference).entries
    assert any(e.unit == f"client-{first}" and e.server_round == KILL_AT
               for e in ledger.entries)
    # aggregating without it gives another adapter than the reference
    adapter = "adapter/adapter_model.safetensors"
    assert (out / adapter).read_bytes() != (reference / adapter).read_bytes()


# --------------------------------------------------------------------------- fail
def test_fail_ends_the_run_with_an_error_and_the_results_so_far(
        tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    out = tmp_path / "fail"

    # Execute
    rc = _train(out, "runtime.backend=inline", f"runtime.kill_worker_at_round={KILL_AT}",
                "runtime.on_client_failure=fail")

    # Assert: exit 1, one line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith(f"dplora-ray: run failed: round {KILL_AT}: worker 0 lost "
                              "while training client"), err
    assert "Traceback" not in "\n".join(err)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"].startswith(f"error: round {KILL_AT}: worker 0 lost")
    assert summary["rounds_completed"] == KILL_AT - 1
    assert not (out / "adapter").exists()
    rounds = pd.read_parquet(out / "rounds.parquet")
    assert rounds[R.SERVER_ROUND].tolist() == list(range(1, KILL_AT))
    clients = _clients(out)
    last = clients[clients[R.SERVER_ROUND] == KILL_AT]
    assert sorted(last[R.STATUS]) == ["aborted"] * (PER_ROUND - 1) + ["failed"]
    # the failed round's clients were charged
    ref_entries = [e for e in _ledger(reference).entries if e.server_round <= KILL_AT]
    assert list(_ledger(out).entries) == ref_entries

    # Execute: resume with another failure policy (runtime keys may change on resume)
    rc = main(["train", "--resume", str(out), "--no-progress",
               "--set", "runtime.on_client_failure=retry"])

    # Assert: continued from round KILL_AT to the result of the run without failure
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "completed"
    assert summary["resumed_from_round"] == KILL_AT - 1
    adapter = "adapter/adapter_model.safetensors"
    assert (out / adapter).read_bytes() == (reference / adapter).read_bytes()
    assert _ledger(out).entries == _ledger(reference).entries
    clients = _clients(out)
    assert set(clients.loc[clients[R.SERVER_ROUND] == KILL_AT, R.STATUS]) == {
        "ok", "failed_retried"}


# --------------------------------------------------------------------------- timeout
def test_late_clients_are_dropped_and_charged(
        tmp_path: Path, reference: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: in round 1 the first client takes longer than the round may; inline, the
    # clients after it are then not started at all
    slow = min(_cohort(1))
    timeout_s = 3.0
    train_client = ClientWorker.train_client

    def straggler(self: RuntimeWorker, global_state: Any, job: Any) -> Any:
        if job.client_id == slow and job.seed == _seed_of(1, slow):
            time.sleep(timeout_s + 0.5)
        return train_client(self, global_state, job)

    monkeypatch.setattr(ClientWorker, "train_client", straggler)
    out = tmp_path / "timeout"

    # Execute
    rc = _train(out, "runtime.backend=inline", f"runtime.round_timeout_s={timeout_s}")

    # Assert
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"round 1: {timeout_s:g} s are up; dropping {PER_ROUND} late client(s)" in err
    clients = _clients(out)
    first = clients[clients[R.SERVER_ROUND] == 1]
    assert first[R.STATUS].tolist() == ["dropped_timeout"] * PER_ROUND
    assert (clients.loc[clients[R.SERVER_ROUND] > 1, R.STATUS] == "ok").all()
    rounds = pd.read_parquet(out / "rounds.parquet")
    assert rounds[R.NUM_CLIENTS_COMPLETED].tolist() == [0, PER_ROUND, PER_ROUND]
    assert _ledger(out).entries == _ledger(reference).entries


def _seed_of(server_round: int, client_id: int) -> int:
    from dplora_ray.federated.runner import derive_seed

    return derive_seed(load_config(TINY, list(RUN)).seed, 2, server_round, client_id)
