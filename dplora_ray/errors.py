"""Error types of dplora_ray.

Every error a user can cause by bad input is a :class:`DpLoraError` subclass whose
message is one line naming the offending key and value. The command line turns these
into exit code 2 with that single line on stderr (no traceback).

All exceptions survive pickling (they cross Ray process boundaries), so they keep their
constructor arguments in ``args``.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "DpLoraError",
    "ModelError",
    "OutputError",
    "PreflightError",
    "PrivacyError",
    "RunFailedError",
    "RunInterrupted",
]


class DpLoraError(Exception):
    """Base class of every error raised by dplora_ray on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(DpLoraError):
    """A configuration key has a missing, unknown, mistyped or out-of-range value.

    Args:
        key: dotted config key, e.g. ``privacy.delta``.
        value: the offending value (repr'd in the message).
        reason: what is wrong, e.g. ``must be in (0, 1)``.
    """

    def __init__(self, key: str, value: object, reason: str) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        super().__init__(f"{key}={value!r}: {reason}")

    def __reduce__(self):  # keep pickling exact across Ray
        return (type(self), (self.key, self.value, self.reason))


class DataError(ConfigError):
    """The data named by a config key cannot be loaded or is unusable."""


class ModelError(ConfigError):
    """The model named by ``model.name`` cannot be loaded."""


class OutputError(ConfigError):
    """The output folder cannot be used (exists and is not empty, not writable...)."""


class PrivacyError(DpLoraError):
    """Something would weaken the privacy claim (e.g. an unreachable budget)."""


class PreflightError(PrivacyError):
    """The private-training preflight found a LoRA tensor that would not be protected."""


class RunFailedError(DpLoraError):
    """A run ended early for a reason other than bad input (e.g. a client worker died
    under ``runtime.on_client_failure='fail'``); the results so far are written and
    ``summary.json`` says ``stop_reason: "error: ..."``. The command line exits with 1."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C ended a run whose folder exists: ``rounds_kept`` finished rounds are in
    ``out_dir`` (its checkpoint), to continue with ``--resume out_dir``. The command line
    exits with 130."""

    def __init__(self, rounds_kept: int, out_dir: str) -> None:
        super().__init__(rounds_kept, out_dir)
        self.rounds_kept = rounds_kept
        self.out_dir = out_dir
