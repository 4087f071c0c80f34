"""Robustness of the runtime (issue 15, classes 5 and 9): nothing hangs, Ctrl-C ends
cleanly.

* class 5, hangs: an unreachable ``runtime.address`` / ``sweep --address`` is refused
  within ``runtime.connect_timeout_s`` (a plain TCP connect before ``ray.init``, which
  would otherwise retry for minutes); worker actors or sweep trial placement groups that
  no node of the cluster can hold (``runtime.gpus_per_worker`` on a cluster without
  GPUs, more CPUs than a node has) are refused before anything is placed; planning is
  bounded (``federation.rounds`` x ``federation.num_clients`` <= 10^8, and a million
  rounds of a small population plan in seconds per 100,000 rounds). Each ends with exit
  code 2, one line ``dplora-ray: error: KEY=VALUE: reason``, no traceback, no folder.
* class 9, interrupts: Ctrl-C on the ``actors`` backend ends with exit code 130 and one
  line (``dplora-ray: interrupted; N round(s) kept, resume with --resume DIR``); once:
  what is done is written and the run resumes to the end; twice: the writing is skipped,
  and still no process of the run (Ray's raylet, GCS, dashboard and runtime-env agents,
  workers) is alive afterwards and Ray's temp dir is gone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dplora_ray.cli import main
from dplora_ray.config import load_config
from dplora_ray.ray_runtime import placement_problem, probe_address

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _one_error_line(err: str, *fragments: str) -> str:
    """The single stderr line of a refused run (``dplora-ray: error: ...``)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("dplora-ray:")]
    assert len(ours) == 1, err
    assert "Traceback" not in err, err
    assert ours[0].startswith("dplora-ray: error: "), ours[0]
    for f in fragments:
        assert f in ours[0], ours[0]
    return ours[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dplora_ray", *args]


# ------------------------------------------------------------- class 5a: addresses
def test_address_where_nothing_listens_is_refused_at_once(tmp_path: Path) -> None:
    # Arrange: a local port nobody listens on (a fresh process: Ray is not initialised)
    port = _free_port()
    out = tmp_path / "run"
    # Act
    t0 = time.monotonic()
    proc = subprocess.run(
        _cli("train", TINY, "--out", str(out), "--no-progress",
             *_sets(f"runtime.address=127.0.0.1:{port}")),
        capture_output=True, text=True, timeout=240, env=_env(), cwd=ROOT)
    # Assert: exit 2 long before Ray's minutes of retries, one line, no folder
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - t0 < 180
    _one_error_line(proc.stderr, f"runtime.address='127.0.0.1:{port}': "
                    "no Ray cluster answers there")
    assert not out.exists()


def test_address_probe_is_bounded_by_the_connect_timeout() -> None:
    # Arrange: an address that drops packets (or is unreachable: refused at once)
    from dplora_ray.errors import ConfigError

    # Act
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        probe_address("10.255.255.1:6379", 1.0)
    # Assert
    assert time.monotonic() - t0 < 10
    assert str(info.value).startswith("runtime.address='10.255.255.1:6379': no Ray "
                                      "cluster answers there (")
    # the default timeout is a documented, checked config key
    assert load_config(TINY, []).runtime.connect_timeout_s == 30.0
    with pytest.raises(ConfigError, match="runtime.connect_timeout_s"):
        load_config(TINY, ["runtime.connect_timeout_s=0"])


def test_sweep_address_where_nothing_listens_is_refused(tmp_path: Path) -> None:
    # Arrange
    port = _free_port()
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"name: s\nbase: {TINY}\noverrides:\n  runtime.backend: inline\n"
                     "space:\n  lora.r: {grid: [2]}\n")
    out = tmp_path / "sweep"
    # Act
    proc = subprocess.run(
        _cli("sweep", str(sweep), "--out", str(out), "--address", f"127.0.0.1:{port}"),
        capture_output=True, text=True, timeout=240, env=_env(), cwd=ROOT)
    # Assert
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, f"--address='127.0.0.1:{port}': no Ray cluster answers")
    assert not out.exists()


# ------------------------------------------------------------- class 5b: placement
def test_placement_is_checked_per_node() -> None:
    two_gpu_nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    # two 1-GPU workers fit (one per node); one 2-GPU worker does not, though the
    # cluster has 2 GPUs in all
    assert placement_problem(two_gpu_nodes, (), {"CPU": 1.0, "GPU": 1.0}, 2) is None
    problem = placement_problem(two_gpu_nodes, (), {"CPU": 1.0, "GPU": 2.0}, 1)
    assert problem is not None and "2 GPU on 2 node(s)" in problem
    assert "at most 8 CPU and 1 GPU on one node" in problem
    # fractional CPUs: four 0.5-CPU workers on a 2-CPU node, not five
    assert placement_problem([{"CPU": 2.0}], (), {"CPU": 0.5}, 4) is None
    assert placement_problem([{"CPU": 2.0}], (), {"CPU": 0.5}, 5) is not None
    # a sweep trial's own bundle takes its share first
    assert placement_problem([{"CPU": 2.0}], [{"CPU": 1.0}], {"CPU": 1.0}, 1) is None
    assert placement_problem([{"CPU": 2.0}], [{"CPU": 1.5}], {"CPU": 1.0}, 1) is not None
    assert placement_problem([{"CPU": 1.0}, {"CPU": 2.0}], [{"CPU": 1.0}],
                             {"CPU": 2.0}, 1) is None  # head on node 0, worker on node 1


def test_workers_no_node_can_hold_are_refused(tmp_path: Path, ray_session: object,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # Arrange: the session's Ray has 2 CPUs and no GPU
    out = tmp_path / "run"
    # Act
    gpu = main(["train", TINY, "--out", str(out), "--no-progress",
                *_sets("runtime.gpus_per_worker=64")])
    gpu_err = capsys.readouterr().err
    cpu = main(["train", TINY, "--out", str(out), "--no-progress",
                *_sets("runtime.cpus_per_worker=3", "runtime.num_workers=1")])
    cpu_err = capsys.readouterr().err
    # Assert: refused before any actor is placed (Ray would wait forever), no folder
    assert (gpu, cpu) == (2, 2)
    _one_error_line(gpu_err, "runtime.gpus_per_worker=64.0: runtime.num_workers=2 "
                    "worker(s) of 0.5 CPU and 64 GPU each can never be placed: the Ray "
                    "cluster has 2 CPU and 0 GPU on 1 node(s)")
    _one_error_line(cpu_err, "runtime.cpus_per_worker=3.0:", "can never be placed")
    assert not out.exists()


def test_sweep_trials_no_node_can_hold_are_refused(tmp_path: Path, ray_session: object,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # Arrange: trials that need a GPU (their own process), and worker actors with GPUs
    gpu_trial = tmp_path / "gpu.yaml"
    gpu_trial.write_text(f"name: g\nbase: {TINY}\noverrides:\n  runtime.backend: inline\n"
                         "space:\n  lora.r: {grid: [2, 4]}\nresources: {cpu: 1, gpu: 1}\n")
    gpu_workers = tmp_path / "workers.yaml"
    gpu_workers.write_text(f"name: w\nbase: {TINY}\noverrides:\n  runtime.backend: actors\n"
                           "  runtime.gpus_per_worker: 0.5\nspace:\n  lora.r: {grid: [2]}\n")
    out = tmp_path / "sweep"
    # Act
    rc_trial = main(["sweep", str(gpu_trial), "--out", str(out), "--quiet"])
    err_trial = capsys.readouterr().err
    rc_workers = main(["sweep", str(gpu_workers), "--out", str(out), "--quiet"])
    err_workers = capsys.readouterr().err
    # Assert: Tune would wait for these placement groups forever
    assert (rc_trial, rc_workers) == (2, 2)
    _one_error_line(err_trial, "resources.gpu=1.0: trial ", "can never be placed",
                    "0 GPU")
    _one_error_line(err_workers, "runtime.gpus_per_worker=0.5: trial ",
                    "2 worker(s) of 0.5 CPU, 0.5 GPU", "can never be placed")
    assert not out.exists()


# ------------------------------------------------------------- class 5c: planning
def test_planning_work_is_bounded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Arrange: a million rounds of a million clients: 10^12 cohort draws
    out = tmp_path / "run"
    # Act
    t0 = time.monotonic()
    rc = main(["train", TINY, "--out", str(out), "--no-progress",
               *_sets("runtime.backend=inline", "federation.rounds=1000000",
                      "federation.num_clients=1000000")])
    # Assert: refused while the config is read, before any data is made
    assert rc == 2
    assert time.monotonic() - t0 < 30
    _one_error_line(capsys.readouterr().err,
                    "federation.rounds=1000000: times federation.num_clients=1,000,000 is "
                    "1,000,000,000,000 cohort draws, all planned up front; at most "
                    "100,000,000 (a documented limit)")
    assert not out.exists()
    # the largest allowed rounds of the tiny config is a valid config ...
    cfg = load_config(TINY, ["federation.rounds=1000000"])
    assert cfg.federation.rounds == 1_000_000


def test_a_million_rounds_plan_in_linear_time() -> None:
    # Arrange: the tiny config's population, 20,000 of the allowed 1,000,000 rounds
    from dplora_ray.federated.planning import sample_cohorts

    cfg = load_config(TINY, ["federation.rounds=20000", "privacy.mode=client"])
    # Act
    t0 = time.process_time()
    cohorts = sample_cohorts(cfg)
    per_round = (time.process_time() - t0) / 20_000
    # Assert: the schedule is drawn at a bounded cost per round (a million rounds plan
    # in about a minute on one slow core, not forever); it is O(rounds x clients)
    assert len(cohorts) == 20_000
    assert per_round < 500e-6, f"{per_round * 1e6:.0f} us per round"


# ------------------------------------------------------------- class 9: Ctrl-C
def _start_long_run(out: Path) -> subprocess.Popen[str]:
    """``dplora-ray train`` on the actors backend, long enough to be interrupted, in its
    own process group (a terminal's Ctrl-C goes to the whole group)."""
    return subprocess.Popen(
        _cli("train", TINY, "--out", str(out), "--no-progress",
             *_sets("runtime.backend=actors", "runtime.num_workers=1",
                    "federation.rounds=30")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT,
        start_new_session=True)


def _wait_for_first_round(proc: subprocess.Popen[str], out: Path
                          ) -> list[tuple[psutil.Process, list[str]]]:
    """Wait until round 1 is on disk; the run's processes (Ray's included) by then, with
    their command lines."""
    deadline = time.monotonic() + 300
    while not (out / "rounds.parquet").exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended early ({proc.returncode}): {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no round within 300 s")
        time.sleep(0.05)
    tree = [(p, _cmdline(p)) for p in psutil.Process(proc.pid).children(recursive=True)]
    assert any("raylet" in " ".join(cmd) for _, cmd in tree), "no embedded Ray?"
    return tree


def _ctrl_c(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGINT)


def _assert_nothing_left(tree: list[tuple[psutil.Process, list[str]]]) -> None:
    """None of the run's processes (found while it ran: Ray's GCS, raylet, agents,
    workers) is alive 15 s after it ended, nothing names its Ray temp dir, and that
    temp dir is gone."""
    temp_dirs = {m for _, cmd in tree
                 for m in re.findall(r"/[^\s=]*?/dplora-ray-[^/\s]+", " ".join(cmd))}
    assert temp_dirs, [cmd for _, cmd in tree]
    deadline = time.monotonic() + 15
    alive = [p for p, _ in tree]
    while time.monotonic() < deadline:
        alive = [p for p, _ in tree if _alive(p)]
        if not alive:
            break
        time.sleep(0.5)
    assert not alive, [(p.pid, _cmdline(p)) for p in alive]
    naming = [p.pid for p in psutil.process_iter(["cmdline"])
              if any(d in " ".join(p.info["cmdline"] or ()) for d in temp_dirs)]
    assert not naming, naming
    assert not any(Path(d).exists() for d in temp_dirs), temp_dirs


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _interrupted_line(err: str, out: Path) -> tuple[int, str]:
    assert "Traceback" not in err, err
    ours = [ln for ln in err.splitlines() if ln.startswith("dplora-ray:")]
    assert len(ours) == 1, err
    prefix = "dplora-ray: interrupted; "
    assert ours[0].startswith(prefix), ours[0]
    kept = int(ours[0][len(prefix):].split(" ", 1)[0])
    assert ours[0].endswith(f" round(s) kept, resume with --resume {out}"), ours[0]
    return kept, ours[0]


def test_double_ctrl_c_exits_130_and_leaves_no_process(tmp_path: Path) -> None:
    # Arrange
    out = tmp_path / "run"
    proc = _start_long_run(out)
    tree = _wait_for_first_round(proc, out)
    # Act: Ctrl-C, and again while the run is still winding down
    _ctrl_c(proc)
    time.sleep(0.3)
    if proc.poll() is None:
        _ctrl_c(proc)
    _, err = proc.communicate(timeout=120)
    # Assert
    assert proc.returncode == 130, err
    kept, _ = _interrupted_line(err, out)
    assert kept >= 1
    _assert_nothing_left(tree)


def test_ctrl_c_keeps_the_finished_rounds_and_resumes(tmp_path: Path) -> None:
    # Arrange
    out = tmp_path / "run"
    proc = _start_long_run(out)
    tree = _wait_for_first_round(proc, out)
    # Act: one Ctrl-C: graceful
    _ctrl_c(proc)
    _, err = proc.communicate(timeout=180)
    # Assert: 130, one line, the error summary written, nothing left running
    assert proc.returncode == 130, err
    kept, _ = _interrupted_line(err, out)
    assert kept >= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"].startswith("error: interrupted")
    assert summary["rounds_completed"] == kept
    _assert_nothing_left(tree)
    # Act: resume (inline: the backend does not change what is computed)
    done = subprocess.run(
        _cli("train", "--resume", str(out), "--no-progress",
             *_sets("runtime.backend=inline")),
        capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    # Assert: it finishes every round
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "completed"
    assert summary["rounds_completed"] == 30
    assert summary["resumed_from_round"] == kept
