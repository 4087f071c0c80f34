"""Server optimizers: how the aggregator applies a round's aggregated update.

The aggregate Delta (the mean of the clients' updates, already noised in every private
mode) is a pseudo-gradient; the server steps on it (Reddi et al. 2021, "Adaptive
Federated Optimization", Alg. 2, with eta = ``server_learning_rate``):

* ``fedavg``:  x += eta Delta
* ``fedavgm``: m = mu m + Delta;  x += eta m  (Hsu et al. 2019)
* ``fedadam``: m = b1 m + (1 - b1) Delta;  v = b2 v + (1 - b2) Delta^2;
  x += eta m / (sqrt(v) + tau)
* ``fedyogi``: as ``fedadam`` with v = v - (1 - b2) Delta^2 sign(v - Delta^2)

m starts at 0 and v at tau^2 (Reddi et al.: v_{-1} >= tau^2). Everything here is a
function of released values only, so it is post-processing: it costs no privacy in any
mode. The state (m, v) travels in the checkpoint, so a resumed run steps exactly as the
uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["SERVER_OPTIMIZERS", "ServerOptimizer"]

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")

State = dict[str, torch.Tensor]


class ServerOptimizer:
    """One of :data:`SERVER_OPTIMIZERS` with its hyperparameters and state."""

    def __init__(self, name: str = "fedavg", learning_rate: float = 1.0, *,
                 momentum: float = 0.9, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimizer must be one of {SERVER_OPTIMIZERS}, got {name!r}")
        self.name, self.lr = name, float(learning_rate)
        self.momentum, self.beta1, self.beta2, self.tau = momentum, beta1, beta2, tau
        self.m: State = {}
        self.v: State = {}

    def step(self, params: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor]
             ) -> tuple[State, State]:
        """(new parameters, the update applied to them)."""
        applied: State = {}
        for k, g in aggregate.items():
            g = g.float()
            if self.name == "fedavg":
                applied[k] = self.lr * g
                continue
            if self.name == "fedavgm":
                m = self.m.get(k, torch.zeros_like(g))
                self.m[k] = self.momentum * m + g
                applied[k] = self.lr * self.m[k]
                continue
            m = self.m.get(k, torch.zeros_like(g))
            v = self.v.get(k, torch.full_like(g, self.tau * self.tau))
            self.m[k] = self.beta1 * m + (1.0 - self.beta1) * g
            g2 = g * g
            if self.name == "fedadam":
                self.v[k] = self.beta2 * v + (1.0 - self.beta2) * g2
            else:  # fedyogi
                self.v[k] = v - (1.0 - self.beta2) * g2 * torch.sign(v - g2)
            applied[k] = self.lr * self.m[k] / (self.v[k].sqrt() + self.tau)
        new = {k: p + applied[k] if k in applied else p for k, p in params.items()}
        return new, applied

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "server_learning_rate": self.lr,
                "m": {k: v.clone() for k, v in self.m.items()},
                "v": {k: v.clone() for k, v in self.v.items()}}

    def load_state_dict(self, raw: Mapping[str, Any]) -> None:
        if raw.get("name", "fedavg") != self.name:
            raise ValueError(f"checkpoint's server optimizer is {raw.get('name')!r}, "
                             f"not {self.name!r}")
        self.m = {k: v.float().clone() for k, v in (raw.get("m") or {}).items()}
        self.v = {k: v.float().clone() for k, v in (raw.get("v") or {}).items()}
