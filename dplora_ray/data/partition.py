"""Split a training pool into client partitions (virtual clients).

Three partitioners, chosen by ``federation.partition`` from the explicit registry
:data:`PARTITIONERS`:

* ``iid``: a seeded shuffle, then near-equal contiguous chunks (sizes differ by <= 1).
* ``dirichlet``: label skew controlled by a concentration ``alpha``; small alpha gives
  clients dominated by few labels, large alpha approaches IID.
* ``natural``: the data's own groups (e.g. VADER's four sources) become clients.

Invariants:
    * Deterministic given ``seed``: the same inputs give the same partitions; the
      randomness comes from a ``numpy.random.SeedSequence`` derived from ``seed`` and a
      fixed stream tag, never from a global RNG.
    * The returned parts are sorted ``int64`` index arrays, pairwise disjoint, together
      covering ``range(len(labels))``, and none is empty (an empty client is a
      :class:`~dplora_ray.errors.DataError`, never silently dropped).
    * Inputs are not modified.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import numpy as np

from dplora_ray.errors import DataError

__all__ = ["PARTITIONERS", "label_histogram", "partition_indices"]

_STREAM = zlib.crc32(b"dplora_ray.data.partition")
# Dirichlet draws that leave a client empty are redrawn this many times before the
# deterministic repair (moving single examples from the largest clients) takes over.
DIRICHLET_MAX_REDRAWS = 100

_Parts = list[np.ndarray]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAM,)))


def _iid(
    labels: np.ndarray,
    groups: np.ndarray | None,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
) -> _Parts:
    return list(np.array_split(rng.permutation(len(labels)), num_clients))


def _dirichlet_draw(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[np.ndarray]]:
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
        for client, chunk in enumerate(np.split(idx, cuts)):
            pieces[client].append(chunk)
    return pieces


def _dirichlet(
    labels: np.ndarray,
    groups: np.ndarray | None,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
) -> _Parts:
    """Label skew: for every label, the shares of its examples that go to each client are
    drawn from Dirichlet(alpha * 1_K) (Yurochkin et al. 2019, "Bayesian nonparametric
    federated learning of neural networks"; the alpha-controlled non-IID benchmark of
    Hsu, Qi, Brown 2019, arXiv 1909.06335, Sec. 3).

    A draw that leaves a client empty is redrawn (up to :data:`DIRICHLET_MAX_REDRAWS`
    times); after that, each empty client receives one random example from the client
    that currently holds the most.
    """
    for _ in range(DIRICHLET_MAX_REDRAWS + 1):
        pieces = _dirichlet_draw(labels, num_clients, alpha, rng)
        parts = [np.concatenate(p) if p else np.empty(0, np.int64) for p in pieces]
        if all(len(p) > 0 for p in parts):
            return parts
    for client in range(num_clients):
        if len(parts[client]) == 0:
            donor = int(np.argmax([len(p) for p in parts]))
            if len(parts[donor]) < 2:  # fewer examples than clients; reported by caller
                break
            take = int(rng.integers(len(parts[donor])))
            parts[client] = parts[donor][take : take + 1]
            parts[donor] = np.delete(parts[donor], take)
    return parts


def _natural(
    labels: np.ndarray,
    groups: np.ndarray | None,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
) -> _Parts:
    """One client per group (groups in sorted order). With more clients than groups,
    every group gets one client and the extra clients go, one at a time, to the group
    with the most examples per client so far (proportional, D'Hondt); a group's examples
    are then shuffled and split near-equally among its clients (IID within the group)."""
    if groups is None or not np.any(groups != ""):
        raise DataError(
            "data.group_column",
            None,
            "federation.partition='natural' needs groups, and the data has none",
        )
    names, inverse = np.unique(groups, return_inverse=True)
    if num_clients < len(names):
        raise DataError(
            "federation.num_clients",
            num_clients,
            f"natural partition has {len(names)} groups; need at least {len(names)} clients",
        )
    sizes = np.bincount(inverse, minlength=len(names))
    seats = np.ones(len(names), dtype=np.int64)
    for _ in range(num_clients - len(names)):
        seats[int(np.argmax(sizes / seats))] += 1
    parts: _Parts = []
    for g in range(len(names)):
        idx = rng.permutation(np.flatnonzero(inverse == g))
        parts.extend(np.array_split(idx, seats[g]))
    return parts


Partitioner = Callable[[np.ndarray, "np.ndarray | None", int, float, np.random.Generator], _Parts]

PARTITIONERS: dict[str, Partitioner] = {
    "dirichlet": _dirichlet,
    "iid": _iid,
    "natural": _natural,
}


def partition_indices(
    labels: np.ndarray,
    groups: np.ndarray | None,
    num_clients: int,
    method: str,
    *,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split examples ``0..n-1`` into ``num_clients`` client partitions.

    Args:
        labels: integer label of each example (length n).
        groups: group name of each example (length n; ``""`` means none), used by
            ``natural``; may be None for the other methods.
        num_clients: number of clients (``federation.num_clients``).
        method: ``iid``, ``dirichlet`` or ``natural`` (``federation.partition``).
        alpha: Dirichlet concentration (``federation.dirichlet_alpha``).
        seed: seed of the partition's randomness.

    Returns:
        One sorted ``int64`` index array per client, disjoint, covering all examples.

    Raises:
        DataError: unknown method, bad alpha, more clients than examples, fewer clients
            than groups (``natural``), or a client left without examples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError("labels must be a 1-D integer array")
    n = len(labels)
    if groups is not None:
        groups = np.asarray(groups).astype(str)
        if groups.shape != labels.shape:
            raise ValueError("groups must have one entry per label")
    if method not in PARTITIONERS:
        raise DataError(
            "federation.partition",
            method,
            f"unknown partition; choose one of {', '.join(sorted(PARTITIONERS))}",
        )
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise DataError("federation.num_clients", num_clients, "must be an integer >= 1")
    num_clients = int(num_clients)
    if not (math.isfinite(alpha) and alpha > 0):
        raise DataError("federation.dirichlet_alpha", alpha, "must be > 0")
    if num_clients > n:
        raise DataError(
            "federation.num_clients", num_clients, f"more clients than training examples ({n})"
        )
    parts = PARTITIONERS[method](labels, groups, num_clients, float(alpha), _rng(seed))
    out = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    for i, part in enumerate(out):
        if len(part) == 0:
            raise DataError(
                "federation.num_clients",
                num_clients,
                f"client {i} has no examples (only {n} examples for {num_clients} clients)",
            )
    return out


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_labels: int) -> np.ndarray:
    """Label counts per client: an ``int64`` array of shape (clients, num_labels)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(f"labels must be in 0..{num_labels - 1}")
    out = np.zeros((len(parts), num_labels), dtype=np.int64)
    for i, part in enumerate(parts):
        out[i] = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_labels)
    return out
