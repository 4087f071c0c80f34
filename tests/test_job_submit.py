"""``python -m dplora_ray sweep`` as a ``ray job submit`` entrypoint on a real cluster.

The test starts its own single-node Ray head on 127.0.0.1 (own temp dir, free ports, no
auth token, no usage stats) as ``ray start --head --block`` in a new process group,
submits the smoke sweep with ``ray job submit --working-dir``, waits for SUCCEEDED, reads
``sweep.parquet``, and stops only the processes it started (its process group, then any
process whose command line names its temp dir). It never calls ``ray stop``, which would
stop every Ray on the host.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from dplora_ray import tune as S

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        {
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    return env


@dataclass
class Cluster:
    proc: subprocess.Popen
    temp_dir: str
    dashboard: str


def _pids_naming(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(d.name))
    return pids


def _stop(cluster: Cluster) -> None:
    """Stop the processes this test started: the process group of ``ray start --block``
    (SIGTERM, then SIGKILL), then stragglers whose command line names our temp dir."""
    pgid = cluster.proc.pid  # start_new_session: the group id is the leader's pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        cluster.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    cluster.proc.wait(timeout=10)
    for pid in _pids_naming(cluster.temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rj")  # short: Ray's socket paths are limited
    (gcs, dash, client, agent_http, agent_grpc, env_agent, metrics, node_mgr, obj_mgr) = free_ports(
        9
    )
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--ray-client-server-port",
        str(client),
        "--dashboard-agent-listen-port",
        str(agent_http),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(env_agent),
        "--metrics-export-port",
        str(metrics),
        "--node-manager-port",
        str(node_mgr),
        "--object-manager-port",
        str(obj_mgr),
        "--temp-dir",
        temp_dir,
        "--num-cpus",
        "2",
        "--disable-usage-stats",
    ]
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=cluster_env(), start_new_session=True
    )
    c = Cluster(proc, temp_dir, f"http://127.0.0.1:{dash}")
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.flush()
                pytest.fail(
                    "ray start exited: " + (Path(temp_dir) / "ray-start.log").read_text()[-2000:]
                )
            try:
                with urllib.request.urlopen(c.dashboard + "/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the Ray dashboard did not come up within 120 s")
            time.sleep(1)
        yield c
    finally:
        _stop(c)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_sweep_runs_as_a_ray_job(cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    job_id = f"dplora-smoke-{os.getpid()}"
    runtime_env = {
        "env_vars": {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    }
    submit = [
        RAY,
        "job",
        "submit",
        "--address",
        cluster.dashboard,
        "--submission-id",
        job_id,
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        sys.executable,
        "-m",
        "dplora_ray",
        "sweep",
        "sweeps/smoke.yaml",
        "--out",
        str(out),
    ]

    t0 = time.monotonic()
    done = subprocess.run(
        submit, env=cluster_env(), capture_output=True, text=True, timeout=480, cwd=tmp_path
    )
    elapsed = time.monotonic() - t0
    with urllib.request.urlopen(f"{cluster.dashboard}/api/jobs/{job_id}", timeout=10) as r:
        info = json.loads(r.read())

    logs = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, logs
    assert info["status"] == "SUCCEEDED", info
    df = pd.read_parquet(out / S.SWEEP_FILE)
    assert len(df) == 8
    assert (df[S.STATUS] == S.STATUS_OK).all(), df[[S.TRIAL, S.ERROR]]
    assert set(S.SWEEP_COLUMNS) <= set(df.columns)
    assert {"privacy.target_epsilon", "lora.r", "federation.num_clients"} <= set(df.columns)
    assert all((Path(d) / "summary.json").is_file() for d in df[S.TRIAL_DIR])
    assert "sweep 'smoke': 8 trial(s) (8 ok)" in done.stdout
    assert elapsed < 300
