"""What happens to a client whose worker died during its round work.

:func:`decide` turns ``runtime.on_client_failure`` and the attempts made so far into a
:class:`Decision` (cf. Ray Train v2's failure policy returning a decision):

* ``RETRY``: re-run the same job (same public seed and noise key, hence the same result)
  on the next usable worker; at most ``max(1, runtime.max_worker_restarts)`` times per
  client and round;
* ``DROP``: aggregate the round without it (status ``dropped_failure``);
* ``FAIL``: end the run with :class:`~dplora_ray.errors.RunFailedError` after writing
  what was done (under ``fail``, or when the retries are used up).

Whatever the decision, the client was charged in the ledger when the round was
dispatched (docs/privacy.md). :func:`stop_text` is the ``stop_reason`` of a run that an
exception (or Ctrl-C) ended.
"""

from __future__ import annotations

import enum

from dplora_ray.config import RuntimeConfig
from dplora_ray.errors import RunFailedError
from dplora_ray.fileio import one_line

__all__ = ["Decision", "decide", "max_retries", "stop_text"]


class Decision(enum.Enum):
    RETRY = "retry"
    DROP = "drop"
    FAIL = "fail"


def max_retries(rt: RuntimeConfig) -> int:
    return max(1, rt.max_worker_restarts)


def decide(rt: RuntimeConfig, attempt: int) -> Decision:
    """The decision for a client lost on its ``attempt``-th try (0 = the first)."""
    if rt.on_client_failure == "retry":
        return Decision.RETRY if attempt < max_retries(rt) else Decision.FAIL
    if rt.on_client_failure == "drop":
        return Decision.DROP
    return Decision.FAIL


def stop_text(exc: BaseException) -> str:
    """``stop_reason`` (after ``error: ``) of a run that ended with ``exc``."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C); continue with --resume"
    if isinstance(exc, RunFailedError):
        return one_line(exc)
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
