"""Output folders under bad conditions (issue 15, classes 2 to 4).

* ``--overwrite`` (train and sweep) deletes only what a run (a sweep) writes, and refuses
  a folder that holds anything else (exit 2, one line naming the foreign files, the folder
  exactly as it was).
* Resume trusts nothing that changed underneath it: the checkpoint holds fingerprints of
  the encoded training data, the test split and the client partition, and a mismatch is
  refused (exit 2, one line naming what changed); a v2 checkpoint (no fingerprint) is
  refused with a clear line unless the run is finished and complete; a finished run whose
  result files were deleted gets them back, equal to what they were.
* The output location is checked first: an ``--out`` that cannot be created or written
  fails with exit 2 and one line before any model or data is loaded, and leaves nothing
  behind; a write that fails during the run (a full disk) ends with one line (exit 1), no
  temporary files, the finished rounds kept and resumable to the uninterrupted result.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml

from dplora_ray import results as R
from dplora_ray.cli import main
from dplora_ray.federated import planning, runner
from dplora_ray.federated.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from dplora_ray.outputs import RUN_OUTPUTS, SWEEP_OUTPUTS
from dplora_ray.sweeps.folder import PLAN_FILE, prepare_sweep
from dplora_ray.sweeps.spec import load_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
#: local DP (a ledger entry per client and round), 2 rounds, reproducible noise so that
#: a failed-then-resumed run can be compared with the uninterrupted reference
RUN = ("privacy.mode=local", "federation.rounds=2", "privacy.noise_seed=3")
INLINE = "runtime.backend=inline"
ENOSPC_TEXT = "OSError: [Errno 28] No space left on device"


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _train(out: Path, *overrides: str, config: str = TINY, extra: tuple[str, ...] = ()) -> int:
    return main(["train", config, "--out", str(out), "--no-progress", *extra,
                 *_sets(*overrides)])


def _resume(out: Path, *overrides: str) -> int:
    return main(["train", "--resume", str(out), "--no-progress", *_sets(*overrides)])


def _snapshot(folder: Path) -> dict[str, Any]:
    """Every entry under ``folder``: a file's bytes, a folder's marker."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else "<dir>")
            for p in sorted(folder.rglob("*"))}


def _one_error_line(err: str) -> str:
    """The only line of ``err`` (exactly one line, no traceback)."""
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err.rstrip("\n")


def _frames(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    rounds = pd.read_parquet(out / "rounds.parquet").drop(columns=[R.ROUND_SECONDS])
    clients = pd.read_parquet(out / "clients.parquet").drop(columns=[R.SECONDS, R.WORKER])
    return rounds, clients


def _assert_same_run(out: Path, ref: Path) -> None:
    """Same results (timing and worker columns aside), adapter bytes and ledger."""
    for got, want in zip(_frames(out), _frames(ref)):
        pd.testing.assert_frame_equal(got, want)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / "adapter" / name).read_bytes() == (ref / "adapter" / name).read_bytes()
    assert (json.loads((out / "ledger.json").read_text())
            == json.loads((ref / "ledger.json").read_text()))


def _no_temp_files(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (inline): the reference of every test here."""
    out = tmp_path_factory.mktemp("robust") / "finished"
    assert _train(out, *RUN, INLINE) == 0
    return out


@pytest.fixture
def copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the run gets as far as loading data or models."""
    def loaded(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("data and model were loaded before the refusal")

    monkeypatch.setattr(runner, "plan_run", loaded)


# =========================================================================== class 2
@pytest.mark.parametrize(("foreign", "listed"), [
    ({"data.csv": "text,label\n", "my.yaml": "seed: 1\n"}, "data.csv, my.yaml"),
    ({"notes/todo.txt": "mine"}, "notes"),
    ({".notes.tmp": "mine", ".checkpoint.pt.ab12.tmp": "ours"}, ".notes.tmp"),
    ({f"f{i:02d}.txt": "x" for i in range(10)},
     "f00.txt, f01.txt, f02.txt, f03.txt, f04.txt, f05.txt, f06.txt, f07.txt and 2 more"),
], ids=["files", "a-subfolder", "a-hidden-tmp-file", "many"])
def test_train_overwrite_refuses_a_folder_with_foreign_files(
        copy: Path, capsys: pytest.CaptureFixture[str], no_loading: None,
        foreign: dict[str, str], listed: str) -> None:
    # Prepare: a finished run's folder plus the user's own files
    for name, text in foreign.items():
        (copy / name).parent.mkdir(exist_ok=True)
        (copy / name).write_text(text)
    before = _snapshot(copy)

    # Execute
    rc = _train(copy, *RUN, INLINE, extra=("--overwrite",))

    # Assert
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert line == (f"dplora-ray: error: --overwrite=True: {str(copy)!r} holds files this run "
                    f"did not write: {listed}; move them or pick a new folder")
    assert _snapshot(copy) == before


def test_train_overwrite_refuses_when_the_config_lives_in_the_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_loading: None) -> None:
    # Prepare: the user keeps the experiment's config in the output folder
    out = tmp_path / "exp"
    out.mkdir()
    config = out / "exp.yaml"
    shutil.copy(TINY, config)
    before = _snapshot(out)

    # Execute
    rc = _train(out, INLINE, config=str(config), extra=("--overwrite",))

    # Assert
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith(f"dplora-ray: error: --overwrite=True: {str(out)!r} holds files "
                           "this run did not write: exp.yaml;")
    assert _snapshot(out) == before


def test_train_overwrite_replaces_only_a_runs_outputs(copy: Path) -> None:
    # Prepare: an earlier run with its analysis report and a temporary file left by a kill
    (copy / "report.md").write_text("# old report\n")
    (copy / "plots").mkdir()
    (copy / "plots" / "accuracy.png").write_bytes(b"png")
    (copy / ".rounds.parquet.x1y2.tmp").write_bytes(b"half")
    inode = copy.stat().st_ino

    # Execute: a different run (one round) over it
    rc = _train(copy, *RUN, INLINE, "federation.rounds=1", extra=("--overwrite",))

    # Assert: the folder itself stays, holds the new run and nothing of the old one
    assert rc == 0
    assert copy.stat().st_ino == inode
    assert sorted(p.name for p in copy.iterdir()) == sorted(
        ["adapter", "checkpoint.pt", "clients.parquet", "config.yaml", "ledger.json",
         "rounds.parquet", "summary.json"])
    assert len(pd.read_parquet(copy / "rounds.parquet")) == 1
    assert json.loads((copy / "summary.json").read_text())["rounds_planned"] == 1


def test_everything_a_run_and_its_report_write_is_listed(copy: Path) -> None:
    # Execute: the analysis report is written into the run folder too
    assert main(["analyze", str(copy)]) == 0

    # Assert: --overwrite knows every entry (else it would refuse its own folders)
    names = {p.name for p in copy.iterdir()}
    assert {"report.md", "plots", "adapter", "checkpoint.pt"} <= names
    assert names <= RUN_OUTPUTS


def _sweep_file(tmp_path: Path) -> Path:
    path = tmp_path / "unit.yaml"
    path.write_text(yaml.safe_dump({
        "name": "unit", "base": TINY,
        "overrides": {"runtime.backend": "inline", "federation.rounds": 1},
        "space": {"lora.r": {"grid": [2, 4]}},
    }, sort_keys=False))
    return path


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the sweep gets as far as starting Ray."""
    from dplora_ray import tune

    def started(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("Ray was started before the refusal")

    monkeypatch.setattr(tune, "start_ray", started)


def test_sweep_overwrite_refuses_a_folder_with_foreign_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: None) -> None:
    # Prepare: an earlier sweep's folder, plus the user's data file
    sweep = _sweep_file(tmp_path)
    out = tmp_path / "sweep"
    (out / "trials" / "t000").mkdir(parents=True)
    (out / PLAN_FILE).write_text("sweep: {}\n")
    (out / "data.csv").write_text("text,label\n")
    before = _snapshot(out)

    # Execute
    rc = main(["sweep", str(sweep), "--out", str(out), "--overwrite", "--quiet"])

    # Assert
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert line == (f"dplora-ray: error: --overwrite=True: {str(out)!r} holds files this sweep "
                    "did not write: data.csv; move them or pick a new folder")
    assert _snapshot(out) == before


def test_sweep_overwrite_replaces_only_a_sweeps_outputs(tmp_path: Path) -> None:
    # Prepare: every kind of entry an earlier sweep leaves
    spec = load_sweep(_sweep_file(tmp_path))
    out = tmp_path / "sweep"
    (out / "trials" / "old_trial").mkdir(parents=True)
    (out / "trials" / "old_trial" / "summary.json").write_text("{}")
    (out / "tune" / "run-1").mkdir(parents=True)
    (out / PLAN_FILE).write_text("sweep: {}\n")
    (out / "sweep.parquet").write_bytes(b"old")
    (out / "report.md").write_text("old")
    (out / ".sweep.parquet.ab12.tmp").write_bytes(b"half")
    inode = out.stat().st_ino

    # Execute (no Ray: only the folder is prepared)
    run = prepare_sweep(spec, out, overwrite=True)

    # Assert
    assert out.stat().st_ino == inode
    assert sorted(p.name for p in out.iterdir()) == ["sweep.parquet", "sweep.yaml", "trials"]
    assert list((out / "trials").iterdir()) == []
    assert [t.name for t in run.todo] == ["t000_r=2", "t001_r=4"]
    assert {p.name for p in out.iterdir()} <= SWEEP_OUTPUTS


# =========================================================================== class 3
def _edit_checkpoint(out: Path, **changes: Any) -> None:
    ck = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    for key, value in changes.items():
        if value is None:
            del ck[key]
        else:
            ck[key] = value(ck[key]) if callable(value) else value
    torch.save(ck, out / "checkpoint.pt")


def test_checkpoint_holds_the_data_fingerprint(finished: Path) -> None:
    ck = load_checkpoint(finished)
    plan = planning.plan_run(_config(finished))

    assert ck is not None and ck["format"] == CHECKPOINT_FORMAT == "dplora_ray.checkpoint/v3"
    assert ck["data_fingerprint"] == plan.fingerprint
    assert set(plan.fingerprint) == {"train", "test", "partition"}
    assert all(len(v) == 32 and int(v, 16) >= 0 for v in plan.fingerprint.values())
    assert len(set(plan.fingerprint.values())) == 3


def _config(out: Path) -> Any:
    from dplora_ray.config import load_config

    return load_config(out / "config.yaml")


@pytest.mark.parametrize(("part", "expected"), [
    ("train", "data.recipe='synthetic': the training data changed since the run started "
              "(fingerprint train 000000000000 -> "),
    ("test", "data.recipe='synthetic': the test split changed since the run started "
             "(fingerprint test 000000000000 -> "),
    ("partition", "federation.partition='iid': the client partition changed since the run "
                  "started (fingerprint partition 000000000000 -> "),
])
def test_resume_refuses_data_that_changed(
        copy: Path, capsys: pytest.CaptureFixture[str], part: str, expected: str) -> None:
    # Prepare: the run has work left (no summary), and its checkpoint was made on other data
    _edit_checkpoint(copy, data_fingerprint=lambda fp: {**fp, part: "0" * 32})
    (copy / "summary.json").unlink()
    before = _snapshot(copy)

    # Execute
    rc = _resume(copy)

    # Assert
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith(f"dplora-ray: error: {expected}"), line
    assert line.endswith("; resume needs the same data")
    assert _snapshot(copy) == before


def test_resume_refuses_a_data_file_edited_since_the_run_started(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a run on a CSV file, stopped after round 1 (its worker died under `fail`)
    csv = tmp_path / "data.csv"
    words = [("great", "positive"), ("awful", "negative"), ("okay", "neutral")]
    csv.write_text("text,label\n" + "".join(
        f"review number {i} was {words[i % 3][0]},{words[i % 3][1]}\n" for i in range(150)))
    out = tmp_path / "run"
    over = (INLINE, "data.recipe=custom", f"data.path={csv}", "federation.rounds=2",
            "runtime.on_client_failure=fail", "runtime.kill_worker_at_round=2")
    assert _train(out, *over) == 1
    assert load_checkpoint(out)["server_round"] == 1
    capsys.readouterr()
    # ... then one review is rewritten
    csv.write_text(csv.read_text().replace("review number 7 was", "review number 7 is"))
    before = _snapshot(out)

    # Execute
    rc = _resume(out, "runtime.kill_worker_at_round=null")

    # Assert
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith(f"dplora-ray: error: data.path={str(csv)!r}: the "), line
    assert ("the training data changed since" in line) != ("the test split changed since" in line)
    assert line.endswith("; resume needs the same data")
    assert _snapshot(out) == before


def test_resume_refuses_a_v2_checkpoint_with_work_left(
        copy: Path, capsys: pytest.CaptureFixture[str], no_loading: None) -> None:
    # Prepare: a checkpoint of the format before data fingerprints, run not complete
    _edit_checkpoint(copy, format="dplora_ray.checkpoint/v2", data_fingerprint=None)
    (copy / "summary.json").unlink()
    before = _snapshot(copy)

    # Execute
    rc = _resume(copy)

    # Assert: refused before anything is loaded
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith(f"dplora-ray: error: --resume={str(copy)!r}: checkpoint.pt is a "
                           "dplora_ray.checkpoint/v2 checkpoint, written before data "
                           "fingerprints"), line
    assert "start a new run" in line
    assert _snapshot(copy) == before


def test_a_finished_complete_v2_run_still_resumes_to_nothing(
        copy: Path, capsys: pytest.CaptureFixture[str], no_loading: None) -> None:
    # Prepare
    _edit_checkpoint(copy, format="dplora_ray.checkpoint/v2", data_fingerprint=None)
    before = _snapshot(copy)

    # Execute
    rc = _resume(copy)

    # Assert
    assert rc == 0
    assert "is already finished (completed)" in capsys.readouterr().err
    assert _snapshot(copy) == before


@pytest.mark.parametrize("lost", ["rounds.parquet", "clients.parquet", "ledger.json",
                                  "summary.json", "adapter"])
def test_resume_of_a_finished_run_rebuilds_its_lost_result_files(
        finished: Path, copy: Path, capsys: pytest.CaptureFixture[str], lost: str) -> None:
    # Prepare
    path = copy / lost
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    summary_before = (copy / "summary.json").read_bytes() if lost != "summary.json" else None

    # Execute
    rc = _resume(copy)

    # Assert: back, equal to what it was (rows come from the checkpoint)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert (copy / lost).exists()
    pd.testing.assert_frame_equal(pd.read_parquet(copy / "rounds.parquet"),
                                  pd.read_parquet(finished / "rounds.parquet"))
    _assert_same_run(copy, finished)
    if summary_before is not None:  # a kept summary is not touched
        assert f"lacks {lost}" in err
        assert (copy / "summary.json").read_bytes() == summary_before
    else:
        got, want = (json.loads((d / "summary.json").read_text()) for d in (copy, finished))
        assert got["stop_reason"] == "completed" and got["rounds_completed"] == 2
        skip = {"wall_seconds", "resumed_from_round", "output_dir"}
        assert {k: v for k, v in got.items() if k not in skip} == {
            k: v for k, v in want.items() if k not in skip}
    assert not _no_temp_files(copy)


@pytest.mark.ray
def test_resume_on_actors_rebuilds_a_lost_adapter(
        ray_session: Any, finished: Path, copy: Path) -> None:
    # Prepare: the adapter is assembled from the actors' initial state and the checkpoint
    shutil.rmtree(copy / "adapter")

    # Execute
    rc = _resume(copy, "runtime.backend=actors", "runtime.num_workers=2",
                 "runtime.cpus_per_worker=0.5")

    # Assert
    assert rc == 0
    _assert_same_run(copy, finished)


# =========================================================================== class 4
def _unwritable(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """A folder that cannot be created or written, and the start of the reason."""
    if kind in ("inside-a-file", "deep-inside-a-file"):
        blocker = tmp_path / "file.txt"
        blocker.write_text("a regular file")
        if kind == "inside-a-file":
            return blocker / "run", "Not a directory)"
        return blocker / "a" / "run", f"{blocker / 'a'}: Not a directory)"
    if kind == "under-proc":
        return Path(f"/proc/dplora-ray-{uuid.uuid4().hex}/run"), "/proc/dplora-ray-"
    if kind == "under-sys":
        return Path(f"/sys/dplora-ray-{uuid.uuid4().hex}"), ""
    assert kind == "read-only-folder"
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "run", "Permission denied)"


KINDS = ["inside-a-file", "deep-inside-a-file", "under-proc", "under-sys", "read-only-folder"]


@pytest.mark.parametrize("kind", KINDS)
def test_train_refuses_an_unwritable_out_before_loading_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_loading: None,
        kind: str) -> None:
    # Prepare
    out, reason = _unwritable(kind, tmp_path)
    before = _snapshot(tmp_path)

    # Execute
    rc = _train(out, INLINE)

    # Assert: refused first (no_loading), nothing created
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith(f"dplora-ray: error: --out={str(out)!r}: cannot write there ("
                           + reason), line
    assert line.endswith(")")
    assert not os.path.lexists(out)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["inside-a-file", "under-proc"])
def test_sweep_refuses_an_unwritable_out_before_starting_ray(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: None, kind: str) -> None:
    # Prepare
    sweep = _sweep_file(tmp_path)
    out, reason = _unwritable(kind, tmp_path)
    before = _snapshot(tmp_path)

    # Execute
    rc = main(["sweep", str(sweep), "--out", str(out), "--quiet"])

    # Assert
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith(f"dplora-ray: error: --out={str(out)!r}: cannot write there ("
                           + reason), line
    assert _snapshot(tmp_path) == before


def test_the_probe_of_a_new_nested_out_leaves_nothing_behind(tmp_path: Path) -> None:
    # Execute
    planning.check_output(tmp_path / "a" / "b" / "run", overwrite=False)

    # Assert
    assert list(tmp_path.iterdir()) == []


def _disk_full(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """From round 2's checkpoint on (or while writing ``where``), writes fail with ENOSPC
    after half of the bytes went to the file."""
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where in ("checkpoint", "disk-stays-full"):
        real_save = runner.torch.save
        state = {"full": False}

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if state["full"] or (isinstance(obj, dict) and obj.get("server_round") == 2):
                state["full"] = where == "disk-stays-full"
                f.write(b"half a checkpoint")
                raise full
            real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(runner.torch, "save", save)
        if where == "disk-stays-full":  # every later atomic write fails too
            real_fsync = os.fsync

            def fsync(fd: int) -> None:
                if state["full"]:
                    raise full
                real_fsync(fd)

            monkeypatch.setattr(os, "fsync", fsync)
    elif where == "rounds.parquet":
        real_write = R.write_rounds

        def write_rounds(rows: Any, path: Path) -> None:
            if len(rows) == 2:
                def half(fh: Any) -> None:
                    fh.write(b"PAR1 half")
                    raise full

                from dplora_ray.fileio import write_atomic

                write_atomic(path, half)
            real_write(rows, path)

        monkeypatch.setattr(R, "write_rounds", write_rounds)
    else:
        assert where == "adapter"
        import safetensors.torch

        def save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
            Path(filename).write_bytes(b"half an adapter")
            raise full

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("where", ["checkpoint", "disk-stays-full", "rounds.parquet",
                                   "adapter"])
def test_a_full_disk_mid_run_ends_with_one_line_and_keeps_what_was_done(
        finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    # Prepare
    out = tmp_path / "run"
    _disk_full(monkeypatch, where)

    # Execute
    rc = _train(out, *RUN, INLINE)
    monkeypatch.undo()

    # Assert: one line, last; no temporary files; the checkpoint of the last good round
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1] == f"dplora-ray: run failed: {ENOSPC_TEXT}"
    assert [e for e in err if "failed" in e or "error" in e] == err[-1:]
    assert not any("Traceback" in e for e in err)
    assert not _no_temp_files(out)
    assert not (out / "adapter").exists()  # never half an adapter
    ck = load_checkpoint(out)
    assert ck is not None and ck["server_round"] == (1 if where in ("checkpoint",
                                                                     "disk-stays-full") else 2)
    if where == "disk-stays-full":  # nothing more could be written
        assert not (out / "summary.json").exists()
    else:
        summary = json.loads((out / "summary.json").read_text())
        assert summary["stop_reason"] == f"error: {ENOSPC_TEXT}"

    # Execute: space is back
    rc = _resume(out)

    # Assert: the uninterrupted result
    assert rc == 0
    _assert_same_run(out, finished)
    assert json.loads((out / "summary.json").read_text())["stop_reason"] == "completed"


@pytest.mark.ray
def test_a_full_disk_on_actors_releases_the_workers_and_resumes(
        ray_session: Any, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    out = tmp_path / "run"
    _disk_full(monkeypatch, "checkpoint")

    # Execute: the tiny config's own backend (2 actors)
    rc = _train(out, *RUN)
    monkeypatch.undo()

    # Assert: one line; the actors are gone (Ray gets their CPUs back)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1] == f"dplora-ray: run failed: {ENOSPC_TEXT}"
    assert not _no_temp_files(out)
    assert load_checkpoint(out)["server_round"] == 1
    total = ray_session.cluster_resources()["CPU"]
    deadline = time.monotonic() + 60
    while ray_session.available_resources().get("CPU", 0.0) < total:
        assert time.monotonic() < deadline, "the failed run's actors linger"
        time.sleep(0.2)

    # Execute: resume on the actors again
    rc = _resume(out)

    # Assert
    assert rc == 0
    _assert_same_run(out, finished)
