"""Shared benchmark helpers: machine facts, a private Ray instance, a process-tree
memory sampler, configs, and fixed-length synthetic token data.

Invariants:
    * A benchmark never joins somebody else's Ray cluster: :func:`private_ray` starts a
      local instance (``address="local"``) in its own temp dir, or reuses the one this
      process already initialised.
    * Memory is the sum of the resident set sizes (RSS) of this process and all its
      descendants (Ray's GCS, raylet, workers, actors are children of the driver that
      started Ray), so concurrent jobs of other users on the same host are not counted.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "REPO",
    "TINY_CONFIG",
    "MemorySampler",
    "fixed_length_data",
    "machine_info",
    "median",
    "private_ray",
    "set_default_env",
    "tiny_config",
]

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"

_DEFAULT_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",  # an embedded single-user instance needs no token
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
}


def set_default_env() -> None:
    """Offline hub, no Ray usage stats or auth token (see docs/ENVIRONMENT facts)."""
    for k, v in _DEFAULT_ENV.items():
        os.environ.setdefault(k, v)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """Cores, load, memory and library versions, recorded with every figure."""
    import psutil
    import torch

    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "memory_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "memory_available_gib": round(psutil.virtual_memory().available / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": bool(torch.cuda.is_available()),
    }
    for name in ("ray", "transformers", "peft", "opacus"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            info[name] = None
    return info


@contextmanager
def private_ray(num_cpus: int | None = None) -> Iterator[Any]:
    """A local Ray instance owned by this process (reused if already initialised)."""
    set_default_env()
    from dplora_ray.ray_runtime import start_ray

    # address="local" (fresh): never somebody else's cluster; a short temp dir: Ray's
    # socket paths are limited
    session = start_ray(fresh=True, num_cpus=num_cpus, min_cpus=2, temp_prefix="/tmp/rb")
    try:
        yield session.ray
    finally:
        session.shutdown()  # only what this call started


def actor_options(cfg: Any) -> dict[str, Any]:
    """Ray options for a client worker, as the runner's ActorBackend sets them."""
    from dplora_ray.ray_runtime import worker_runtime_env

    return {"num_cpus": cfg.runtime.cpus_per_worker, "num_gpus": cfg.runtime.gpus_per_worker,
            "runtime_env": worker_runtime_env()}


def tiny_config(overrides: Mapping[str, Any] | None = None) -> Any:
    """``configs/tiny.yaml`` with dotted-key overrides (already typed values)."""
    from dplora_ray.config import load_config

    return load_config(TINY_CONFIG, dict(overrides or {}))


def fixed_length_data(vocab_size: int, length: int, n_train: int, n_test: int,
                      label_token_ids: tuple[int, ...], pad_id: int = 0, seed: int = 0) -> Any:
    """EncodedData of random token ids, every sequence exactly ``length`` tokens, so that
    a batch of B examples is exactly B x length tokens (no padding)."""
    from dplora_ray.federated.encoding import EncodedData, EncodedSplit

    rng = np.random.default_rng(seed)

    def split(n: int) -> EncodedSplit:
        ids = rng.integers(3, vocab_size, size=n * length).astype(np.int32)
        offsets = np.arange(n + 1, dtype=np.int64) * length
        labels = rng.integers(0, len(label_token_ids), size=n).astype(np.int64)
        return EncodedSplit(ids=ids, offsets=offsets, labels=labels)

    return EncodedData(train=split(n_train), test=split(n_test),
                       label_token_ids=tuple(label_token_ids), pad_id=pad_id,
                       num_labels=len(label_token_ids))


# --------------------------------------------------------------------------- memory
def _role(proc: Any, root_pid: int) -> str:
    if proc.pid == root_pid:
        return "driver"
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - the process may be gone
        return "other"
    if not cmd.startswith("ray::"):
        # gcs_server, raylet, dashboard agent, log monitor, ... or a worker before it
        # set its title
        return "ray_idle_workers" if "default_worker.py" in cmd else "ray_system"
    actor = cmd.split(" ")[0][len("ray::"):].split(".")[0]  # ray::Class.method -> Class
    if actor.startswith("IDLE"):
        return "ray_idle_workers"
    if "Aggregator" in actor:
        return "aggregator"
    if actor.endswith("Worker"):  # ClientWorker, RuntimeWorker, TimedClientWorker
        return "client_workers"
    return "ray_other"


class MemorySampler:
    """Samples the summed RSS of a process tree in a background thread; keeps the peak
    and the per-role breakdown at the peak.

    Args:
        root_pid: the tree's root (default: this process).
        interval: seconds between samples.
    """

    def __init__(self, root_pid: int | None = None, interval: float = 0.1) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(root_pid or os.getpid())
        self.interval = interval
        self.peak_bytes = 0
        self.peak_roles: dict[str, int] = {}
        self.peak_processes = 0
        self.samples = 0
        self.last_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="mem-sampler")

    def sample(self) -> int:
        psutil = self._psutil
        procs = [self.root]
        try:
            procs += self.root.children(recursive=True)
        except psutil.Error:
            pass
        total, roles = 0, {}
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            role = _role(p, self.root.pid)  # not cached: Ray workers retitle themselves
            total += rss
            roles[role] = roles.get(role, 0) + rss
        self.samples += 1
        self.last_bytes = total
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_roles, self.peak_processes = total, roles, len(procs)
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class Stopwatch:
    """Wall-clock marks: ``sw.mark("name")`` records seconds since construction."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> float:
        self.marks[name] = time.perf_counter() - self.t0
        return self.marks[name]
