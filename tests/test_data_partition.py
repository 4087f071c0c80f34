"""Client partitioners: coverage, disjointness, skew, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest

from dplora_ray.data import label_histogram, partition_indices
from dplora_ray.errors import DataError


def _labels(n: int = 900, num_labels: int = 3) -> np.ndarray:
    return np.arange(n) % num_labels


def _assert_partition(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for part in parts:
        assert part.dtype == np.int64
        assert len(part) > 0
        assert np.all(np.diff(part) > 0)  # sorted, no duplicates
    joined = np.concatenate(parts)
    assert len(joined) == n  # disjoint ...
    assert np.array_equal(np.sort(joined), np.arange(n))  # ... and covering


def _mean_max_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    hist = label_histogram(labels, parts, 3)
    return float(np.mean(hist.max(axis=1) / hist.sum(axis=1)))


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_clients", [1, 2, 7, 50])
def test_parts_are_disjoint_and_cover(method: str, num_clients: int) -> None:
    labels = _labels()
    parts = partition_indices(labels, None, num_clients, method, alpha=0.3, seed=3)
    _assert_partition(parts, len(labels), num_clients)


def test_iid_sizes_are_near_equal_and_label_mix_is_balanced() -> None:
    labels = _labels(1003)
    parts = partition_indices(labels, None, 10, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == 1003
    assert _mean_max_share(labels, parts) < 0.45  # IID: each label near 1/3


def test_iid_is_a_shuffle_not_contiguous_chunks() -> None:
    parts = partition_indices(_labels(100), None, 4, "iid", seed=0)
    assert not np.array_equal(parts[0], np.arange(25))


def test_dirichlet_small_alpha_skews_labels_far_more_than_large_alpha() -> None:
    labels = _labels(3000)
    small = np.mean(
        [
            _mean_max_share(
                labels, partition_indices(labels, None, 10, "dirichlet", alpha=0.1, seed=s)
            )
            for s in range(5)
        ]
    )
    large = np.mean(
        [
            _mean_max_share(
                labels, partition_indices(labels, None, 10, "dirichlet", alpha=100.0, seed=s)
            )
            for s in range(5)
        ]
    )
    assert small > 0.75  # clients dominated by one label
    assert large < 0.42  # close to the IID 1/3
    assert small - large > 0.3


def test_dirichlet_tiny_alpha_still_leaves_no_client_empty() -> None:
    labels = _labels(40)
    parts = partition_indices(labels, None, 20, "dirichlet", alpha=0.001, seed=0)
    _assert_partition(parts, 40, 20)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "natural"])
def test_same_seed_same_parts_different_seed_different_parts(method: str) -> None:
    labels = _labels(600)
    groups = np.array(["a", "b", "c"])[np.arange(600) // 200]
    first = partition_indices(labels, groups, 6, method, seed=11)
    again = partition_indices(labels, groups, 6, method, seed=11)
    other = partition_indices(labels, groups, 6, method, seed=12)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_inputs_are_not_modified() -> None:
    labels = _labels(90)
    groups = np.array(["x", "y", "z"] * 30)
    labels_before, groups_before = labels.copy(), groups.copy()
    partition_indices(labels, groups, 5, "natural", seed=0)
    partition_indices(labels, groups, 5, "dirichlet", seed=0)
    assert np.array_equal(labels, labels_before)
    assert np.array_equal(groups, groups_before)


def test_natural_one_client_per_group_in_sorted_group_order() -> None:
    groups = np.array(["nyt", "tweets", "amazon", "nyt", "amazon", "movies", "tweets"])
    labels = np.zeros(len(groups), dtype=np.int64)
    parts = partition_indices(labels, groups, 4, "natural", seed=0)
    _assert_partition(parts, len(groups), 4)
    assert [sorted(set(groups[p])) for p in parts] == [["amazon"], ["movies"], ["nyt"], ["tweets"]]
    assert [p.tolist() for p in parts] == [[2, 4], [5], [0, 3], [1, 6]]


def test_natural_more_clients_than_groups_splits_groups_proportionally() -> None:
    # groups of 600, 300 and 100 examples, 10 clients: 6 + 3 + 1 sub-clients
    groups = np.array(["a"] * 600 + ["b"] * 300 + ["c"] * 100)
    labels = _labels(1000)
    parts = partition_indices(labels, groups, 10, "natural", seed=0)
    _assert_partition(parts, 1000, 10)
    owners = [set(groups[p]) for p in parts]
    assert all(len(o) == 1 for o in owners)  # a client never mixes groups
    assert [o.pop() for o in owners] == ["a"] * 6 + ["b"] * 3 + ["c"]
    assert all(len(p) == 100 for p in parts)


def test_natural_small_group_gets_at_least_one_client() -> None:
    groups = np.array(["big"] * 97 + ["tiny"] * 3)
    parts = partition_indices(_labels(100), groups, 5, "natural", seed=0)
    assert [len(p) for p in parts] == [25, 24, 24, 24, 3]


def test_natural_fewer_clients_than_groups_names_num_clients() -> None:
    groups = np.array(["a", "b", "c", "d"] * 5)
    with pytest.raises(DataError) as info:
        partition_indices(_labels(20), groups, 3, "natural")
    assert info.value.key == "federation.num_clients"
    assert "federation.num_clients=3" in str(info.value)
    assert "4 groups" in str(info.value)


def test_natural_without_groups_is_an_error() -> None:
    with pytest.raises(DataError, match="data.group_column"):
        partition_indices(_labels(20), None, 2, "natural")
    with pytest.raises(DataError, match="data.group_column"):
        partition_indices(_labels(20), np.array([""] * 20), 2, "natural")


@pytest.mark.parametrize("method", ["iid", "dirichlet", "natural"])
def test_more_clients_than_examples_names_num_clients(method: str) -> None:
    groups = np.array(["a", "b", "a", "b", "a"])
    with pytest.raises(DataError) as info:
        partition_indices(_labels(5), groups, 6, method)
    assert info.value.key == "federation.num_clients"
    assert "federation.num_clients=6" in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_method_alpha_and_client_count_are_data_errors() -> None:
    with pytest.raises(DataError, match="federation.partition='shards'"):
        partition_indices(_labels(), None, 2, "shards")
    with pytest.raises(DataError, match="federation.dirichlet_alpha=0.0"):
        partition_indices(_labels(), None, 2, "dirichlet", alpha=0.0)
    with pytest.raises(DataError, match="federation.num_clients=0"):
        partition_indices(_labels(), None, 0, "iid")


def test_label_histogram_counts_per_client() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5])]
    hist = label_histogram(labels, parts, 4)
    assert hist.dtype == np.int64
    assert hist.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]
