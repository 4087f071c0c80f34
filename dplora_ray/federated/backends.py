"""Where client workers and the aggregator run: in this process, or as Ray actors.

Both backends expose the same three calls, so the runner is written once:
``submit(handle, method, *args)`` returns a future, ``get(futures)`` resolves them, and
``put(value)`` shares a large object once (Ray's object store, or the value itself).
Futures may be passed as top-level arguments to later calls (Ray resolves them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from dplora_ray.config import ExperimentConfig, config_to_dict
from dplora_ray.federated.aggregator import Aggregator
from dplora_ray.federated.client import ClientWorker
from dplora_ray.federated.encoding import EncodedData

__all__ = ["ActorBackend", "InlineBackend", "make_backend"]

_FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "DPLORA_RAY_CACHE",
                  "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "TRANSFORMERS_VERBOSITY")


class _Done:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class InlineBackend:
    """One worker and the aggregator as plain objects in this process."""

    name = "inline"

    def __init__(self, cfg: ExperimentConfig, data: EncodedData) -> None:
        self.workers = [ClientWorker(cfg, data, 0)]

    def make_aggregator(self, **kwargs: Any) -> Aggregator:
        return Aggregator(**kwargs)

    def put(self, value: Any) -> Any:
        return value

    def submit(self, handle: Any, method: str, *args: Any) -> _Done:
        args = tuple(a.value if isinstance(a, _Done) else a for a in args)
        return _Done(getattr(handle, method)(*args))

    def get(self, futures: Sequence[_Done] | _Done) -> Any:
        if isinstance(futures, _Done):
            return futures.value
        return [f.value for f in futures]

    def shutdown(self) -> None:
        self.workers = []


class ActorBackend:
    """``runtime.num_workers`` ClientWorker actors (each loads the base model once) and
    one aggregator actor, on an embedded local Ray or the cluster at ``runtime.address``.
    Actors are started once per experiment and reused for every round."""

    name = "actors"

    def __init__(self, cfg: ExperimentConfig, data: EncodedData) -> None:
        import ray

        self.ray = ray
        self.started_ray = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING",
                                      "configure_logging": True}
            if cfg.runtime.address:
                ray.init(address=cfg.runtime.address, **kwargs)
            else:
                # an embedded single-user instance needs no token (Ray 2.60 would
                # otherwise write ~/.ray/auth_token)
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                need = cfg.runtime.num_workers * cfg.runtime.cpus_per_worker
                ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                         object_store_memory=512 * 1024 * 1024, **kwargs)
            self.started_ray = True
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        remote = ray.remote(ClientWorker).options(
            num_cpus=cfg.runtime.cpus_per_worker, num_gpus=cfg.runtime.gpus_per_worker,
            runtime_env={"env_vars": env} if env else None)
        self._data_ref = ray.put(data)
        cfg_dict = config_to_dict(cfg)
        self.workers = [remote.remote(cfg_dict, self._data_ref, i)
                        for i in range(cfg.runtime.num_workers)]
        self.get([self.submit(w, "ping") for w in self.workers])  # fail fast on start-up

    def make_aggregator(self, **kwargs: Any) -> Any:
        return self.ray.remote(Aggregator).options(num_cpus=0).remote(**kwargs)

    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def submit(self, handle: Any, method: str, *args: Any) -> Any:
        return getattr(handle, method).remote(*args)

    def get(self, futures: Any) -> Any:
        return self.ray.get(futures)

    def shutdown(self) -> None:
        for w in self.workers:
            self.ray.kill(w)
        self.workers = []
        if self.started_ray:
            self.ray.shutdown()


def make_backend(cfg: ExperimentConfig, data: EncodedData) -> InlineBackend | ActorBackend:
    if cfg.runtime.backend == "inline":
        return InlineBackend(cfg, data)
    return ActorBackend(cfg, data)
