"""The client workers as a pool: which are up, and one way to deal work over them.

:class:`WorkerPool` tracks which workers take work (a lost worker is left out until it
answers a ping; one Ray will not restart is left out for good). :func:`scatter` deals
chunks of work round-robin over the workers that are up and moves a lost worker's chunks
on to the next one: the runner's evaluation and the audit's scoring both use it.

:class:`Backend` is the interface every backend (inline, Ray actors) offers the driver.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from dplora_ray.errors import RunFailedError
from dplora_ray.federated.backends import WorkerLost

__all__ = ["Backend", "WorkerPool", "scatter"]


class Backend(Protocol):
    """What the driver asks of a backend (:class:`~dplora_ray.federated.backends.
    InlineBackend`, :class:`~dplora_ray.federated.backends.ActorBackend`).

    Calls are asynchronous: ``submit`` returns a future that ``get`` resolves (raising
    :class:`~dplora_ray.federated.backends.WorkerLost` when the worker died).
    """

    workers: list[Any]

    def make_aggregator(self, **kwargs: Any) -> Any: ...

    def put(self, value: Any) -> Any: ...

    def submit(self, handle: Any, method: str, *args: Any) -> Any: ...

    def submit_client(self, worker: int, state: Any, job: Any, server_round: int,
                      attempt: int, last_update: Any = None) -> tuple[Any, Any]: ...

    def wait(self, futures: Sequence[Any], timeout: float | None) -> list[Any]: ...

    def result(self, future: Any) -> Any: ...

    def get(self, futures: Any) -> Any: ...

    def restart_worker(self, worker: int) -> None: ...

    def shutdown(self) -> None: ...


class WorkerPool:
    """Which workers take work. A lost worker is left out until it answers a ping (Ray
    refuses calls while it restarts); one that Ray will not restart is left out for
    good. Work goes to the workers that are up, so the run never waits for a restart
    unless no worker is up."""

    PING_EVERY_S = 0.5
    WAIT_FOR_ANY_S = 600.0

    def __init__(self, backend: Backend, note: Callable[[str], None]) -> None:
        self.backend, self.note = backend, note
        self.up = list(range(len(backend.workers)))
        self.down: dict[int, tuple[Any, float]] = {}
        self.dead: set[int] = set()

    def lost(self, w: int, permanent: bool = False) -> None:
        if w in self.up:
            self.up.remove(w)
        if permanent:
            self.down.pop(w, None)
            if w not in self.dead:
                self.dead.add(w)
                self.note(f"worker {w} is gone for good (runtime.max_worker_restarts used up)")
        elif w not in self.down and w not in self.dead:
            self.down[w] = (self.backend.submit(self.backend.workers[w], "ping"),
                            time.monotonic())

    def refresh(self) -> None:
        from dplora_ray.federated.backends import WorkerLost

        for w, (fut, asked) in list(self.down.items()):
            if not self.backend.wait([fut], 0):
                continue
            try:
                self.backend.get(fut)
            except WorkerLost as exc:
                if exc.permanent:
                    self.lost(w, permanent=True)
                elif time.monotonic() - asked >= self.PING_EVERY_S:  # still restarting
                    self.down[w] = (self.backend.submit(self.backend.workers[w], "ping"),
                                    time.monotonic())
                continue
            del self.down[w]
            self.up = sorted([*self.up, w])
            self.note(f"worker {w} is back (restarted)")

    def usable(self) -> list[int]:
        """The workers that are up (waits while none is but some may come back)."""
        self.refresh()
        deadline = time.monotonic() + self.WAIT_FOR_ANY_S
        while not self.up:
            if not self.down:
                raise RunFailedError("every client worker died and none will be restarted "
                                     "(runtime.max_worker_restarts); continue with --resume")
            if time.monotonic() > deadline:
                raise RunFailedError(f"no client worker came back within "
                                     f"{self.WAIT_FOR_ANY_S:g} s; continue with --resume")
            time.sleep(0.1)
            self.refresh()
        return list(self.up)

    def next_after(self, w: int) -> int:
        """The first usable worker after ``w`` (cyclically): retries move on."""
        ws = self.usable()
        return next((x for x in ws if x > w), ws[0])


def scatter(pool: WorkerPool, method: str, state_ref: Any, chunks: Sequence[Any], *,
            max_losses: int, what: str, note: Callable[[str], None] | None = None
            ) -> list[Any]:
    """Call ``method(state_ref, [chunk, ...])`` on the workers that are up, chunks dealt
    round-robin, and return one result per chunk, in chunk order.

    A worker lost during its call is reported to the pool and its chunks go to the first
    usable worker; after ``max_losses`` such rounds the work fails
    (:class:`~dplora_ray.errors.RunFailedError`). The results do not depend on which
    worker computed which chunk.
    """
    backend = pool.backend
    results: list[Any] = [None] * len(chunks)
    ws = pool.usable()
    todo = {w: list(range(i, len(chunks), len(ws))) for i, w in enumerate(ws)}
    losses_left = max_losses
    while any(todo.values()):
        futs = {w: backend.submit(backend.workers[w], method, state_ref,
                                  [chunks[j] for j in js])
                for w, js in todo.items() if js}
        retry: list[int] = []
        for w, fut in futs.items():
            try:
                parts = backend.get(fut)
            except WorkerLost as exc:
                if note is not None:
                    note(f"{what}: worker {w} lost ({exc.reason}); its batches move on")
                pool.lost(w, exc.permanent)
                retry += todo[w]
                continue
            for j, part in zip(todo[w], parts):
                results[j] = part
        todo = {}
        if retry:
            losses_left -= 1
            if losses_left < 0:
                raise RunFailedError(f"{what} failed: client workers kept dying")
            todo = {pool.usable()[0]: sorted(retry)}
    return results
