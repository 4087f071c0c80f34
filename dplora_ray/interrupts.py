"""Ctrl-C on the command line: the first stops the run gracefully, the second hurries.

:func:`install` (called by :func:`dplora_ray.cli.main`) replaces Python's SIGINT
handler with one that

* raises :class:`KeyboardInterrupt` on the first interrupt (the run abandons its current
  round, writes what is done and shuts Ray down) and on the second (the writing is
  skipped), but never from the third on;
* inside :func:`shielded` (shutting Ray down, killing its processes) never raises: it
  only notes that the user is in a hurry (:func:`hurry`), so the clean-up finishes, only
  faster (processes are killed instead of asked to stop).

:func:`kill_processes` ends processes (SIGTERM, then SIGKILL after a grace period; at
once with SIGKILL when hurried) and :func:`session_processes` finds the processes of an
embedded Ray instance: those whose command line names its temp dir, and their
descendants (Ray renames its agents and workers, ``ray::DashboardAgent``, so they are
found through their parent).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["children", "hurry", "install", "interrupted", "kill_processes",
           "session_processes", "shielded"]


class _State:
    count = 0  # SIGINTs received since install()
    shield = 0  # depth of shielded() sections
    installed = False


def _handler(signum: int, frame: Any) -> None:
    _State.count += 1
    if _State.shield or _State.count > 2:
        return
    raise KeyboardInterrupt


def install() -> None:
    """Use this module's SIGINT handler (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        _State.count, _State.installed = 0, True


def interrupted() -> int:
    """How many SIGINTs arrived since :func:`install`."""
    return _State.count


def hurry() -> bool:
    """A second interrupt arrived: skip every grace period."""
    return _State.count >= 2


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """A clean-up section that an interrupt must not cut short (see the module doc)."""
    _State.shield += 1
    try:
        yield
    finally:
        _State.shield -= 1


def _psutil() -> Any:
    import psutil

    return psutil


def children() -> list[Any]:
    """Every live descendant of this process (``psutil.Process`` objects)."""
    try:
        return list(_psutil().Process().children(recursive=True))
    except Exception:  # noqa: BLE001 - best effort
        return []


def session_processes(marker: str) -> list[Any]:
    """This user's processes whose command line contains ``marker`` (an embedded Ray's
    unique temp dir), with their descendants; never this process."""
    ps = _psutil()
    me, uid = os.getpid(), os.getuid()
    found: dict[int, Any] = {}
    for p in ps.process_iter(["pid", "cmdline", "uids"]):
        try:
            if p.info["uids"] is None or p.info["uids"].real != uid:
                continue
            if marker in " ".join(p.info["cmdline"] or ()) and p.pid != me:
                found[p.pid] = p
                for c in p.children(recursive=True):
                    if c.pid != me:
                        found[c.pid] = c
        except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
            continue
    return list(found.values())


def kill_processes(procs: Iterable[Any], grace_s: float = 5.0) -> None:
    """End ``procs``: SIGTERM, then SIGKILL whatever is left after ``grace_s`` seconds
    (SIGKILL at once when :func:`hurry`)."""
    ps = _psutil()
    procs = [p for p in procs if p.pid != os.getpid()]
    alive = []
    for p in procs:
        try:
            if p.is_running():
                (p.kill if hurry() else p.terminate)()
                alive.append(p)
        except (ps.NoSuchProcess, ps.AccessDenied):
            continue
    if not alive:
        return
    _, left = ps.wait_procs(alive, timeout=0.5 if hurry() else grace_s)
    for p in left:
        with contextlib.suppress(ps.NoSuchProcess, ps.AccessDenied):
            p.kill()
    if left:
        ps.wait_procs(left, timeout=2.0)
