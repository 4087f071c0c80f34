"""One object per privacy mode: what it protects, who adds the noise, how it samples, what a
round charges, and the transforms applied on the client and on the server.

Every other module asks the mechanism of ``privacy.mode`` (:func:`get_mechanism`) instead
of comparing mode strings, so adding a mode means adding one class here (cf. Opacus'
optimizer with overridable clip and noise steps, Flower's DP wrappers around a strategy).

========  =======  ===========  ==================  ==========================  ==========
mode      unit     noise by     local training      sampling the accountant     aggregation
                                                    assumes
========  =======  ===========  ==================  ==========================  ==========
none      --       nobody       plain               --                          fedavg
dpsgd     example  each client  per-example clip    Poisson batches, q = B / n  mean
paper     example  each client  batch clip A and B  Poisson batches, q = B / n  mean
client    client   server       plain, clip update  Poisson cohorts, q = K / N  dp_fedavg
local     client   each client  plain, clip+noise   every participation (q = 1) mean
========  =======  ===========  ==================  ==========================  ==========

The privacy plan (the accounting front over clients, the noise calibration and the
planned epsilon) is :func:`dplora_ray.privacy.plan.plan_privacy`.

Invariants:
    * A mechanism is stateless; :data:`MECHANISMS` holds one instance per mode.
    * Clipping happens in float32 or wider in every mode (per-example gradients are cast
      before their norms are taken; updates are float32).
    * A mechanism's noise comes only from the :class:`~dplora_ray.privacy.streams.NoiseKey`
      handed to it, never from the public seed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from dplora_ray.errors import ConfigError, PrivacyError
from dplora_ray.privacy.entries import LedgerEntry
from dplora_ray.privacy.streams import NoiseKey, NoiseStream

if TYPE_CHECKING:  # config imports this module; no cycle at run time
    import torch

    from dplora_ray.config import ExperimentConfig

__all__ = [
    "ALL_CLIENTS",
    "DP_MODES",
    "MECHANISMS",
    "Mechanism",
    "client_unit",
    "effective_noise_scale",
    "get_mechanism",
]

#: The ledger unit of client-level DP-FedAvg: one mechanism covers every client.
ALL_CLIENTS = "all-clients"

# a LoRA embedding factor is a bare parameter: its PEFT file key ends in lora_embedding_A
_LORA_A = re.compile(r"\.lora_(?:embedding_)?A(?:\.|$)")
_LORA_B = re.compile(r"\.lora_(?:embedding_)?B(?:\.|$)")


def client_unit(client_id: int) -> str:
    """The ledger unit of one client's examples (example-level modes) or data (local)."""
    return f"client-{int(client_id)}"


class Mechanism:
    """A privacy mode. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    #: whether the mode releases anything under a DP guarantee
    private: ClassVar[bool] = True
    #: what one epsilon protects: "example", "client" or "none"
    unit: ClassVar[str]
    #: who adds the noise: "client", "server" or "nobody"
    noise_by: ClassVar[str]
    #: the client's local trainer: "plain", "dpsgd" or "paper"
    local_training: ClassVar[str] = "plain"
    #: the server's aggregation: "fedavg", "mean" or "dp_fedavg"
    aggregation: ClassVar[str] = "mean"
    #: the noise stream the mechanism draws from (None: no noise)
    noise_stream: ClassVar[NoiseStream | None] = None
    #: cohort sampling under ``federation.cohort_sampling: auto``
    cohort_sampling: ClassVar[str] = "fixed"
    #: the sampling the accountant assumes, in words
    sampling: ClassVar[str]
    #: what the epsilon protects, in words (the ledger's and the summary's sentence)
    protects: ClassVar[str]
    #: the preflight's words for what every trainable tensor went through
    preflight_words: ClassVar[str] = "got gradients"

    # ------------------------------------------------------------------ accounting
    def effective_scale(self, train_a: bool) -> float:
        """Noise multiplier -> the one the accountant uses (std / L2 sensitivity)."""
        return 1.0

    def check_config(self, cfg: ExperimentConfig) -> None:
        """Refuse settings the accounting does not cover (ConfigError)."""

    def check_delta(self, delta: float, parts: Sequence[np.ndarray], num_clients: int) -> None:
        if self.unit == "example":
            n_max = max(len(p) for p in parts)
            if delta >= 1.0 / n_max:
                raise ConfigError("privacy.delta", delta,
                                  f"must be below 1/n = {1.0 / n_max:.3g} (n = {n_max} "
                                  "examples in the largest client)")
        elif delta >= 1.0 / num_clients:
            raise ConfigError("privacy.delta", delta, "must be below 1/federation."
                              f"num_clients = {1.0 / num_clients:.3g}")

    def accounting_plans(self, cfg: ExperimentConfig, parts: Sequence[np.ndarray],
                         cohorts: Sequence[np.ndarray]) -> list[tuple[float, int]]:
        """The planned (sampling rate, steps) of each accounting unit."""
        return []

    def ledger_entries(self, server_round: int, cohort: Sequence[int] | np.ndarray, z: float,
                       cfg: ExperimentConfig, parts: Sequence[np.ndarray]
                       ) -> list[LedgerEntry]:
        """What one round charges (every sampled client, whether or not it completes);
        ``z`` is the effective noise multiplier."""
        return []

    def per_client_epsilon(self) -> bool:
        """Whether a client's row in ``clients.parquet`` shows its own unit's epsilon
        (False: the run's epsilon, one unit for all)."""
        return self.unit == "example"

    def audit_epsilon(self, epsilons: Mapping[str, float], audited_clients: Sequence[int],
                      delta: float) -> tuple[float | None, float, str]:
        """The (epsilon, delta) an example-level attack on the audited clients can be
        compared with, and one sentence saying why (see docs/audit.md)."""
        eps = max((float(epsilons.get(client_unit(c), 0.0)) for c in audited_clients),
                  default=0.0)
        return eps, delta, (f"{self.name} protects one example's presence (adding or "
                            "removing one example); compared with the largest ledger "
                            "epsilon among the audited clients")

    def noise_key_for(self, run_key: NoiseKey | None, party: str, *position: int
                      ) -> NoiseKey | None:
        """The derived key of this mechanism's noise stream at ``position`` for ``party``
        (``"client"`` or ``"server"``); None when that party adds no noise (or the run
        has no key)."""
        if run_key is None or self.noise_stream is None or self.noise_by != party:
            return None
        return run_key.derive(self.noise_stream, *position)

    # ------------------------------------------------------------------ transforms
    def client_transform(self, update: Mapping[str, torch.Tensor], clipping_norm: float,
                         noise_multiplier: float, noise_key: NoiseKey | None
                         ) -> dict[str, torch.Tensor]:
        """What the client does to its finished (float32, finite) update before upload."""
        return dict(update)

    def paper_groups(self, keys: Sequence[str]) -> tuple[list[str], list[str]]:
        raise PrivacyError(f"privacy.mode={self.name!r} has no A/B groups")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} mode={self.name!r}>"


class NoPrivacy(Mechanism):
    name = "none"
    private = False
    unit = "none"
    noise_by = "nobody"
    aggregation = "fedavg"
    sampling = "none"
    protects = "nothing: privacy.mode is 'none'"

    def check_delta(self, delta: float, parts: Sequence[np.ndarray], num_clients: int) -> None:
        return None

    def per_client_epsilon(self) -> bool:
        return False

    def audit_epsilon(self, epsilons: Mapping[str, float], audited_clients: Sequence[int],
                      delta: float) -> tuple[float | None, float, str]:
        return None, delta, "privacy.mode is 'none': there is no claim to check"


class _ExampleLevel(Mechanism):
    unit = "example"
    noise_by = "client"
    sampling = "Poisson batches of examples, q = batch_size / n per client and step"

    def accounting_plans(self, cfg: ExperimentConfig, parts: Sequence[np.ndarray],
                         cohorts: Sequence[np.ndarray]) -> list[tuple[float, int]]:
        fed = cfg.federation
        counts = _participations(fed.num_clients, cohorts)
        return [(min(1.0, fed.batch_size / len(parts[int(c)])),
                 int(counts[c]) * fed.local_steps) for c in np.flatnonzero(counts)]

    def ledger_entries(self, server_round: int, cohort: Sequence[int] | np.ndarray, z: float,
                       cfg: ExperimentConfig, parts: Sequence[np.ndarray]
                       ) -> list[LedgerEntry]:
        fed = cfg.federation
        return [LedgerEntry(client_unit(int(c)), server_round, z,
                            min(1.0, fed.batch_size / len(parts[int(c)])), fed.local_steps)
                for c in cohort]


class DpSgd(_ExampleLevel):
    """DP-SGD on the LoRA parameters (Abadi et al. 2016): per-example clipping to C in
    float32, N(0, sigma^2 C^2) on the sum, Poisson batches."""

    name = "dpsgd"
    local_training = "dpsgd"
    noise_stream = NoiseStream.DPSGD
    protects = ("any one training example of a client, against anyone who sees the LoRA "
                "updates the client uploads (per-example clipping and Gaussian noise, "
                "DP-SGD)")
    preflight_words = "got per-sample gradients and changed after a private step"


class Paper(_ExampleLevel):
    """DP-LoRA Alg. 1 (Liu et al. 2023): the batch-mean gradients of the A factors and of
    the B factors are each clipped to C and get N(0, sigma^2 C^2)."""

    name = "paper"
    local_training = "paper"
    noise_stream = NoiseStream.PAPER
    protects = ("any one training example of a client, against anyone who sees the LoRA "
                "updates the client uploads (batch-level clipping and Gaussian noise on A "
                "and B as in DP-LoRA; effective noise multiplier sigma / (2 sqrt 2), "
                "or sigma / 2 with FFA-LoRA)")
    preflight_words = "got gradients and changed after a private step"

    def effective_scale(self, train_a: bool) -> float:
        # one record moves each clipped batch mean by up to 2C; A and B together by
        # 2 sqrt(2) C (only B with FFA-LoRA: 2C); the noise on (A, B) has std sigma C
        return 1.0 / (2.0 * math.sqrt(2.0)) if train_a else 0.5

    def paper_groups(self, keys: Sequence[str]) -> tuple[list[str], list[str]]:
        """Split the trainable tensors into the A group and the B group; every trainable
        tensor must be in exactly one (else it would train without clipping or noise)."""
        a = [k for k in keys if _LORA_A.search(k)]
        b = [k for k in keys if _LORA_B.search(k)]
        stray = [k for k in keys if (k in a) == (k in b)]
        if stray:
            raise PrivacyError(
                f"privacy.mode='paper' clips and noises the LoRA A and B factors only; "
                f"trainable tensor {stray[0]!r} is in neither group (or in both), so it "
                f"would train without clipping or noise ({len(stray)} such tensor(s)); "
                "use privacy.mode='dpsgd'")
        return a, b


class ClientLevel(Mechanism):
    """DP-FedAvg (McMahan et al. 2018): clients clip their updates, the server adds
    N(0, sigma^2 C^2) to the sum over a Poisson cohort and divides by q N."""

    name = "client"
    unit = "client"
    noise_by = "server"
    aggregation = "dp_fedavg"
    noise_stream = NoiseStream.SERVER
    cohort_sampling = "poisson"
    sampling = "Poisson cohorts of clients, q = clients_per_round / num_clients"
    protects = ("the participation and entire data of any one client, against anyone who "
                "sees the global adapter (DP-FedAvg; the server is trusted to add the "
                "noise)")

    def check_config(self, cfg: ExperimentConfig) -> None:
        if cfg.federation.cohort_sampling == "fixed":
            raise ConfigError("federation.cohort_sampling", "fixed",
                              "privacy.mode='client' is accounted as Poisson client "
                              "sampling; use 'poisson' or 'auto'")

    def accounting_plans(self, cfg: ExperimentConfig, parts: Sequence[np.ndarray],
                         cohorts: Sequence[np.ndarray]) -> list[tuple[float, int]]:
        fed = cfg.federation
        return [(fed.clients_per_round / fed.num_clients, fed.rounds)]

    def ledger_entries(self, server_round: int, cohort: Sequence[int] | np.ndarray, z: float,
                       cfg: ExperimentConfig, parts: Sequence[np.ndarray]
                       ) -> list[LedgerEntry]:
        fed = cfg.federation
        return [LedgerEntry(ALL_CLIENTS, server_round, z,
                            fed.clients_per_round / fed.num_clients, 1)]

    def client_transform(self, update: Mapping[str, torch.Tensor], clipping_norm: float,
                         noise_multiplier: float, noise_key: NoiseKey | None
                         ) -> dict[str, torch.Tensor]:
        from dplora_ray.privacy.noise import clip_by_global_norm

        return clip_by_global_norm(_float32(update), clipping_norm)[0]

    def audit_epsilon(self, epsilons: Mapping[str, float], audited_clients: Sequence[int],
                      delta: float) -> tuple[float | None, float, str]:
        eps1 = float(epsilons.get(ALL_CLIENTS, max(epsilons.values(), default=0.0)))
        return 2.0 * eps1, (1.0 + math.exp(eps1)) * delta, (
            "client mode protects one whole client (add/remove); one example in or out of "
            "a client is two such steps, so the attack is compared with (2 epsilon, "
            "(1 + e^epsilon) delta) by group privacy")


class LocalLevel(Mechanism):
    """Local DP: each client clips its update to C and adds N(0, sigma^2 C^2) before
    upload; accounted per client for replacement of its data (sensitivity 2C)."""

    name = "local"
    unit = "client"
    noise_by = "client"
    noise_stream = NoiseStream.LOCAL
    sampling = "none: every participation is one Gaussian release (q = 1)"
    protects = ("the entire data of any one client, against everyone including the server "
                "(each client noises its clipped update before upload)")

    def effective_scale(self, train_a: bool) -> float:
        return 0.5  # two clipped updates of one client differ by up to 2C

    def accounting_plans(self, cfg: ExperimentConfig, parts: Sequence[np.ndarray],
                         cohorts: Sequence[np.ndarray]) -> list[tuple[float, int]]:
        counts = _participations(cfg.federation.num_clients, cohorts)
        return [(1.0, int(counts[c])) for c in np.flatnonzero(counts)]

    def ledger_entries(self, server_round: int, cohort: Sequence[int] | np.ndarray, z: float,
                       cfg: ExperimentConfig, parts: Sequence[np.ndarray]
                       ) -> list[LedgerEntry]:
        return [LedgerEntry(client_unit(int(c)), server_round, z, 1.0, 1) for c in cohort]

    def per_client_epsilon(self) -> bool:
        return True

    def client_transform(self, update: Mapping[str, torch.Tensor], clipping_norm: float,
                         noise_multiplier: float, noise_key: NoiseKey | None
                         ) -> dict[str, torch.Tensor]:
        from dplora_ray.privacy.noise import add_gaussian_noise, clip_by_global_norm

        if noise_key is None:
            raise PrivacyError("privacy.mode='local' needs the client's noise key")
        clipped, _ = clip_by_global_norm(_float32(update), clipping_norm)
        return add_gaussian_noise(clipped, noise_multiplier * clipping_norm,
                                  noise_key.generator(0))

    def audit_epsilon(self, epsilons: Mapping[str, float], audited_clients: Sequence[int],
                      delta: float) -> tuple[float | None, float, str]:
        eps = max((float(epsilons.get(client_unit(c), 0.0)) for c in audited_clients),
                  default=0.0)
        return eps, delta, ("local protects one example's presence (replacing one "
                            "client's data, which covers one example in or out); compared "
                            "with the largest ledger epsilon among the audited clients")


def _float32(update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in update.items()}


def _participations(num_clients: int, cohorts: Sequence[np.ndarray]) -> np.ndarray:
    counts = np.zeros(num_clients, dtype=np.int64)
    for c in cohorts:
        counts[np.asarray(c, dtype=np.int64)] += 1
    return counts


#: one instance per ``privacy.mode``
MECHANISMS: dict[str, Mechanism] = {m.name: m for m in (
    NoPrivacy(), DpSgd(), Paper(), ClientLevel(), LocalLevel())}

#: The privacy modes that add noise (``privacy.mode`` minus ``none``).
DP_MODES: tuple[str, ...] = tuple(name for name, m in MECHANISMS.items() if m.private)


def get_mechanism(mode: str) -> Mechanism:
    """The mechanism of ``privacy.mode`` (PrivacyError for an unknown mode)."""
    try:
        return MECHANISMS[mode]
    except (KeyError, TypeError):
        raise PrivacyError(f"mode must be one of "
                           f"{', '.join(repr(m) for m in MECHANISMS)}. Found {mode!r}.") from None


def effective_noise_scale(mode: str, train_a: bool) -> float:
    """Factor turning a mode's noise multiplier into the one the accountant must use
    (noise std / L2 sensitivity of what is released when one protected unit changes).

    * ``dpsgd`` (per-example clipping to C, noise N(0, sigma^2 C^2) on the sum; Abadi et
      al. 2016, Alg. 1) and ``client`` (DP-FedAvg, McMahan et al. 2018, Alg. 1), accounted
      for adding/removing one unit: the sensitivity is C, so the scale is 1.
    * ``local``: the server sees each client's upload under its identity, so local DP
      compares any two datasets of the same client (replacement): two clipped updates
      differ by up to 2C, scale 1/2.
    * ``paper`` (DP-LoRA, Liu et al. 2023, Alg. 1): changing one record can move a clipped
      batch mean anywhere in the ball of radius C, i.e. by up to 2C; A and B together by
      2 sqrt(2) C under isotropic noise of std sigma C: scale 1 / (2 sqrt 2); with
      FFA-LoRA (only B trained and released) 1/2. Conditioning on the rest of the Poisson
      batch, the sampled-Gaussian bound of Mironov et al. 2019 applies with the effective
      multiplier.

    Raises:
        PrivacyError: unknown mode, or ``none``.
    """
    mech = MECHANISMS.get(mode) if isinstance(mode, str) else None
    if mech is None or not mech.private:
        raise PrivacyError(
            f"mode must be one of {', '.join(repr(m) for m in DP_MODES)}. Found {mode!r}.")
    return mech.effective_scale(train_a)
