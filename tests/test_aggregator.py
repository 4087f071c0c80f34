"""Aggregation: FedAvg, unweighted mean, DP-FedAvg (clip, noise, expected cohort), and the
Aggregator's ordering, skipping and server learning rate. Hand-computed values; no Ray."""

from __future__ import annotations

import math

import pytest
import torch

from dplora_ray.federated.aggregator import (
    STRATEGIES,
    Aggregator,
    dp_fedavg,
    fedavg,
    strategy_for_mode,
    unweighted_mean,
)
from dplora_ray.federated.client import ClientResult
from dplora_ray.privacy.streams import NoiseKey


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _result(
    client_id: int, update: dict[str, torch.Tensor] | None, num_examples: int = 1, worker: int = 0
) -> ClientResult:
    return ClientResult(
        client_id=client_id,
        worker=worker,
        status="ok" if update is not None else "rejected_nonfinite",
        num_examples=num_examples,
        train_loss=0.0,
        update=update,
        update_norm=0.0,
        bytes_up=0,
        seconds=0.0,
        steps=1,
        sampling_rate=1.0,
    )


# --------------------------------------------------------------------------- strategies
def test_fedavg_weights_by_examples() -> None:
    # Prepare
    updates = [{"w": _t(1, 2)}, {"w": _t(3, 4)}]

    # Execute
    out = fedavg(updates, weights=[1, 3])

    # Assert: (1*[1,2] + 3*[3,4]) / 4
    assert torch.allclose(out["w"], _t(2.5, 3.5))


def test_unweighted_mean() -> None:
    # Prepare
    updates = [{"w": _t(1, 2), "v": _t(0)}, {"w": _t(3, 4), "v": _t(6)}]

    # Execute
    out = unweighted_mean(updates)

    # Assert
    assert list(out) == ["v", "w"]
    assert torch.allclose(out["w"], _t(2, 3))
    assert torch.allclose(out["v"], _t(3))


def test_fedavg_rejects_empty_and_zero_weights() -> None:
    with pytest.raises(ValueError, match="at least one update"):
        fedavg([], [])
    with pytest.raises(ValueError, match="sum to > 0"):
        fedavg([{"w": _t(1)}], [0])


def test_fedavg_does_not_mutate_its_inputs() -> None:
    # Prepare
    updates = [{"w": _t(1, 2)}, {"w": _t(3, 4)}]

    # Execute
    fedavg(updates, [1, 3])

    # Assert
    assert torch.equal(updates[0]["w"], _t(1, 2)) and torch.equal(updates[1]["w"], _t(3, 4))


def test_strategy_registry() -> None:
    assert set(STRATEGIES) == {"fedavg", "mean", "dp_fedavg"}
    assert [strategy_for_mode(m) for m in ("none", "dpsgd", "paper", "client", "local")] == [
        "fedavg",
        "mean",
        "mean",
        "dp_fedavg",
        "mean",
    ]


# --------------------------------------------------------------------------- DP-FedAvg
def test_dp_fedavg_without_noise_is_clipped_sum_over_expected_cohort() -> None:
    # Prepare: update 1 has global norm 5 (over both tensors) -> scaled by 1/5 to norm 1;
    # update 2 has norm 0.5 <= C and is left alone; expected cohort 2.5
    u1 = {"a": _t(3, 0), "b": _t(4)}
    u2 = {"a": _t(0.3, 0.0), "b": _t(-0.4)}
    template = {"a": torch.zeros(2), "b": torch.zeros(1)}

    # Execute
    out = dp_fedavg(
        [u1, u2],
        template,
        clipping_norm=1.0,
        noise_multiplier=0.0,
        expected_cohort=2.5,
        generator=torch.Generator().manual_seed(0),
    )

    # Assert: ([0.6, 0] + [0.3, 0]) / 2.5 and (0.8 - 0.4) / 2.5
    assert torch.allclose(out["a"], _t(0.36, 0.0))
    assert torch.allclose(out["b"], _t(0.16))
    assert torch.equal(u1["a"], _t(3, 0))  # inputs untouched


def test_dp_fedavg_zero_update_is_not_divided_by_zero() -> None:
    # Execute
    out = dp_fedavg(
        [{"a": torch.zeros(3)}],
        {"a": torch.zeros(3)},
        clipping_norm=1.0,
        noise_multiplier=0.0,
        expected_cohort=1.0,
        generator=torch.Generator().manual_seed(0),
    )

    # Assert
    assert torch.equal(out["a"], torch.zeros(3))


def test_dp_fedavg_noise_std_is_sigma_c_over_expected_cohort() -> None:
    # Prepare: no updates, 50,000 noise draws; std = 2.0 * 0.5 / 4 = 0.25
    template = {"a": torch.zeros(200, 150), "b": torch.zeros(20_000)}
    sigma, clip, cohort = 2.0, 0.5, 4.0

    # Execute
    out = dp_fedavg(
        [],
        template,
        clipping_norm=clip,
        noise_multiplier=sigma,
        expected_cohort=cohort,
        generator=torch.Generator().manual_seed(42),
    )
    draws = torch.cat([out["a"].flatten(), out["b"]]).double()

    # Assert: sd of the sample sd is ~0.25/sqrt(2n) = 0.0008; of the mean 0.25/sqrt(n)
    assert out["a"].shape == (200, 150) and out["b"].shape == (20_000,)
    assert abs(float(draws.std()) - 0.25) < 0.005
    assert abs(float(draws.mean())) < 0.005


def test_dp_fedavg_noise_is_added_to_the_clipped_sum() -> None:
    # Prepare: the same generator seed with and without an update
    template = {"a": torch.zeros(4)}
    update = {"a": _t(10, 0, 0, 0)}  # clipped to [1, 0, 0, 0]

    # Execute
    noise = dp_fedavg([], template, 1.0, 0.5, 2.0, torch.Generator().manual_seed(7))
    both = dp_fedavg([update], template, 1.0, 0.5, 2.0, torch.Generator().manual_seed(7))

    # Assert
    assert torch.allclose(both["a"] - noise["a"], _t(0.5, 0, 0, 0))


def test_dp_fedavg_empty_cohort_still_releases_noise() -> None:
    # Prepare
    template = {"x": torch.zeros(3, 2), "y": torch.zeros(5)}

    # Execute
    out = dp_fedavg([], template, 1.0, 1.0, 3.0, torch.Generator().manual_seed(0))

    # Assert
    assert {k: tuple(v.shape) for k, v in out.items()} == {"x": (3, 2), "y": (5,)}
    assert all(bool((v != 0).all()) for v in out.values())


def test_dp_fedavg_rejects_non_positive_expected_cohort() -> None:
    with pytest.raises(ValueError, match="expected_cohort"):
        dp_fedavg([], {"a": torch.zeros(1)}, 1.0, 1.0, 0.0, torch.Generator())


# --------------------------------------------------------------------------- Aggregator
def test_aggregate_fedavg_with_server_learning_rate() -> None:
    # Prepare: state [1, 1]; updates [1,2] (1 example), [3,4] (3 examples); server lr 0.5
    agg = Aggregator(
        {"w": _t(1, 1)}, mode="none", server_learning_rate=0.5, clipping_norm=1.0, noise_key=NoiseKey.from_seed(0)
    )
    results = [
        _result(0, {"w": _t(1, 2)}, num_examples=1),
        _result(1, {"w": _t(3, 4)}, num_examples=3),
    ]

    # Execute
    out = agg.aggregate(1, 0.0, 2.0, results)

    # Assert: [1, 1] + 0.5 * [2.5, 3.5]
    assert torch.allclose(agg.get_state()["w"], _t(2.25, 2.75))
    assert out["num_accepted"] == 2
    assert torch.equal(out["state"]["w"], agg.get_state()["w"])


def test_aggregate_skips_rejected_updates() -> None:
    # Prepare
    agg = Aggregator(
        {"w": _t(0, 0)}, mode="dpsgd", server_learning_rate=1.0, clipping_norm=1.0, noise_key=NoiseKey.from_seed(0)
    )
    results = [_result(0, {"w": _t(1, 2)}), _result(1, None), _result(2, {"w": _t(3, 4)})]

    # Execute
    out = agg.aggregate(1, 1.0, 3.0, results)

    # Assert: unweighted mean of the two accepted updates
    assert torch.allclose(agg.get_state()["w"], _t(2, 3))
    assert out["num_accepted"] == 2
    assert [r.client_id for r in out["results"]] == [0, 1, 2]  # rejected still reported


def test_aggregate_with_no_accepted_update_keeps_the_state() -> None:
    # Prepare
    agg = Aggregator(
        {"w": _t(5, 6)}, mode="none", server_learning_rate=1.0, clipping_norm=1.0, noise_key=NoiseKey.from_seed(0)
    )

    # Execute
    out = agg.aggregate(1, 0.0, 1.0, [_result(0, None)])

    # Assert
    assert torch.equal(agg.get_state()["w"], _t(5, 6))
    assert out["num_accepted"] == 0


@pytest.mark.parametrize("mode", ["none", "paper", "client"])
def test_aggregate_is_independent_of_worker_order(mode: str) -> None:
    # Prepare: float sums depend on the order of addition, so only a fixed (client id)
    # order gives bit-identical states
    gen = torch.Generator().manual_seed(0)
    updates = {cid: {"w": torch.randn(64, generator=gen) * 10 ** (cid % 3)} for cid in range(6)}
    results = {
        cid: _result(cid, u, num_examples=cid + 1, worker=cid % 2) for cid, u in updates.items()
    }
    orders = [
        ([results[0], results[2], results[4]], [results[1], results[3], results[5]]),
        ([results[5], results[3], results[1]], [results[4], results[0], results[2]]),
        ([results[3]], [results[2], results[5], results[0], results[1], results[4]]),
    ]

    # Execute
    states = []
    for worker_lists in orders:
        agg = Aggregator(
            {"w": torch.zeros(64)}, mode=mode, server_learning_rate=1.0, clipping_norm=1.0, noise_key=NoiseKey.from_seed(9)
        )
        out = agg.aggregate(3, 0.7, 3.0, *worker_lists)
        states.append(agg.get_state()["w"])
        assert [r.client_id for r in out["results"]] == list(range(6))

    # Assert
    assert all(torch.equal(s, states[0]) for s in states[1:])


def test_aggregate_client_mode_noise_is_seeded_by_round() -> None:
    # Prepare
    def run(seed: int, server_round: int) -> torch.Tensor:
        agg = Aggregator(
            {"w": torch.zeros(8)},
            mode="client",
            server_learning_rate=1.0,
            clipping_norm=1.0,
            noise_key=NoiseKey.from_seed(seed),
        )
        agg.aggregate(server_round, 1.0, 2.0, [])  # empty cohort: noise only
        return agg.get_state()["w"]

    # Execute
    a, a_again, other_round, other_seed = run(0, 1), run(0, 1), run(0, 2), run(1, 1)

    # Assert
    assert torch.equal(a, a_again)
    assert not torch.equal(a, other_round)
    assert not torch.equal(a, other_seed)
    assert float(a.abs().sum()) > 0


def test_aggregate_client_mode_clips_and_divides_by_expected_cohort() -> None:
    # Prepare: an update of norm 5 with C = 1, expected cohort 2, no noise
    agg = Aggregator(
        {"w": _t(0, 0)}, mode="client", server_learning_rate=1.0, clipping_norm=1.0, noise_key=NoiseKey.from_seed(0)
    )

    # Execute
    agg.aggregate(1, 0.0, 2.0, [_result(0, {"w": _t(3, 4)}, num_examples=100)])

    # Assert: [0.6, 0.8] / 2 (example count ignored)
    assert torch.allclose(agg.get_state()["w"], _t(0.3, 0.4))


def test_set_state_copies() -> None:
    # Prepare
    agg = Aggregator({"w": _t(0)}, mode="none", server_learning_rate=1.0, clipping_norm=1.0, noise_key=NoiseKey.from_seed(0))
    new = {"w": _t(2)}

    # Execute
    agg.set_state(new)
    new["w"] += 1

    # Assert
    assert math.isclose(float(agg.get_state()["w"]), 2.0)
