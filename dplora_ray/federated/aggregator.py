"""The aggregator: owns the global (trainable) LoRA state and turns client updates into
the next global state.

Strategies (registry :data:`STRATEGIES`, chosen by the privacy mechanism's
``aggregation``, :mod:`dplora_ray.privacy.mechanisms`):

* ``fedavg`` (mode ``none``): example-weighted mean of the updates (McMahan et al.
  2017, Alg. 1).
* ``mean`` (``dpsgd``, ``paper``, ``local``): unweighted mean (the paper's weights 1/K);
  updates are already private when they arrive.
* ``dp_fedavg`` (``client``): DP-FedAvg with fixed clipping (McMahan et al. 2018,
  Alg. 1 with the fixed-size estimator): each update is (re)clipped to C, the clipped
  updates are summed *unweighted* (example counts would change the sensitivity),
  N(0, sigma^2 C^2) is added to the sum, and the sum is divided by the *expected* cohort
  size q*N (not the realised one, which would be data dependent).

Updates in the T-FedAvg ternary wire format (``federation.compression=ternary``) are
dequantised first. The last applied global update (``server_learning_rate *
aggregate``) is kept for CMFL's relevance check (:meth:`Aggregator.get_last_update`).

The new global state is the server optimizer's step on the aggregate
(:mod:`dplora_ray.federated.server_opt`; FedAvg: ``state + server_learning_rate *
aggregate``). Updates arrive and
are summed in client-id order, so the result does not depend on which worker finished
first. Noise comes from the server's secret noise key (the run key derived for
``NoiseStream.SERVER``), one generator per round: never from the public seed, never
global.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dplora_ray.federated.compression import is_ternary_payload, ternary_decode
from dplora_ray.federated.server_opt import ServerOptimizer
from dplora_ray.privacy.mechanisms import get_mechanism
from dplora_ray.privacy.noise import clip_by_global_norm
from dplora_ray.privacy.streams import NoiseKey

__all__ = ["STRATEGIES", "Aggregator", "dp_fedavg", "fedavg", "unweighted_mean"]

State = dict[str, torch.Tensor]


def fedavg(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """Weighted mean ``sum_i w_i u_i / sum_i w_i`` (float32)."""
    if not updates:
        raise ValueError("fedavg needs at least one update")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"fedavg weights must sum to > 0, got {total}")
    keys = sorted(updates[0])
    out: State = {}
    for k in keys:
        acc = torch.zeros_like(updates[0][k], dtype=torch.float32)
        for u, w in zip(updates, weights):
            acc = acc + float(w) * u[k].float()
        out[k] = acc / total
    return out


def unweighted_mean(updates: Sequence[Mapping[str, torch.Tensor]]) -> State:
    return fedavg(updates, [1.0] * len(updates))


def dp_fedavg(updates: Sequence[Mapping[str, torch.Tensor]],
              template: Mapping[str, torch.Tensor], clipping_norm: float,
              noise_multiplier: float, expected_cohort: float,
              generator: torch.Generator) -> State:
    """(sum_i clip(u_i, C) + N(0, sigma^2 C^2)) / expected_cohort.

    ``template`` gives the keys and shapes (a round whose Poisson cohort came out empty
    still releases noise, so the shapes cannot come from the updates).
    """
    if expected_cohort <= 0:
        raise ValueError(f"expected_cohort must be > 0, got {expected_cohort}")
    clipped = [clip_by_global_norm({k: v.float() for k, v in u.items()}, clipping_norm)[0]
               for u in updates]
    std = noise_multiplier * clipping_norm
    out = {}
    for k in sorted(template):
        total = torch.zeros(template[k].shape, dtype=torch.float32)
        for c in clipped:
            total += c[k]
        if std > 0:
            total += torch.normal(0.0, std, size=tuple(template[k].shape), generator=generator)
        out[k] = total / expected_cohort
    return out


STRATEGIES = {"fedavg": fedavg, "mean": unweighted_mean, "dp_fedavg": dp_fedavg}


def strategy_for_mode(mode: str) -> str:
    return get_mechanism(mode).aggregation


class Aggregator:
    """Holds the global trainable LoRA state; runs inline or as a Ray actor.

    Args:
        initial: the trainable LoRA tensors at their seeded init.
        mode: ``privacy.mode``.
        server_learning_rate: step size on the aggregate.
        clipping_norm: C (``client`` mode).
        noise_key: the server's secret noise key (needed when the mechanism adds noise on
            the server; one generator per round is derived from it).
        keep_last_update: keep the last applied update for :meth:`get_last_update`
            (``federation.compression=cmfl``; off otherwise, so checkpoints stay small).
        server_optimizer: ``federation.server_optimizer``, applied to the aggregate
            (:mod:`dplora_ray.federated.server_opt`); ``server_options`` are its
            ``momentum``, ``beta1``, ``beta2`` and ``tau``.
    """

    def __init__(self, initial: Mapping[str, torch.Tensor], mode: str,
                 server_learning_rate: float, clipping_norm: float,
                 noise_key: NoiseKey | None = None, keep_last_update: bool = False,
                 server_optimizer: str = "fedavg",
                 server_options: Mapping[str, float] | None = None) -> None:
        self.state: State = {k: v.float().clone() for k, v in sorted(initial.items())}
        self.mode = mode
        self.strategy = strategy_for_mode(mode)
        self.server_lr = server_learning_rate
        self.clipping_norm = clipping_norm
        self.noise_key = noise_key
        self.keep_last_update = keep_last_update
        self.last_update: State | None = None
        self.optimizer = ServerOptimizer(server_optimizer, server_learning_rate,
                                         **dict(server_options or {}))

    def get_state(self) -> State:
        return self.state

    def get_last_update(self) -> State | None:
        """The last applied global update (None before the first non-empty round)."""
        return self.last_update

    def set_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = {k: v.float().clone() for k, v in sorted(state.items())}

    def _noise_generator(self, server_round: int) -> torch.Generator:
        if self.noise_key is None:
            from dplora_ray.errors import PrivacyError

            raise PrivacyError(f"privacy.mode={self.mode!r} adds noise on the server but the "
                               "aggregator has no noise key")
        return self.noise_key.generator(server_round)

    def aggregate(self, server_round: int, noise_multiplier: float, expected_cohort: float,
                  *worker_results: Sequence[Any]) -> dict[str, Any]:
        """Aggregate the accepted updates of one round and step the global state.

        ``worker_results`` are lists of ``ClientResult`` (one list per worker; Ray
        resolves them when passed as top-level ObjectRefs).
        """
        results = sorted((r for rs in worker_results for r in rs), key=lambda r: r.client_id)
        accepted = [r for r in results if r.update is not None]
        self.step(server_round, noise_multiplier, expected_cohort,
                  [r.num_examples for r in accepted], *[r.update for r in accepted])
        return {"state": self.state, "results": results, "num_accepted": len(accepted)}

    def step(self, server_round: int, noise_multiplier: float, expected_cohort: float,
             num_examples: Sequence[int], *updates: Mapping[str, torch.Tensor]) -> int:
        """Aggregate the accepted ``updates`` of one round (in client-id order, with the
        clients' example counts) and step the global state; returns how many were used.

        The updates are the LoRA tensors the clients sent, nothing else (Ray resolves
        them when passed as top-level ObjectRefs).
        """
        if len(num_examples) != len(updates):
            raise ValueError(f"{len(updates)} updates but {len(num_examples)} example counts")
        updates = tuple(ternary_decode(u, self.state) if is_ternary_payload(u) else u
                        for u in updates)
        if self.strategy == "dp_fedavg":
            agg = dp_fedavg(list(updates), self.state, self.clipping_norm, noise_multiplier,
                            expected_cohort, self._noise_generator(server_round))
        elif not updates:
            agg = None
        elif self.strategy == "fedavg":
            agg = fedavg(list(updates), list(num_examples))
        else:
            agg = unweighted_mean(list(updates))
        if agg is not None:
            self.state, delta = self.optimizer.step(self.state, agg)
            if self.keep_last_update:
                self.last_update = delta
        return len(updates)

    def checkpoint(self) -> dict[str, Any]:
        """What a resumed run needs: the global state and the server optimizer's state.

        The server optimizer's state is its moments (none for FedAvg).
        The noise generator is a function of (noise key, round), so it needs no state; the
        key itself is kept by the runner (only in ``checkpoint.pt``).
        The last applied update (CMFL's reference) is saved when there is one.
        """
        out = {"global_state": {k: v.clone() for k, v in self.state.items()},
                "server_optimizer": {**self.optimizer.state_dict(), "strategy": self.strategy}}
        if self.last_update is not None:
            out["last_update"] = {k: v.clone() for k, v in self.last_update.items()}
        return out

    def restore(self, checkpoint: Mapping[str, Any]) -> None:
        """Inverse of :meth:`checkpoint` (keys and shapes must match the current state)."""
        state = checkpoint["global_state"]
        if sorted(state) != sorted(self.state):
            raise ValueError("checkpoint's LoRA keys differ from the aggregator's")
        for k, v in state.items():
            if tuple(v.shape) != tuple(self.state[k].shape):
                raise ValueError(f"checkpoint tensor {k}: shape {tuple(v.shape)} != "
                                 f"{tuple(self.state[k].shape)}")
        self.set_state(state)
        self.optimizer.load_state_dict(checkpoint["server_optimizer"])
        last = checkpoint.get("last_update")
        self.last_update = ({k: v.float().clone() for k, v in last.items()}
                            if last is not None else None)
