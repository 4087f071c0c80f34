"""One release of each mechanism's real code path on a model whose per-example
gradients the auditor chooses: the "Dirac canary" harness of the white-box audit.

The model is linear: one ``nn.Linear(d, 1)`` named like a LoRA A factor and one like a B
factor (``layer.lora_A.default.weight``, ``layer.lora_B.default.weight``); the loss of
example ``x`` is ``A x[:d] + B x[d:]``, so its gradient is ``x`` itself, whatever the
parameters. A canary is an example whose gradient points along one coordinate, far
outside the clipping ball, so that after clipping its contribution is a known vector
(Nasr et al. 2021, "Adversary Instantiation", and Nasr et al. 2023, "Tight Auditing of
Differentially Private Machine Learning": gradient canaries).

Everything else is the production code: :class:`DiracWorker` is a
:class:`~dplora_ray.federated.client.ClientWorker` that only replaces the model, the loss
and the state loading; :meth:`ClientWorker.train_client` runs the mechanism's trainer
(``dpsgd``: Opacus' per-sample gradients and
:class:`~dplora_ray.privacy.dpsgd.Float32ClipDPOptimizer`; ``paper``: the A/B batch
clipping and noise; ``plain``), the mechanism's ``client_transform`` (``client``: clip;
``local``: clip and noise) and the wire cast, and the ``client`` mode's server noise is
:class:`~dplora_ray.federated.aggregator.Aggregator` (``dp_fedavg``). Noise keys come from
``mechanism.noise_key_for`` exactly as the runner derives them.

Per mode, a :class:`Scenario` says which data the client(s) hold without and with the
canary, and the claimed worst-case change of the release (direction ``v``, norm
``delta_claimed``), so that a release maps to one score in units of the claimed
sensitivity: world 0 centred at 0, world 1 at 1, noise std ``sigma_eff`` (the
accountant's effective multiplier) for a correct mechanism.

Imports torch, Opacus and the client worker (so transformers), never Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from dplora_ray.config import ExperimentConfig, load_config
from dplora_ray.federated.aggregator import Aggregator
from dplora_ray.federated.client import ClientJob, ClientWorker
from dplora_ray.privacy.mechanisms import Mechanism, get_mechanism
from dplora_ray.privacy.streams import NoiseKey

__all__ = ["DIRAC_MODES", "DiracWorker", "Scenario", "scenario"]

#: the private modes the harness covers
DIRAC_MODES = ("dpsgd", "paper", "client", "local")
DIM = 4  # coordinates per factor group
CANARY_SCALE = 4.0  # a canary's raw gradient/update is this many C along its coordinate
PUBLIC_SEED = 0  # the public seed of the harness's jobs (batches: every example at q = 1)


class _DiracModel(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        layer = nn.Module()  # names like PEFT's: layer.lora_A.default.weight
        layer.lora_A = nn.ModuleDict({"default": nn.Linear(d, 1, bias=False)})
        layer.lora_B = nn.ModuleDict({"default": nn.Linear(d, 1, bias=False)})
        self.layer = layer
        self.d = d
        for p in self.parameters():
            nn.init.zeros_(p)

    def _factor(self, name: str) -> nn.Module:
        return cast(nn.ModuleDict, getattr(self.layer, name))["default"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self._factor("lora_A")(x[:, :self.d])
        return (a + self._factor("lora_B")(x[:, self.d:])).squeeze(1)


class DiracWorker(ClientWorker):
    """A :class:`ClientWorker` whose model is linear and whose examples are their own
    gradients (``examples[i]`` is example i's gradient: ``2 d`` numbers, the A factor's
    ``d`` then the B factor's)."""

    def __init__(self, cfg: ExperimentConfig, examples: np.ndarray) -> None:  # noqa: D107
        # deliberately not ClientWorker.__init__: no base model, no tokenizer, no data
        import warnings

        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        self.cfg = cfg
        self.worker_index = 0
        self.data = None  # type: ignore[assignment]
        self.device = torch.device("cpu")
        self.full = False
        self.model = _DiracModel(np.asarray(examples).shape[1] // 2)
        self._init_state = {k: p.detach().clone() for k, p in self._named_lora()}
        self._params = {k: p for k, p in self._named_lora() if p.requires_grad}
        self.mech = get_mechanism(cfg.privacy.mode)
        self._paper_groups = None
        self.task_type = "classification"
        self.choices = 1
        self.autocast = False
        self.gsm = None
        if self.mech.local_training == "dpsgd":
            from opacus import GradSampleModule

            self.gsm = GradSampleModule(self.model, batch_first=True, loss_reduction="mean")
        self.examples = torch.as_tensor(np.asarray(examples, dtype=np.float32))

    def _named_lora(self):  # type: ignore[no-untyped-def]
        return sorted(self.model.named_parameters())

    def _loss(self, idx: np.ndarray) -> torch.Tensor:
        return self.model(self.examples[torch.as_tensor(np.asarray(idx, dtype=np.int64))]).mean()

    def _load_global(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self._params.items():
                p.copy_(state[k].float())


def _unit(i: int) -> np.ndarray:
    e = np.zeros(2 * DIM)
    e[i] = 1.0
    return e


def harness_config(mode: str, clipping_norm: float = 1.0, batch_size: int = 64
                   ) -> ExperimentConfig:
    """The config the harness's workers read: one local SGD step of learning rate 1,
    float32 on the wire, Poisson rate 1 (the batch size is at least every client's data),
    the given ``privacy.mode`` and ``C``."""
    return load_config(None, {
        "privacy.mode": mode, "privacy.clipping_norm": clipping_norm,
        "privacy.noise_multiplier": 1.0, "privacy.delta": 1e-5,
        "federation.optimizer": "sgd", "federation.learning_rate": 1.0,
        "federation.local_steps": 1, "federation.batch_size": batch_size,
        "federation.num_clients": 4, "federation.clients_per_round": 2,
        "federation.transfer_dtype": "float32", "federation.compression": "none",
        "federation.server_learning_rate": 1.0, "federation.server_optimizer": "fedavg",
        **({"federation.cohort_sampling": "poisson"} if mode == "client" else {}),
        "runtime.backend": "inline"})


def flatten(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """A release as one float64 vector (keys in sorted order)."""
    return np.concatenate([state[k].detach().double().reshape(-1).cpu().numpy()
                           for k in sorted(state)])


@dataclass
class Scenario:
    """One mode's Dirac-canary game on the real code path.

    ``release(run_key, server_round, world, sigma)`` runs one round of the mechanism
    (world 0: without the canary; world 1: with it) and returns the flattened release.
    ``score`` maps a release to ``<release - center, v> / delta_claimed``.
    """

    mode: str
    clipping_norm: float
    v: np.ndarray  # unit direction of the claimed worst-case change of the release
    delta_claimed: float  # its claimed norm (the sensitivity, in release units)
    effective_scale: float  # the mechanism's sigma -> the accountant's multiplier
    mechanism: Mechanism
    what: str  # the canary, in words
    _workers: dict[str, Any] = field(default_factory=dict, repr=False)
    _jobs: dict[int, list[tuple[str, np.ndarray, int]]] = field(default_factory=dict,
                                                                repr=False)
    center: float = 0.0
    _uploads: dict[tuple[int, int, float], Any] = field(default_factory=dict, repr=False)

    def _train(self, worker: DiracWorker, run_key: NoiseKey | None, server_round: int,
               client: int, indices: np.ndarray, sigma: float) -> dict[str, torch.Tensor]:
        job = ClientJob(client_id=client, indices=indices,
                        seed=PUBLIC_SEED + 1000 * server_round + client,
                        noise_multiplier=sigma,
                        noise_key=self.mechanism.noise_key_for(run_key, "client",
                                                               server_round, client))
        zero = {k: torch.zeros_like(p) for k, p in worker.trainable_params.items()}
        result = worker.train_client(zero, job)
        if result.update is None:
            raise RuntimeError(f"the harness's client update was rejected: {result.status}")
        return dict(result.update)

    def release(self, run_key: NoiseKey | None, server_round: int, world: int, sigma: float
                ) -> np.ndarray:
        """The release of round ``server_round`` in ``world`` (0: no canary, 1: canary)."""
        cached = self.mechanism.noise_by == "server"
        uploads = self._uploads.get((world, server_round, sigma)) if cached else None
        if uploads is None:
            uploads = [(self._train(self._workers[name], run_key, server_round, client,
                                    idx, sigma), len(idx))
                       for name, idx, client in self._jobs[world]]
            if cached:  # the clients add no noise: their uploads are the same every trial
                self._uploads[(world, server_round, sigma)] = uploads
        if self.mechanism.aggregation != "dp_fedavg":
            return flatten(uploads[0][0])  # what the client uploads (one client per game)
        agg = Aggregator({k: torch.zeros_like(v) for k, v in uploads[0][0].items()},
                         self.mode, server_learning_rate=1.0,
                         clipping_norm=self.clipping_norm,
                         noise_key=self.mechanism.noise_key_for(run_key, "server"))
        agg.step(server_round, sigma, 1.0, [n for _, n in uploads], *[u for u, _ in uploads])
        return flatten(agg.get_state())

    def score(self, release: np.ndarray) -> float:
        return (float(release @ self.v) - self.center) / self.delta_claimed

    def scores(self, releases: np.ndarray) -> np.ndarray:
        return (np.asarray(releases) @ self.v - self.center) / self.delta_claimed


def scenario(mode: str, clipping_norm: float = 1.0) -> Scenario:
    """The Dirac-canary game of ``mode`` (one of :data:`DIRAC_MODES`); see the module doc.

    * ``dpsgd``: a client with three other examples (gradients on other coordinates, one
      inside the clipping ball, two outside); the canary's gradient is ``4 C e_0``,
      clipped to ``C e_0``. Every example is in the batch (q = 1); the release is the
      upload ``-(sum + noise) / B``: sensitivity ``C / B`` along ``-e_0``.
    * ``paper``: the rest of the batch is one example of gradient ``-2C (a + b)`` (``a``,
      ``b``: the first coordinate of the A and of the B factor); the canary's is
      ``+6C (a + b)``. The batch means (``-2C`` and ``+2C`` per group) clip to ``-C`` and
      ``+C``: each group moves by ``2C``, together ``2 sqrt(2) C`` (the 2C sensitivity
      the accountant assumes per group).
    * ``client``: two other clients with updates on other coordinates; the canary client's
      update is ``4 C e_0``, clipped to ``C e_0``; the server sums, adds
      ``N(0, sigma^2 C^2)`` and divides by the expected cohort (1 here).
    * ``local``: one client whose data is replaced: its update is ``-4 C e_0`` without the
      canary and ``+4 C e_0`` with it (the canary example outweighs the other), clipped
      to ``-C e_0`` / ``+C e_0``: ``2C`` apart, the replacement sensitivity.
    """
    if mode not in DIRAC_MODES:
        raise ValueError(f"mode must be one of {DIRAC_MODES}. Found {mode!r}.")
    C = float(clipping_norm)
    mech = get_mechanism(mode)
    cfg = harness_config(mode, C)
    B = cfg.federation.batch_size
    a, b = _unit(0), _unit(DIM)
    if mode == "dpsgd":
        rest = np.stack([0.5 * C * _unit(1), 3.0 * C * _unit(2), 2.0 * C * _unit(DIM + 1)])
        examples = np.vstack([rest, CANARY_SCALE * C * a])
        workers = {"c": DiracWorker(cfg, examples)}
        jobs = {0: [("c", np.arange(3), 0)], 1: [("c", np.arange(4), 0)]}
        sc = Scenario(mode, C, -a, C / B, 1.0, mech,
                      "one example whose gradient is 4C along one coordinate", workers, jobs)
    elif mode == "paper":
        examples = np.stack([-2.0 * C * (a + b), 6.0 * C * (a + b)])
        workers = {"c": DiracWorker(cfg, examples)}
        jobs = {0: [("c", np.arange(1), 0)], 1: [("c", np.arange(2), 0)]}
        sc = Scenario(mode, C, -(a + b) / math.sqrt(2.0), 2.0 * math.sqrt(2.0) * C,
                      mech.effective_scale(True), mech,
                      "one example that flips both clipped batch means from -C to +C",
                      workers, jobs)
    elif mode == "client":
        # plain training: update = -lr * mean gradient, so a gradient -g moves by +g
        others = np.stack([-0.7 * C * _unit(1), -5.0 * C * _unit(DIM + 2)])
        examples = np.vstack([others, -CANARY_SCALE * C * a])
        workers = {"c": DiracWorker(cfg, examples)}
        jobs = {0: [("c", np.array([0]), 1), ("c", np.array([1]), 2)],
                1: [("c", np.array([0]), 1), ("c", np.array([1]), 2),
                    ("c", np.array([2]), 3)]}
        sc = Scenario(mode, C, a, C, 1.0, mech,
                      "one client whose update is 4C along one coordinate", workers, jobs)
    else:  # local: replacement of the client's data by one extra (outweighing) example
        examples = np.stack([CANARY_SCALE * C * a, -3.0 * CANARY_SCALE * C * a])
        workers = {"c": DiracWorker(cfg, examples)}
        jobs = {0: [("c", np.arange(1), 0)], 1: [("c", np.arange(2), 0)]}
        sc = Scenario(mode, C, a, 2.0 * C, mech.effective_scale(True), mech,
                      "one example that flips the client's clipped update from -C to +C",
                      workers, jobs)
    # the noise-free world-0 release places world 0 at 0 (a public computation: the
    # auditor knows the data; sigma = 0 runs the same code without noise)
    key = NoiseKey.from_seed(0)
    sc.center = float(sc.release(key, 0, 0, 0.0) @ sc.v)
    return sc
