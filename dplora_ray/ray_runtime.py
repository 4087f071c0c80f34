"""Starting (or joining) Ray, written once, and the environment its workers inherit.

* :data:`FORWARDED_ENV`: the variables of the driver's environment that Ray workers
  (client-worker actors, sweep trials) get too: the Hugging Face offline switches and
  cache, this package's cache and data folders, tokenizer / transformers verbosity and
  the OpenBLAS core settings. :func:`forwarded_env` reads them (plus defaults),
  :func:`worker_runtime_env` wraps them as a ``runtime_env``.
* :func:`start_ray`: use the Ray this process already initialised, join a cluster
  (an address, or ``RAY_ADDRESS`` when asked to), or start an embedded local instance
  (no dashboard, a 512 MiB object store, no auth token, optionally in a fresh temp dir).
  The returned :class:`RaySession` says whether this call started Ray and ends what it
  started: :meth:`RaySession.shutdown` cannot be cut short by Ctrl-C and kills whatever
  processes of an embedded instance ``ray.shutdown`` left (:mod:`dplora_ray.interrupts`).
* :func:`probe_address`: a cluster address is tried with a plain TCP connect, bounded by
  ``connect_timeout_s`` (``runtime.connect_timeout_s``), before ``ray.init`` (which
  otherwise retries an address where nothing answers for minutes).
* :func:`placement_problem` / :func:`worker_placement`: can the cluster ever hold a set
  of resource bundles (each alive node's total resources)? Ray waits forever for an
  actor or placement group that no node can hold.

Ray is imported only by :func:`start_ray`.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dplora_ray.errors import ConfigError, DpLoraError, RunFailedError

__all__ = [
    "CONNECT_TIMEOUT_S",
    "FORWARDED_ENV",
    "OBJECT_STORE_BYTES",
    "WORKER_ENV_DEFAULTS",
    "RaySession",
    "cluster_nodes",
    "forwarded_env",
    "placement_problem",
    "probe_address",
    "start_ray",
    "worker_placement",
    "worker_runtime_env",
]

FORWARDED_ENV: tuple[str, ...] = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HOME",
    "DPLORA_RAY_CACHE",
    "DPLORA_DATA_DIR",
    "TOKENIZERS_PARALLELISM",
    "TRANSFORMERS_VERBOSITY",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
)
# what a worker gets when the driver leaves these unset
WORKER_ENV_DEFAULTS: Mapping[str, str] = {"TRANSFORMERS_VERBOSITY": "error"}
OBJECT_STORE_BYTES = 512 * 1024 * 1024
#: the default of ``runtime.connect_timeout_s`` (and of ``dplora-ray sweep --address``)
CONNECT_TIMEOUT_S = 30.0
_GCS_PORT, _CLIENT_PORT = 6379, 10001  # Ray's defaults: GCS, Ray Client (ray://)


def forwarded_env(defaults: Mapping[str, str] | None = None) -> dict[str, str]:
    """The :data:`FORWARDED_ENV` variables set in this process, then ``defaults`` for the
    ones that are not."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    for k, v in (defaults or {}).items():
        env.setdefault(k, v)
    return env


def worker_runtime_env(defaults: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """``{"env_vars": forwarded_env(defaults)}``, or None when that is empty (a Ray
    ``runtime_env`` for ``.options(runtime_env=...)`` or ``ray.init``)."""
    env = forwarded_env(defaults)
    return {"env_vars": env} if env else None


@dataclass(frozen=True)
class RaySession:
    """What :func:`start_ray` did.

    Attributes:
        ray: the ``ray`` module.
        started: this call initialised Ray (joined a cluster or started one), so
            :meth:`shutdown` ends it; False when Ray was already initialised.
        temp_dir: the temp dir made for an embedded instance (None otherwise).
    """

    ray: Any
    started: bool
    temp_dir: str | None = None

    def shutdown(self) -> None:
        """End what :func:`start_ray` started (nothing if Ray was already running).

        Ctrl-C does not cut this short; an embedded instance's processes that outlive
        ``ray.shutdown`` (or all of them, at once, after a second Ctrl-C) are killed."""
        from dplora_ray import interrupts

        with interrupts.shielded():
            procs = (interrupts.session_processes(self.temp_dir)
                     if self.started and self.temp_dir else [])
            if interrupts.hurry():  # a second Ctrl-C: no grace for Ray's processes
                interrupts.kill_processes(procs)
            if self.started:
                self.ray.shutdown()
            if procs:
                interrupts.kill_processes(procs)
            if self.temp_dir:
                shutil.rmtree(self.temp_dir, ignore_errors=True)


def _host_port(address: str) -> tuple[str, int, bool] | None:
    """``(host, port, is Ray Client)`` of ``host[:port]`` / ``ray://host[:port]`` /
    ``[v6]:port``; None for ``auto`` / ``local`` (nothing to probe) or what cannot be
    parsed (left to ``ray.init``)."""
    addr = address.strip()
    port, client = _GCS_PORT, False
    if "://" in addr:
        scheme, addr = addr.split("://", 1)
        client = scheme == "ray"
        port = _CLIENT_PORT if client else port
    addr = addr.split("/", 1)[0]
    if addr in ("", "auto", "local"):
        return None
    host = addr
    if addr.startswith("["):  # [v6]:port
        host, _, rest = addr[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif addr.count(":") == 1:
        host, _, p = addr.partition(":")
        if not p.isdigit():
            return None
        port = int(p)
    return (host, port, client) if host else None


def probe_address(address: str, timeout_s: float, key: str = "runtime.address") -> None:
    """Is there a Ray cluster at ``address``? A TCP connect to its GCS (or Ray Client)
    port, then (GCS) a request for the cluster id, each within ``timeout_s`` seconds;
    a ConfigError naming ``key`` when nothing (or something else) answers.

    ``ray.init`` itself retries such an address for minutes (a proxy that accepts every
    connection, or an address Ray rewrites to this host's IP, defeats the plain
    connect, hence the second step)."""
    hp = _host_port(address)
    if hp is None:
        return
    host, port, client = hp
    where = f"{host}:{port}"

    def refuse(why: str) -> ConfigError:
        return ConfigError(key, address, f"no Ray cluster answers there ({why})")

    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except TimeoutError:
        raise refuse(f"no answer from {where} within {timeout_s:g} s, "
                     "runtime.connect_timeout_s") from None
    except OSError as exc:
        raise refuse(f"{where}: {exc.strerror or type(exc).__name__}") from None
    if client:
        return
    import threading

    from ray._raylet import GcsClient  # type: ignore[attr-defined]

    from dplora_ray.fileio import one_line

    box: dict[str, Any] = {}

    def ask() -> None:
        try:
            box["id"] = GcsClient(address=where).cluster_id
        except BaseException as exc:  # noqa: BLE001 - reported below
            box["error"] = exc

    # Ray's client blocks (in C++, without the GIL) while nothing answers: a daemon
    # thread that is left behind when it does not come back in time
    asker = threading.Thread(target=ask, name="dplora-ray-gcs-probe", daemon=True)
    asker.start()
    asker.join(timeout_s)
    if asker.is_alive():
        raise refuse(f"the GCS at {where} did not answer within {timeout_s:g} s, "
                     "runtime.connect_timeout_s")
    if "error" in box:
        raise refuse(f"{where} is not a Ray GCS: {one_line(box['error'], 120)}")


def _fits(node: Mapping[str, float], need: Mapping[str, float]) -> int:
    """How many copies of the bundle ``need`` the resources ``node`` hold."""
    counts = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return min(counts) if counts else 1 << 30


def placement_problem(nodes: Sequence[Mapping[str, float]], head: Sequence[Mapping[str, float]],
                      unit: Mapping[str, float], copies: int) -> str | None:
    """Can ``head`` (at most a few bundles) plus ``copies`` bundles ``unit`` be placed on
    ``nodes`` (each node's total resources), a bundle never split across nodes? None when
    they can, else what is missing (exact: every placement of the head is tried)."""
    def place(free: list[dict[str, float]], todo: Sequence[Mapping[str, float]]) -> bool:
        if not todo:
            return sum(_fits(n, unit) for n in free) >= copies
        for i, n in enumerate(free):
            if _fits(n, todo[0]) >= 1:
                rest = [dict(m) for m in free]
                for k, v in todo[0].items():
                    rest[i][k] = rest[i].get(k, 0.0) - v
                if place(rest, todo[1:]):
                    return True
        return False

    if place([dict(n) for n in nodes], list(head)):
        return None
    total: dict[str, float] = {}
    for n in nodes:
        for k in ("CPU", "GPU"):
            total[k] = total.get(k, 0.0) + float(n.get(k, 0.0))
    largest = {k: max((float(n.get(k, 0.0)) for n in nodes), default=0.0) for k in total}
    return (f"the Ray cluster has {total['CPU']:g} CPU and {total['GPU']:g} GPU on "
            f"{len(nodes)} node(s) (at most {largest['CPU']:g} CPU and {largest['GPU']:g} "
            "GPU on one node)")


def cluster_nodes(ray: Any) -> list[dict[str, float]]:
    """Total resources of each alive node of the connected cluster."""
    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def worker_placement(ray: Any, num_workers: int, cpus: float, gpus: float,
                     head: Sequence[Mapping[str, float]] = ()) -> tuple[str, str] | None:
    """Can the connected cluster ever hold ``head`` (e.g. a sweep trial's own bundle)
    plus ``num_workers`` workers of ``cpus`` CPU and ``gpus`` GPU each? None when it
    can, else ``(the key to blame, what the cluster has)``: ``resources.gpu`` /
    ``resources.cpu`` (the head alone does not fit), ``runtime.gpus_per_worker`` or
    ``runtime.cpus_per_worker``."""
    nodes = cluster_nodes(ray)
    unit = {"CPU": float(cpus), "GPU": float(gpus)}
    problem = placement_problem(nodes, head, unit, num_workers)
    if problem is None:
        return None
    if head and placement_problem(nodes, head, {}, 0) is not None:
        gpu_only = [{"GPU": float(b.get("GPU", 0.0))} for b in head]
        return ("resources.gpu" if placement_problem(nodes, gpu_only, {}, 0) is not None
                else "resources.cpu"), problem
    if gpus > 0 and placement_problem(nodes, (), {"GPU": float(gpus)}, num_workers):
        return "runtime.gpus_per_worker", problem
    if placement_problem(nodes, (), {"CPU": float(cpus)}, num_workers) is not None:
        return "runtime.cpus_per_worker", problem
    return ("runtime.gpus_per_worker" if gpus > 0 else "runtime.cpus_per_worker"), problem


def start_ray(
    address: str | None = None,
    *,
    env_address: bool = False,
    num_cpus: int | None = None,
    min_cpus: float = 1,
    fresh: bool = False,
    temp_prefix: str | None = None,
    object_store_memory: int | None = OBJECT_STORE_BYTES,
    runtime_env: Mapping[str, Any] | None = None,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    address_key: str = "runtime.address",
) -> RaySession:
    """Use the running Ray, join a cluster, or start an embedded local instance.

    Args:
        address: join this cluster (``ray.init(address=address)``).
        env_address: with no ``address``, join the cluster of ``RAY_ADDRESS`` (as a
            ``ray job submit`` driver does) when that is set (``ray.init(address="auto")``).
        num_cpus: CPUs of an embedded instance (default: all cores, at least
            ``min_cpus``).
        min_cpus: the least default CPUs of an embedded instance (rounded up).
        fresh: start the embedded instance with ``address="local"``: never join a Ray
            that is already running on this host.
        temp_prefix: the embedded instance lives in a new ``tempfile.mkdtemp(prefix=...)``
            (keep it short: Ray's socket paths are limited), removed by
            :meth:`RaySession.shutdown`; None: Ray's default temp dir.
        object_store_memory: of an embedded instance (None: Ray's default).
        runtime_env: the job's ``runtime_env`` (e.g. :func:`worker_runtime_env`), given to
            ``ray.init`` when not None.
        connect_timeout_s: a cluster address (``address`` or ``RAY_ADDRESS``) must
            answer a TCP connect within this many seconds (:func:`probe_address`).
        address_key: the key a ConfigError about ``address`` names.

    Every ``ray.init`` gets ``logging_level="WARNING"`` and ``configure_logging=True``; an
    embedded instance also ``include_dashboard=False`` and ``RAY_AUTH_MODE=disabled`` (if
    unset: a single-user instance needs no token, and Ray 2.60 would otherwise write
    ``~/.ray/auth_token``).
    """
    import ray

    if ray.is_initialized():
        return RaySession(ray, started=False)
    common: dict[str, Any] = {"logging_level": "WARNING", "configure_logging": True}
    if runtime_env is not None:
        common["runtime_env"] = dict(runtime_env)
    if address or (env_address and os.environ.get("RAY_ADDRESS")):
        if address:
            probe_address(address, connect_timeout_s, address_key)
        else:
            probe_address(os.environ["RAY_ADDRESS"], connect_timeout_s, "RAY_ADDRESS")
        try:
            ray.init(address=address or "auto", **common)
        except Exception as exc:  # e.g. a Ray of another version answers there
            from dplora_ray.fileio import one_line

            raise ConfigError(address_key if address else "RAY_ADDRESS",
                              address or os.environ["RAY_ADDRESS"],
                              f"joining that Ray cluster failed ({one_line(exc, 200)})"
                              ) from None
        return RaySession(ray, started=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs: dict[str, Any] = {
        "num_cpus": num_cpus or max(int(min_cpus + 0.999), os.cpu_count() or 1),
        "include_dashboard": False,
        **common,
    }
    if fresh:
        kwargs["address"] = "local"
    if object_store_memory is not None:
        kwargs["object_store_memory"] = object_store_memory
    temp_dir = tempfile.mkdtemp(prefix=temp_prefix) if temp_prefix else None
    if temp_dir:
        kwargs["_temp_dir"] = temp_dir
    try:
        ray.init(**kwargs)
    except BaseException as exc:
        # what did start (e.g. the GCS and the agents, when the raylet was too slow to
        # register) is ended, then its temp dir removed; no traceback for the user
        with contextlib.suppress(Exception):
            RaySession(ray, started=True, temp_dir=temp_dir).shutdown()
        if isinstance(exc, Exception) and not isinstance(exc, DpLoraError):
            from dplora_ray.fileio import one_line

            raise RunFailedError(f"Ray could not start ({one_line(exc, 200)})") from exc
        raise
    return RaySession(ray, started=True, temp_dir=temp_dir)
