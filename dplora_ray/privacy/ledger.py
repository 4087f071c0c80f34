"""The privacy ledger: a typed, append-only record of every private release.

Each :class:`LedgerEntry` says that in ``server_round`` the protected ``unit`` (a client,
for example-level modes, or ``"all-clients"`` for client-level DP-FedAvg) went through
``steps`` Poisson-subsampled Gaussian mechanisms with ``sampling_rate`` and the
*effective* ``noise_multiplier``. What happened is kept apart from how it is counted
(like ``dp_accounting``'s DpEvents): :class:`PrivacyLedger` only stores entries, and
every epsilon is computed from them on demand with
:func:`~dplora_ray.privacy.accountant.compute_epsilon`.

Invariants:
    * Entries are only ever appended; :attr:`PrivacyLedger.entries` is a tuple.
    * Epsilon is never stored as state: it is recomputed from the entries at each call,
      and :meth:`PrivacyLedger.load` ignores the epsilons written into the JSON file
      (they are there for people reading it).
    * Entries with equal (unit, noise_multiplier, sampling_rate) are merged before
      accounting by adding their steps; this is exact (RDP composes additively; the PRV
      accountant self-composes each distinct mechanism).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dplora_ray.errors import PrivacyError
from dplora_ray.privacy.accountant import ACCOUNTANTS, SampledGaussian, compute_epsilon
from dplora_ray.privacy.entries import LedgerEntry, _is_number, _json_epsilon
from dplora_ray.privacy.mechanisms import ALL_CLIENTS, DP_MODES, MECHANISMS

__all__ = [
    "ALL_CLIENTS",
    "LEDGER_FORMAT",
    "LedgerEntry",
    "NoLedger",
    "PrivacyLedger",
    "protects_sentence",
    "unit_of_privacy_for",
]

#: Identifies ledger JSON files.
LEDGER_FORMAT = "dplora_ray.privacy_ledger/v1"


def unit_of_privacy_for(mode: str) -> str:
    """``"example"`` for ``dpsgd``/``paper``, ``"client"`` for ``client``/``local``."""
    mech = MECHANISMS.get(mode) if isinstance(mode, str) else None
    if mech is None or not mech.private:
        raise PrivacyError(
            f"mode must be one of {', '.join(repr(m) for m in DP_MODES)}. Found {mode!r}.")
    return mech.unit


def protects_sentence(mode: str) -> str:
    """One human sentence stating what a mode's epsilon protects."""
    unit_of_privacy_for(mode)  # validates
    return f"(epsilon, delta)-DP for {MECHANISMS[mode].protects}."


class PrivacyLedger:
    """Append-only ledger of :class:`LedgerEntry` records with epsilon on demand.

    Args:
        mode: ``dpsgd``, ``paper``, ``client`` or ``local``.
        accountant: ``rdp`` or ``prv``.
        delta: target delta, in (0, 1).
        unit_of_privacy: ``example`` (``dpsgd``, ``paper``) or ``client`` (``client``,
            ``local``); must match the mode.

    Raises:
        PrivacyError: a bad or inconsistent argument.
    """

    def __init__(self, mode: str, accountant: str, delta: float,
                 unit_of_privacy: str) -> None:
        expected = unit_of_privacy_for(mode)
        if accountant not in ACCOUNTANTS:
            raise PrivacyError(
                f"accountant must be one of 'rdp', 'prv'. Found {accountant!r}.")
        if not _is_number(delta) or not 0 < delta < 1:
            raise PrivacyError(f"delta must be in (0, 1). Found {delta!r}.")
        if unit_of_privacy != expected:
            raise PrivacyError(
                f"unit_of_privacy must be {expected!r} for mode {mode!r}. "
                f"Found {unit_of_privacy!r}.")
        self._mode = mode
        self._accountant = accountant
        self._delta = float(delta)
        self._unit_of_privacy = unit_of_privacy
        self._entries: list[LedgerEntry] = []

    # ---------------------------------------------------------------- properties
    @property
    def mode(self) -> str:
        return self._mode

    @property
    def accountant(self) -> str:
        return self._accountant

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def unit_of_privacy(self) -> str:
        return self._unit_of_privacy

    @property
    def protects(self) -> str:
        """What this ledger's epsilon protects, in one sentence."""
        return protects_sentence(self._mode)

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """All entries in the order they were appended (a read-only copy)."""
        return tuple(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (f"PrivacyLedger(mode={self._mode!r}, accountant={self._accountant!r}, "
                f"delta={self._delta!r}, unit_of_privacy={self._unit_of_privacy!r}, "
                f"entries={len(self._entries)})")

    # ---------------------------------------------------------------- recording
    def append(self, entry: LedgerEntry) -> None:
        """Record one release. Entries can never be changed or removed."""
        if not isinstance(entry, LedgerEntry):
            raise PrivacyError(f"only LedgerEntry records can be appended. Found {entry!r}.")
        self._entries.append(entry)

    def units(self) -> list[str]:
        """The protected units that have entries, sorted."""
        return sorted({e.unit for e in self._entries})

    # ---------------------------------------------------------------- accounting
    @staticmethod
    def _events_by_unit(entries: Sequence[LedgerEntry]
                        ) -> dict[str, list[SampledGaussian]]:
        steps: dict[str, dict[tuple[float, float], int]] = {}
        for e in entries:
            per_unit = steps.setdefault(e.unit, {})
            key = (e.noise_multiplier, e.sampling_rate)
            per_unit[key] = per_unit.get(key, 0) + e.steps
        return {unit: [SampledGaussian(z, q, t) for (z, q), t in sorted(per.items())]
                for unit, per in steps.items()}

    def _epsilon_of(self, events: Sequence[SampledGaussian]) -> float:
        return compute_epsilon(events, self._delta, self._accountant)  # type: ignore[arg-type]

    def epsilon(self, unit: str | None = None) -> float:
        """Epsilon spent so far by ``unit``, or the worst unit when ``unit`` is None.

        Computed afresh from the entries; 0.0 when nothing is recorded (for that unit).
        """
        by_unit = self._events_by_unit(self._entries)
        if unit is not None:
            return self._epsilon_of(by_unit.get(unit, []))
        return max((self._epsilon_of(ev) for ev in by_unit.values()), default=0.0)

    def epsilons(self) -> dict[str, float]:
        """Epsilon per unit, keys sorted."""
        by_unit = self._events_by_unit(self._entries)
        return {unit: self._epsilon_of(by_unit[unit]) for unit in sorted(by_unit)}

    def epsilon_if(self, extra: Sequence[LedgerEntry]) -> float:
        """The worst epsilon among the units in ``extra`` if ``extra`` were appended.

        For the budget guard: the ledger is not changed. 0.0 when ``extra`` is empty.
        """
        extra = list(extra)
        for entry in extra:
            if not isinstance(entry, LedgerEntry):
                raise PrivacyError(f"extra must hold LedgerEntry records. Found {entry!r}.")
        affected = {e.unit for e in extra}
        relevant = [e for e in self._entries if e.unit in affected] + extra
        by_unit = self._events_by_unit(relevant)
        return max((self._epsilon_of(by_unit[u]) for u in sorted(affected)), default=0.0)

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """What :meth:`from_dict` needs and nothing else (no epsilon is computed): the
        checkpoint's form."""
        return {"format": LEDGER_FORMAT, "mode": self._mode, "accountant": self._accountant,
                "delta": self._delta, "unit_of_privacy": self._unit_of_privacy,
                "entries": [e.to_dict() for e in self._entries]}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; ``epsilon_at_save`` is informational only."""
        eps = self.epsilons()
        worst = max(eps.values(), default=0.0)
        state = self.state_dict()
        entries = state.pop("entries")
        return {
            **state,
            "protects": self.protects,
            "epsilon_at_save": {
                "note": "for reading only; recomputed from the entries on load",
                "max": _json_epsilon(worst),
                "per_unit": {u: _json_epsilon(v) for u, v in eps.items()},
            },
            "entries": entries,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PrivacyLedger:
        """Rebuild a ledger from :meth:`to_dict` output (stored epsilons are ignored)."""
        if not isinstance(raw, Mapping):
            raise PrivacyError(f"a privacy ledger must be a mapping. Found {type(raw).__name__}.")
        fmt = raw.get("format")
        if fmt != LEDGER_FORMAT:
            raise PrivacyError(f"ledger format must be {LEDGER_FORMAT!r}. Found {fmt!r}.")
        for key in ("mode", "accountant", "delta", "unit_of_privacy", "entries"):
            if key not in raw:
                raise PrivacyError(f"privacy ledger lacks the key {key!r}.")
        entries = raw["entries"]
        if not isinstance(entries, list):
            raise PrivacyError(f"ledger entries must be a list. Found {entries!r}.")
        ledger = cls(raw["mode"], raw["accountant"], raw["delta"], raw["unit_of_privacy"])
        for item in entries:
            ledger.append(LedgerEntry.from_dict(item))
        return ledger

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger as JSON, whole or not at all (:mod:`dplora_ray.fileio`)."""
        from dplora_ray.fileio import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Read a ledger written by :meth:`save`; epsilons are recomputed, not trusted."""
        p = Path(path)
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PrivacyError(f"privacy ledger {str(p)!r} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PrivacyError(
                f"privacy ledger {str(p)!r} cannot be read ({first})") from None
        return cls.from_dict(raw)


class NoLedger:
    """Stands in for the privacy ledger when ``privacy.mode`` is ``none``: nothing is
    charged, and ``ledger.json`` says that nothing is protected."""

    def append(self, entry: Any) -> None:
        raise AssertionError("nothing is charged without privacy")

    def epsilons(self) -> dict[str, float]:
        return {}

    def save(self, path: str | os.PathLike[str]) -> None:
        from dplora_ray.fileio import write_json_atomic

        write_json_atomic({"mode": "none", "unit_of_privacy": None, "entries": [],
                           "protects": "nothing: privacy.mode is 'none'"}, path)
