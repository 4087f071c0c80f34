"""A ledger entry: one private release, as the accountant must see it (see
:mod:`dplora_ray.privacy.ledger` for the ledger that holds them)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dplora_ray.errors import PrivacyError
from dplora_ray.privacy.accountant import SampledGaussian

__all__ = ["LedgerEntry"]


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool) and not math.isnan(float(value)))


@dataclass(frozen=True)
class LedgerEntry:
    """One private release, as the accountant must see it.

    Attributes:
        unit: who is protected: a client id such as ``"client-3"`` (example-level modes,
            ``local``) or :data:`ALL_CLIENTS` (``client``, DP-FedAvg).
        server_round: the round of the release, >= 0.
        noise_multiplier: the EFFECTIVE noise multiplier (noise std / L2 sensitivity),
            i.e. already multiplied by :func:`~dplora_ray.privacy.effective_noise_scale`.
        sampling_rate: Poisson inclusion probability of one protected record per step.
        steps: number of subsampled Gaussian steps in this release.
        note: free text (e.g. ``"local steps"``, ``"dp-fedavg round"``).

    Raises:
        PrivacyError: a value is out of range; the message names the field and value.
    """

    unit: str
    server_round: int
    noise_multiplier: float
    sampling_rate: float
    steps: int
    note: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.unit, str) or not self.unit.strip():
            raise PrivacyError(f"unit must be a non-empty string. Found {self.unit!r}.")
        if not _is_int(self.server_round) or self.server_round < 0:
            raise PrivacyError(
                f"server_round must be an integer >= 0. Found {self.server_round!r}.")
        if not isinstance(self.note, str):
            raise PrivacyError(f"note must be a string. Found {self.note!r}.")
        event = self.event  # validates noise_multiplier, sampling_rate, steps
        object.__setattr__(self, "server_round", int(self.server_round))
        object.__setattr__(self, "noise_multiplier", event.noise_multiplier)
        object.__setattr__(self, "sampling_rate", event.sampling_rate)
        object.__setattr__(self, "steps", event.steps)

    @property
    def event(self) -> SampledGaussian:
        """The mechanism this entry records."""
        return SampledGaussian(self.noise_multiplier, self.sampling_rate, self.steps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LedgerEntry:
        if not isinstance(raw, Mapping):
            raise PrivacyError(f"a ledger entry must be a mapping. Found {raw!r}.")
        known = {"unit", "server_round", "noise_multiplier", "sampling_rate", "steps",
                 "note"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PrivacyError(f"ledger entry has unknown field {unknown[0]!r}. Found {raw!r}.")
        missing = sorted(known - {"note"} - set(raw))
        if missing:
            raise PrivacyError(f"ledger entry lacks field {missing[0]!r}. Found {raw!r}.")
        return cls(**raw)


def _json_epsilon(eps: float) -> float | str:
    return eps if math.isfinite(eps) else "inf"
