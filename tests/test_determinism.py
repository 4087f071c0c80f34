"""Determinism: the same config and seed give identical ``rounds.parquet``,
``clients.parquet`` (timing columns and ``worker`` aside) and adapter bytes, whatever the
number of workers and whatever order the clients finish in.

All randomness is derived from (run seed, stream, round, client): the tests below pin
that the derivation depends on nothing else, that 1 and 3 worker actors give the same
run (evaluation batches are fixed chunks of one global order, not per-worker shards),
and that reversing the order in which client results come back changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from dplora_ray import results as R
from dplora_ray.cli import main
from dplora_ray.config import load_config
from dplora_ray.federated.backends import InlineBackend
from dplora_ray.federated.runner import derive_seed, sample_cohorts

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
#: DP-SGD (Poisson batches, Opacus noise) and Poisson cohorts: every RNG stream is used;
#: the runs compared share one (reproducible) noise key, as a resumed run shares its own
RUN = ("privacy.mode=dpsgd", "federation.rounds=2", "federation.cohort_sampling=poisson",
       "privacy.noise_seed=1")


def _train(out: Path, *overrides: str) -> int:
    argv = ["train", str(TINY), "--out", str(out), "--no-progress"]
    for o in (*RUN, *overrides):
        argv += ["--set", o]
    return main(argv)


def assert_identical(out: Path, ref: Path) -> None:
    for name, drop in (("rounds.parquet", [R.ROUND_SECONDS]),
                       ("clients.parquet", [R.SECONDS, R.WORKER])):
        got = pd.read_parquet(out / name).drop(columns=drop)
        want = pd.read_parquet(ref / name).drop(columns=drop)
        pd.testing.assert_frame_equal(got, want, check_exact=True)
    adapter = "adapter/adapter_model.safetensors"
    assert (out / adapter).read_bytes() == (ref / adapter).read_bytes()
    assert (out / "ledger.json").read_text() == (ref / "ledger.json").read_text()


def test_seeds_depend_only_on_the_run_seed_and_the_position() -> None:
    # Execute
    a = [derive_seed(7, 2, r, c) for r in (1, 2) for c in (0, 1)]
    b = [derive_seed(7, 2, r, c) for r in (1, 2) for c in (0, 1)]

    # Assert: reproducible, distinct per (round, client) and per run seed, 63-bit
    assert a == b and len(set(a)) == 4
    assert derive_seed(8, 2, 1, 0) != a[0]
    assert all(0 <= s < 2**63 for s in a)
    cfg = load_config(TINY, list(RUN))
    first, again = sample_cohorts(cfg), sample_cohorts(cfg)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))


@pytest.mark.ray
def test_one_and_three_workers_give_the_same_run(ray_session: Any, tmp_path: Path) -> None:
    # Execute
    one, three = tmp_path / "one", tmp_path / "three"
    assert _train(one, "runtime.backend=actors", "runtime.num_workers=1",
                  "runtime.cpus_per_worker=0.3") == 0
    assert _train(three, "runtime.backend=actors", "runtime.num_workers=3",
                  "runtime.cpus_per_worker=0.3") == 0

    # Assert: the work really was spread differently, the results are identical
    workers_three = set(pd.read_parquet(three / "clients.parquet")[R.WORKER])
    assert set(pd.read_parquet(one / "clients.parquet")[R.WORKER]) == {0}
    assert len(workers_three) > 1
    assert_identical(three, one)


def test_the_order_clients_finish_in_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a reference run, then one where the last pending client always finishes
    # first
    ref, out = tmp_path / "ref", tmp_path / "reversed"
    assert _train(ref, "runtime.backend=inline") == 0
    wait = InlineBackend.wait
    order: list[int] = []

    def last_first(self: InlineBackend, futures: Any, timeout: Any) -> Any:
        ready = wait(self, list(reversed(futures)), timeout)
        order.append(len(futures))
        return ready

    monkeypatch.setattr(InlineBackend, "wait", last_first)

    # Execute
    assert _train(out, "runtime.backend=inline") == 0

    # Assert
    assert any(n > 1 for n in order)  # there was a choice to make
    assert_identical(out, ref)
