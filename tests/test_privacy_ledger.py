"""Privacy ledger: append-only, per-unit epsilon, what-if, JSON round trip, merging."""

from __future__ import annotations

import json
import math
import pickle

import pytest

from dplora_ray.errors import PrivacyError
from dplora_ray.privacy import LedgerEntry, PrivacyLedger, SampledGaussian, compute_epsilon
from dplora_ray.privacy.ledger import ALL_CLIENTS


def _ledger(mode: str = "dpsgd", accountant: str = "rdp") -> PrivacyLedger:
    unit = "example" if mode in ("dpsgd", "paper") else "client"
    return PrivacyLedger(mode, accountant, 1e-5, unit)


def _two_clients() -> PrivacyLedger:
    ledger = _ledger()
    for rnd in range(3):
        ledger.append(LedgerEntry("client-0", rnd, 1.1, 0.02, 10, note="local steps"))
    ledger.append(LedgerEntry("client-1", 0, 1.1, 0.05, 10))
    return ledger


def test_empty_ledger_spends_nothing():
    ledger = _ledger()
    assert ledger.epsilon() == 0.0
    assert ledger.epsilon("client-7") == 0.0
    assert ledger.epsilons() == {}
    assert ledger.units() == []
    assert ledger.entries == ()


def test_entries_are_append_only():
    ledger = _two_clients()
    entries = ledger.entries
    assert isinstance(entries, tuple) and len(entries) == 4
    with pytest.raises(AttributeError):
        ledger.entries = ()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        entries[0].steps = 0  # type: ignore[misc]
    with pytest.raises(PrivacyError, match="only LedgerEntry"):
        ledger.append(SampledGaussian(1.0, 0.1, 1))  # type: ignore[arg-type]
    assert ledger.entries == entries


def test_per_unit_epsilon_and_worst_unit():
    # Prepare
    ledger = _two_clients()
    # Execute
    eps = ledger.epsilons()
    # Assert: hand-built events for each unit
    eps0 = compute_epsilon([SampledGaussian(1.1, 0.02, 30)], 1e-5)
    eps1 = compute_epsilon([SampledGaussian(1.1, 0.05, 10)], 1e-5)
    assert eps == {"client-0": eps0, "client-1": eps1}
    assert ledger.units() == ["client-0", "client-1"]
    assert ledger.epsilon("client-0") == eps0
    assert ledger.epsilon() == max(eps0, eps1)


def test_epsilon_if_does_not_mutate():
    # Prepare
    ledger = _two_clients()
    before = ledger.entries
    extra = [LedgerEntry("client-1", 1, 1.1, 0.05, 10), LedgerEntry("client-2", 1, 1.1, 0.05, 1)]
    # Execute
    what_if = ledger.epsilon_if(extra)
    # Assert
    assert ledger.entries == before
    assert what_if == pytest.approx(compute_epsilon([SampledGaussian(1.1, 0.05, 20)], 1e-5))
    assert ledger.epsilon_if([]) == 0.0
    for e in extra:
        ledger.append(e)
    assert ledger.epsilon("client-1") == what_if


def test_client_level_unit():
    ledger = _ledger("client")
    for rnd in range(50):
        ledger.append(LedgerEntry(ALL_CLIENTS, rnd, 1.0, 0.1, 1, note="dp-fedavg round"))
    assert ledger.units() == [ALL_CLIENTS]
    assert ledger.epsilon() == compute_epsilon([SampledGaussian(1.0, 0.1, 50)], 1e-5)


def test_json_round_trip_recomputes(tmp_path):
    # Prepare
    ledger = _two_clients()
    path = tmp_path / "ledger.json"
    # Execute
    ledger.save(path)
    raw = json.loads(path.read_text())
    raw["epsilon_at_save"]["max"] = 0.0  # tampering with the readable copy changes nothing
    raw["epsilon_at_save"]["per_unit"] = {"client-0": 0.0}
    path.write_text(json.dumps(raw))
    loaded = PrivacyLedger.load(path)
    # Assert
    assert loaded.entries == ledger.entries
    assert loaded.epsilons() == ledger.epsilons()
    assert (loaded.mode, loaded.accountant, loaded.delta, loaded.unit_of_privacy) == \
        ("dpsgd", "rdp", 1e-5, "example")
    for key in ("mode", "accountant", "delta", "unit_of_privacy", "protects", "entries",
                "epsilon_at_save"):
        assert key in raw
    assert "example" in raw["protects"]
    assert PrivacyLedger.from_dict(ledger.to_dict()).epsilons() == ledger.epsilons()
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_infinite_epsilon_is_saved_as_strict_json(tmp_path):
    ledger = _ledger("local")
    ledger.append(LedgerEntry("client-0", 0, 0.0, 1.0, 1))
    ledger.save(tmp_path / "ledger.json")
    raw = json.loads((tmp_path / "ledger.json").read_text())
    assert raw["epsilon_at_save"]["max"] == "inf"
    assert PrivacyLedger.load(tmp_path / "ledger.json").epsilon() == math.inf


def test_merged_computation_equals_unmerged():
    # Prepare: many small entries against one combined event per (noise, rate)
    ledger = _ledger()
    for rnd in range(200):
        ledger.append(LedgerEntry("client-0", rnd, 1.0, 0.01, 5))
        if rnd % 4 == 0:
            ledger.append(LedgerEntry("client-0", rnd, 2.0, 0.1, 1))
    # Execute
    merged = ledger.epsilon("client-0")
    unmerged = compute_epsilon([e.event for e in ledger.entries], 1e-5)
    by_hand = compute_epsilon([SampledGaussian(1.0, 0.01, 1000),
                               SampledGaussian(2.0, 0.1, 50)], 1e-5)
    # Assert
    assert merged == pytest.approx(unmerged, rel=1e-12)
    assert merged == pytest.approx(by_hand, rel=1e-12)


def test_ten_thousand_entries_are_fast():
    import time

    ledger = _ledger()
    for rnd in range(100):
        for c in range(100):
            ledger.append(LedgerEntry(f"client-{c}", rnd, 1.2, 0.01 * (1 + c % 3), 4))
    start = time.perf_counter()
    eps = ledger.epsilons()
    assert len(eps) == 100
    assert time.perf_counter() - start < 2.0


def test_prv_ledger():
    ledger = _ledger("dpsgd", "prv")
    ledger.append(LedgerEntry("client-0", 0, 1.1, 0.01, 1000))
    assert ledger.epsilon() == compute_epsilon([SampledGaussian(1.1, 0.01, 1000)], 1e-5, "prv")


@pytest.mark.parametrize("args,message", [
    (("none", "rdp", 1e-5, "example"), "mode must be one of"),
    (("dpsgd", "moments", 1e-5, "example"), "accountant must be one of"),
    (("dpsgd", "rdp", 1.5, "example"), r"delta must be in \(0, 1\). Found 1.5"),
    (("dpsgd", "rdp", 1e-5, "client"), "unit_of_privacy must be 'example'"),
    (("client", "rdp", 1e-5, "example"), "unit_of_privacy must be 'client'"),
])
def test_bad_ledger_arguments(args, message):
    with pytest.raises(PrivacyError, match=message):
        PrivacyLedger(*args)


@pytest.mark.parametrize("kwargs,message", [
    ({"unit": ""}, "unit must be a non-empty string"),
    ({"server_round": -1}, r"server_round must be an integer >= 0. Found -1"),
    ({"sampling_rate": 1.3}, r"sampling_rate must be in \[0, 1\]. Found 1.3"),
    ({"noise_multiplier": -0.5}, "noise_multiplier must be"),
    ({"steps": -1}, "steps must be"),
])
def test_bad_entries(kwargs, message):
    fields = {"unit": "client-0", "server_round": 0, "noise_multiplier": 1.0,
              "sampling_rate": 0.1, "steps": 1}
    fields.update(kwargs)
    with pytest.raises(PrivacyError, match=message):
        LedgerEntry(**fields)


def test_load_errors_are_privacy_errors(tmp_path):
    with pytest.raises(PrivacyError, match="does not exist"):
        PrivacyLedger.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PrivacyError, match="cannot be read"):
        PrivacyLedger.load(bad)
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(PrivacyError, match="format"):
        PrivacyLedger.load(bad)


def test_entry_pickles():
    entry = LedgerEntry("client-3", 2, 0.9, 0.1, 4, note="x")
    assert pickle.loads(pickle.dumps(entry)) == entry
    assert LedgerEntry.from_dict(entry.to_dict()) == entry
