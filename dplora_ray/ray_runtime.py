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
  started.

Ray is imported only by :func:`start_ray`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FORWARDED_ENV",
    "OBJECT_STORE_BYTES",
    "WORKER_ENV_DEFAULTS",
    "RaySession",
    "forwarded_env",
    "start_ray",
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
        """End what :func:`start_ray` started (nothing if Ray was already running)."""
        if self.started:
            self.ray.shutdown()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


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
        ray.init(address=address or "auto", **common)
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
    except BaseException:
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return RaySession(ray, started=True, temp_dir=temp_dir)
