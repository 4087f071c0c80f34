"""Where client workers and the aggregator run: in this process, or as Ray actors.

Both backends expose the same calls, so the runner is written once:

* ``submit(handle, method, *args)`` returns a future and ``get(futures)`` resolves it;
  ``put(value)`` shares a large object once (Ray's object store, or the value itself).
  Futures may be passed as top-level arguments to later calls (Ray resolves them).
* ``submit_client(worker, state, job, server_round, attempt)`` starts one client's round
  work and returns two futures: the client's metrics (a ``ClientResult`` without its
  update) and its update (the LoRA tensors, or None when rejected). The runner only ever
  reads the first; the second goes straight to the aggregator.
* ``wait(futures, timeout)`` returns the futures that are ready (at least one, or none
  once ``timeout`` seconds have passed); ``result(future)`` gives a client's metrics or
  raises :class:`WorkerLost` when the worker died while doing that work.
* ``restart_worker(i)`` ends whatever worker ``i`` is doing (Ray restarts the actor).

Failures: worker actors are started with ``max_restarts=runtime.max_worker_restarts``;
when one dies, Ray starts it again (its ``__init__`` reloads the base model) and every
call that was running or queued on it fails with :class:`WorkerLost`; the runner's
``runtime.on_client_failure`` policy decides what happens to that work. The ``inline``
backend cannot lose its only worker without ending the run, so its fault injection is
simulated: the call fails with :class:`WorkerLost` as if the worker had died.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dplora_ray.config import ExperimentConfig, config_to_dict
from dplora_ray.errors import ConfigError, DpLoraError, RunFailedError
from dplora_ray.federated.aggregator import Aggregator
from dplora_ray.federated.client import ClientJob, ClientResult, ClientWorker
from dplora_ray.federated.encoding import EncodedData

__all__ = ["ActorBackend", "InlineBackend", "RuntimeWorker", "WorkerLost", "make_backend"]


class WorkerLost(Exception):
    """The worker doing a call died (or was restarting) before the call returned.

    ``permanent``: Ray will not start it again (``max_worker_restarts`` used up).
    """

    def __init__(self, reason: str, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent

    def __reduce__(self):
        return (type(self), (self.reason, self.permanent))


class _SimulatedDeath(Exception):
    """Fault injection on the inline backend: stands for ``os._exit(1)``."""


class RuntimeWorker(ClientWorker):
    """A :class:`ClientWorker` with the calls the runtime needs.

    ``run_client`` splits a client's result into what the driver may read (metrics) and
    what only the aggregator receives (the LoRA update), and carries the fault injection
    hook (``runtime.kill_worker_at_round``); ``evaluate_chunks`` scores fixed batches.
    """

    def __init__(self, cfg: Mapping[str, Any] | ExperimentConfig,
                 data: EncodedData | list[Any], worker_index: int = 0,
                 in_process: bool = False) -> None:
        if isinstance(data, list):  # [ObjectRef]: fetched here, so a restart can refetch
            import ray

            data = ray.get(data[0])
        assert isinstance(data, EncodedData)
        self._in_process = in_process
        self._fault_fired = False
        self._init_error: DpLoraError | None = None
        try:
            super().__init__(cfg, data, worker_index)
        except DpLoraError as exc:
            if in_process:
                raise
            # an actor whose __init__ raises dies with a 27-line ActorDiedError that has
            # lost the cause; kept here, it is raised by ping(), and so crosses Ray as
            # itself (RayTaskError.cause) and reaches the user as one line
            self._init_error = exc
            self.worker_index = worker_index

    def ping(self) -> int:
        if self._init_error is not None:
            raise self._init_error
        return super().ping()

    def _restarted(self) -> bool:
        if self._in_process:
            return self._fault_fired
        import warnings

        import ray

        with warnings.catch_warnings():  # Ray 2.60 warns from inside this property
            warnings.simplefilter("ignore")
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)

    def _maybe_die(self, server_round: int, attempt: int) -> None:
        kill = self.cfg.runtime.kill_worker_at_round
        if (kill is None or kill != server_round or self.worker_index != 0 or attempt != 0
                or self._restarted()):
            return
        self._fault_fired = True
        if self._in_process:
            raise _SimulatedDeath(f"fault injection: worker 0 killed at round {server_round}")
        os._exit(1)  # fault injection: the worker process dies here, Ray restarts it

    def run_client(self, global_state: Mapping[str, torch.Tensor], job: ClientJob,
                   server_round: int, attempt: int,
                   last_update: Mapping[str, torch.Tensor] | None = None
                   ) -> tuple[ClientResult, dict[str, torch.Tensor] | None]:
        """One client's round work: (metrics without the update, the update)."""
        self._maybe_die(server_round, attempt)
        result = (self.train_client(global_state, job) if last_update is None
                  else self.train_client(global_state, job, last_update))
        return dataclasses.replace(result, update=None), result.update

    def evaluate_chunks(self, state: Mapping[str, torch.Tensor],
                        chunks: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """:meth:`ClientWorker.evaluate_detail` of each chunk, each chunk scored as
        exactly one batch (so the numbers do not depend on which worker got which
        chunk)."""
        return [self.evaluate_detail(state, c, batch_size=max(1, len(c))) for c in chunks]

    # ---- issue 8 (privacy audit): label log-probabilities of planted sequences
    def audit_scores(self, state: Mapping[str, torch.Tensor],
                     chunks: Sequence[Any]) -> list[np.ndarray]:
        """See :func:`dplora_ray.audit.scoring.score_chunks`."""
        from dplora_ray.audit.scoring import score_chunks

        return score_chunks(self, state, chunks)


# ------------------------------------------------------------------------- inline
class _Call:
    """A call of the inline backend, run when first resolved (or right away)."""

    __slots__ = ("_done", "_error", "_fn", "_value")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._done

    def resolve(self) -> Any:
        if not self._done:
            try:
                self._value = self._fn()
            except Exception as exc:  # kept, re-raised by every resolve()
                self._error = exc
            self._done = True
            self._fn = None  # type: ignore[assignment]
        if self._error is not None:
            raise self._error
        return self._value


def _resolve_args(args: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(a.resolve() if isinstance(a, _Call) else a for a in args)


class InlineBackend:
    """One worker and the aggregator as plain objects in this process.

    Client work runs lazily, in submission order, when the runner waits for it, so a
    round's time bound applies: work not started by the deadline is not started.
    """

    name = "inline"

    def __init__(self, cfg: ExperimentConfig, data: EncodedData) -> None:
        self.workers = [RuntimeWorker(cfg, data, 0, in_process=True)]

    def make_aggregator(self, **kwargs: Any) -> Aggregator:
        return Aggregator(**kwargs)

    def put(self, value: Any) -> Any:
        return value

    def submit(self, handle: Any, method: str, *args: Any) -> _Call:
        call = _Call(lambda: getattr(handle, method)(*_resolve_args(args)))
        try:
            call.resolve()
        except Exception:  # noqa: S110 - re-raised by get()
            pass
        return call

    def submit_client(self, worker: int, state: Any, job: ClientJob, server_round: int,
                      attempt: int, last_update: Any = None) -> tuple[_Call, _Call]:
        handle: Any = self.workers[worker]
        both = _Call(lambda: handle.run_client(*_resolve_args((state,)), job, server_round,
                                               attempt, *_resolve_args((last_update,))))
        return _Call(lambda: both.resolve()[0]), _Call(lambda: both.resolve()[1])

    def wait(self, futures: Sequence[_Call], timeout: float | None) -> list[_Call]:
        ready = [f for f in futures if f.done]
        if ready:
            return ready
        deadline = None if timeout is None else time.monotonic() + timeout
        for f in futures:
            if deadline is not None and time.monotonic() >= deadline:
                return []
            try:
                f.resolve()
            except Exception:  # noqa: S110 - surfaced by result()
                pass
            if deadline is not None and time.monotonic() > deadline:
                return []  # finished, but late
            return [f]
        return []

    def result(self, future: _Call) -> ClientResult:
        try:
            return future.resolve()
        except _SimulatedDeath as exc:
            raise WorkerLost(str(exc)) from None

    def get(self, futures: Sequence[_Call] | _Call) -> Any:
        try:
            if isinstance(futures, _Call):
                return futures.resolve()
            return [f.resolve() for f in futures]
        except _SimulatedDeath as exc:
            raise WorkerLost(str(exc)) from None

    def restart_worker(self, worker: int) -> None:
        """Nothing runs in the background inline: late work was never started."""

    def shutdown(self) -> None:
        self.workers = []


# ------------------------------------------------------------------------- Ray
class ActorBackend:
    """``runtime.num_workers`` worker actors (each loads the base model once) and one
    aggregator actor, on an embedded local Ray or the cluster at ``runtime.address``.
    Actors are started once per experiment and reused for every round; a worker that
    dies is restarted by Ray up to ``runtime.max_worker_restarts`` times. Workers that
    no node of the cluster can hold are refused (ConfigError) before any is placed; an
    embedded Ray lives in its own temp dir (``dplora-ray-*``), removed at the end."""

    name = "actors"

    def __init__(self, cfg: ExperimentConfig, data: EncodedData) -> None:
        from dplora_ray.ray_runtime import WORKER_ENV_DEFAULTS, start_ray, worker_runtime_env

        rt = cfg.runtime
        # an embedded Ray lives in its own temp dir: its processes are found (and killed
        # if they outlive ray.shutdown, e.g. after a double Ctrl-C) by that name
        session = self.session = start_ray(
            rt.address or None, env_address=True, min_cpus=rt.num_workers * rt.cpus_per_worker,
            fresh=True, temp_prefix="dplora-ray-", connect_timeout_s=rt.connect_timeout_s)
        ray = self.ray = session.ray
        self.aggregator: Any = None
        self.workers: list[Any] = []
        try:  # Ray would wait forever for workers no node can hold
            _check_placement(ray, cfg)
        except BaseException:
            session.shutdown()
            raise
        remote = ray.remote(RuntimeWorker).options(
            num_cpus=cfg.runtime.cpus_per_worker, num_gpus=cfg.runtime.gpus_per_worker,
            max_restarts=cfg.runtime.max_worker_restarts, max_task_retries=0,
            runtime_env=worker_runtime_env(WORKER_ENV_DEFAULTS))
        self._data_ref = ray.put(data)
        cfg_dict = config_to_dict(cfg)
        # the data travels as a reference nested in a list: Ray keeps it alive while the
        # driver holds it, and a restarted worker fetches it again in its __init__
        self.workers = [remote.remote(cfg_dict, [self._data_ref], i)
                        for i in range(cfg.runtime.num_workers)]
        try:  # fail fast on start-up; every answer is read (no "unhandled error" logs)
            pings = [self.submit(w, "ping") for w in self.workers]
            self.ray.wait(pings, num_returns=len(pings))
            errors: list[BaseException] = []
            for ping in pings:
                try:
                    self.get(ping)
                except Exception as exc:  # noqa: BLE001 - the first is raised below
                    errors.append(exc)
            if errors:  # a bad-input error (exit 2) wins over a lost worker
                first = next((e for e in errors if isinstance(e, DpLoraError)), errors[0])
                if isinstance(first, WorkerLost):
                    raise RunFailedError(f"a client worker could not start "
                                         f"({first.reason})") from None
                raise first
        except BaseException:
            self.shutdown()
            raise

    def make_aggregator(self, **kwargs: Any) -> Any:
        self.aggregator = self.ray.remote(Aggregator).options(num_cpus=0).remote(**kwargs)
        return self.aggregator

    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def submit(self, handle: Any, method: str, *args: Any) -> Any:
        return getattr(handle, method).remote(*args)

    def submit_client(self, worker: int, state: Any, job: ClientJob, server_round: int,
                      attempt: int, last_update: Any = None) -> tuple[Any, Any]:
        handle: Any = self.workers[worker]
        call = handle.run_client.options(num_returns=2)
        meta, update = call.remote(state, job, server_round, attempt, last_update)
        return meta, update

    def wait(self, futures: Sequence[Any], timeout: float | None) -> list[Any]:
        ready, _ = self.ray.wait(list(futures), num_returns=1, timeout=timeout)
        return ready

    def _unwrap(self, exc: BaseException) -> BaseException:
        from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

        if isinstance(exc, RayActorError):
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            first = first.split(". The task may or may not")[0]
            return WorkerLost(f"{type(exc).__name__}: {first[:160]}",
                              permanent=isinstance(exc, ActorDiedError))
        if isinstance(exc, RayTaskError):
            cause = getattr(exc, "cause", None)
            if isinstance(cause, (DpLoraError, WorkerLost)):
                return cause
        return exc

    def result(self, future: Any) -> ClientResult:
        return self.get(future)

    def get(self, futures: Any) -> Any:
        try:
            return self.ray.get(futures)
        except Exception as exc:
            unwrapped = self._unwrap(exc)
            if unwrapped is exc:
                raise
            raise unwrapped from None

    def restart_worker(self, worker: int) -> None:
        """End whatever worker ``worker`` is running (Ray starts it again)."""
        self.ray.kill(self.workers[worker], no_restart=False)  # type: ignore[arg-type]

    def shutdown(self) -> None:
        from dplora_ray import interrupts

        with interrupts.shielded():  # Ctrl-C does not cut the clean-up short
            if self.session.started and interrupts.hurry():
                self.workers, self.aggregator = [], None  # shutting Ray down ends them
            for w in self.workers:
                self.ray.kill(w)  # type: ignore[arg-type]
            if self.aggregator is not None:
                self.ray.kill(self.aggregator)
                self.aggregator = None
            self.workers = []
            self.session.shutdown()


def _check_placement(ray: Any, cfg: ExperimentConfig) -> None:
    """A ConfigError when the cluster can never hold the worker actors."""
    from dplora_ray.ray_runtime import worker_placement

    rt = cfg.runtime
    found = worker_placement(ray, rt.num_workers, rt.cpus_per_worker, rt.gpus_per_worker)
    if found is not None:
        key, problem = found
        raise ConfigError(key, getattr(rt, key.split(".")[1]),
                          f"runtime.num_workers={rt.num_workers} worker(s) of "
                          f"{rt.cpus_per_worker:g} CPU and {rt.gpus_per_worker:g} GPU each "
                          f"can never be placed: {problem}")


def make_backend(cfg: ExperimentConfig, data: EncodedData) -> InlineBackend | ActorBackend:
    if cfg.runtime.backend == "inline":
        return InlineBackend(cfg, data)
    return ActorBackend(cfg, data)
