"""The config sections: one frozen dataclass per concern, validated on construction.

:class:`ModelConfig`, :class:`LoraSection`, :class:`DataConfig`, :class:`FederationConfig`,
:class:`PrivacyConfig`, :class:`RuntimeConfig`, :class:`AuditConfig`,
:class:`TrackingConfig` and the whole
:class:`ExperimentConfig` (cross-field checks included), plus :data:`SECTIONS` (section
name -> dataclass). A bad value raises :class:`~dplora_ray.errors.ConfigError` naming the
dotted key and the value.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Literal

from dplora_ray.config.audit_section import AuditConfig
from dplora_ray.config.checks import (
    MAX_COHORT_DRAWS,
    MAX_EXAMPLES,
    MAX_SEED,
    MAX_WORKERS,
    check,
    count,
    finite_positive,
    positive_int,
)
from dplora_ray.config.model_section import ModelConfig, check_model_placement
from dplora_ray.config.tracking_section import TrackingConfig

__all__ = [
    "SECTIONS",
    "AuditConfig",
    "DataConfig",
    "ExperimentConfig",
    "FederationConfig",
    "LoraSection",
    "ModelConfig",
    "PrivacyConfig",
    "PrivacyMode",
    "RuntimeConfig",
    "TrackingConfig",
]

PrivacyMode = Literal["none", "dpsgd", "paper", "client", "local"]


_check, _positive_int = check, positive_int
#: the smallest nonzero privacy.noise_multiplier: below it the accountants overflow, and
#: such noise protects nothing (the calibration never goes below it either)
MIN_NOISE_MULTIPLIER = 1e-6


@dataclass(frozen=True)
class LoraSection:
    """LoRA adapter (via peft).

    Attributes:
        r: rank.
        alpha: scaling numerator (scale = alpha / r).
        dropout: dropout on the LoRA input.
        target_modules: module names that get adapters (e.g. ``q_proj``, ``v_proj``).
        train_a: False gives FFA-LoRA: A stays at its seeded random init, only B is
            trained and sent.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    train_a: bool = True

    def __post_init__(self) -> None:
        _positive_int("lora.r", self.r)
        finite_positive("lora.alpha", self.alpha, "must be a finite number > 0")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "must be in [0, 1)")
        _check(len(self.target_modules) > 0, "lora.target_modules", list(self.target_modules),
               "must name at least one module")


@dataclass(frozen=True)
class DataConfig:
    """Data set, task and evaluation split.

    Attributes:
        recipe: ``vader`` (the demo: VADER's human-rated sentiment corpora),
            ``synthetic`` (generated sentiment-like data for tests), ``custom``
            (``path`` + column mapping), or one of the DP-LoRA paper's data sets
            (``fpb``, ``tfns``, ``pubmedqa``: classification; ``medquad``: generation;
            ``piqa``: multiple choice); see :mod:`dplora_ray.data.recipes`.
        path: local CSV/JSON/JSONL/Parquet file or folder, or a hub id (``custom``);
            for the paper recipes a local copy (file, its folder, or a data root laid out
            like ``$DPLORA_DATA_DIR``) or a hub id replacing the recipe's default.
        task: ``sentiment3`` (negative/neutral/positive), ``fin_sentiment`` (the same
            labels, financial-news prompt), ``yesno``, ``yesnomaybe`` (classification);
            ``qa_generation`` (``medquad``: answer in free text, trained on the answer
            tokens, scored by perplexity and ROUGE-L); ``multiple_choice`` (``piqa``: the
            likeliest solution); see :mod:`dplora_ray.data.tasks`.
        subset: a recipe's variant (``fpb``: the annotator agreement level ``50agree``
            (default), ``66agree``, ``75agree`` or ``allagree``); None: the default.
        text_column / label_column / group_column: column mapping for ``custom`` data
            (``group_column`` feeds the ``natural`` partition).
        label_map: raw label value -> label name of the task (``custom`` only).
        test_size: examples in the global held-out test split (balanced over labels
            when ``balanced_test``).
        max_train_examples: cap on the training pool (None: all).
        cache_dir: where downloads and the ``datasets`` cache go (None: the dplora_ray
            cache folder).
        max_new_tokens: generation tasks: tokens generated greedily per test question
            for ROUGE-L (scored against the reference answer's first ``max_new_tokens``
            tokens).
    """

    recipe: Literal["vader", "synthetic", "custom", "fpb", "tfns", "pubmedqa", "medquad",
                    "piqa"] = "synthetic"
    path: str | None = None
    task: Literal["sentiment3", "fin_sentiment", "yesno", "yesnomaybe", "qa_generation",
                  "multiple_choice"] = "sentiment3"
    subset: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    group_column: str | None = None
    label_map: dict[str, str] | None = None
    test_size: int = 300
    balanced_test: bool = True
    max_train_examples: int | None = None
    cache_dir: str | None = None
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        count("data.test_size", self.test_size)
        count("data.max_new_tokens", self.max_new_tokens)
        if self.max_train_examples is not None:
            count("data.max_train_examples", self.max_train_examples, high=MAX_EXAMPLES)
        if self.recipe == "custom":
            _check(self.path is not None, "data.path", self.path,
                   "is required when data.recipe is 'custom'")


@dataclass(frozen=True)
class FederationConfig:
    """Federated training schedule.

    Attributes:
        num_clients: clients in the population (virtual clients).
        clients_per_round: cohort size (expected size under Poisson sampling).
        rounds: server rounds.
        local_steps: optimizer steps per client per round.
        batch_size: local batch size (expected size under Poisson batch sampling).
        learning_rate: local learning rate.
        optimizer: local optimizer: ``sgd``, ``sgdm`` (SGD with momentum
            ``client_momentum``) or ``adamw`` (state reset every round: clients are
            stateless; with DP-SGD it steps on the noised gradient: post-processing).
            ``dpadambc``: DP-AdamBC (Tang et al. 2024), Adam with the known variance of
            the DP noise in the gradient subtracted from its second moment
            (:mod:`dplora_ray.privacy.adambc`); plain Adam (floored) without noise.
        client_momentum: the momentum of ``sgdm``, in [0, 1).
        adambc_gamma: DP-AdamBC's floor of the corrected second moment (> 0);
            ``sqrt(adambc_gamma)`` is the smallest denominator, so it bounds the step.
            Default 1e-6: sqrt = 1e-3, about the per-coordinate RMS of the clipped mean
            gradient of the demo's LoRA B (norm 0.45 over 184,320 entries).
        partition: ``iid``, ``dirichlet`` (label skew, ``dirichlet_alpha``) or
            ``natural`` (one client per value of ``data.group_column`` groups).
        cohort_sampling: ``fixed`` (``clients_per_round`` uniformly without replacement),
            ``poisson`` (each client independently with q = clients_per_round /
            num_clients), or ``auto`` (``poisson`` in privacy mode ``client``, whose
            accounting assumes it, ``fixed`` otherwise).
        server_learning_rate: server step on the aggregated update.
        server_optimizer: how the server applies the aggregated (already noised) update
            (Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2): ``fedavg``
            (a plain step), ``fedavgm`` (momentum ``server_momentum``), ``fedadam`` /
            ``fedyogi`` (first and second moments with ``server_beta1``,
            ``server_beta2`` and adaptivity ``server_tau``). Post-processing of what
            was released: it costs no privacy. Its state is in the checkpoint.
        server_momentum / server_beta1 / server_beta2 / server_tau: see above.
        eval_every: evaluate the global adapter every this many rounds (the last round
            is always evaluated).
        transfer_dtype: dtype of the LoRA tensors sent (noise is added before the cast).
        compression: communication-efficient baseline (non-private, ``privacy.mode:
            none`` only): ``none``; ``ternary`` (T-FedAvg, Xu et al. 2020: each update
            tensor sent as 2-bit codes in {-a, 0, +a} plus one float32 scale);
            ``cmfl`` (CMFL, Wang et al. 2019: a client whose update agrees in sign with
            the last global update on fewer than ``cmfl_threshold`` of the entries
            does not upload).
        cmfl_threshold: CMFL's relevance threshold, in [0, 1].
        strategy: what is trained and sent: ``lora`` (the adapter; the default) or
            ``full`` (Vanilla FL: FedAvg of the whole model, every weight trained and
            sent every round; non-private, the communication reference; the result is
            a full model folder instead of an adapter).
    """

    num_clients: int = 4
    clients_per_round: int = 2
    rounds: int = 3
    local_steps: int = 2
    batch_size: int = 8
    learning_rate: float = 2e-3
    optimizer: Literal["sgd", "sgdm", "adamw", "dpadambc"] = "adamw"
    client_momentum: float = 0.9
    adambc_gamma: float = 1e-6
    partition: Literal["iid", "dirichlet", "natural"] = "iid"
    dirichlet_alpha: float = 0.5
    cohort_sampling: Literal["auto", "fixed", "poisson"] = "auto"
    server_learning_rate: float = 1.0
    server_optimizer: Literal["fedavg", "fedavgm", "fedadam", "fedyogi"] = "fedavg"
    server_momentum: float = 0.9
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    eval_every: int = 1
    transfer_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compression: Literal["none", "ternary", "cmfl"] = "none"
    cmfl_threshold: float = 0.8
    strategy: Literal["lora", "full"] = "lora"

    def __post_init__(self) -> None:
        for key in ("num_clients", "clients_per_round", "rounds", "local_steps",
                    "batch_size", "eval_every"):
            count(f"federation.{key}", getattr(self, key))
        _check(self.clients_per_round <= self.num_clients, "federation.clients_per_round",
               self.clients_per_round,
               f"cohort larger than the population (federation.num_clients={self.num_clients})")
        draws = self.rounds * self.num_clients
        _check(draws <= MAX_COHORT_DRAWS, "federation.rounds", self.rounds,
               f"times federation.num_clients={self.num_clients:,} is {draws:,} cohort "
               f"draws, all planned up front; at most {MAX_COHORT_DRAWS:,} (a documented "
               "limit): lower either")
        _check(math.isfinite(self.learning_rate) and self.learning_rate > 0,
               "federation.learning_rate", self.learning_rate, "must be > 0")
        finite_positive("federation.dirichlet_alpha", self.dirichlet_alpha)
        finite_positive("federation.server_learning_rate", self.server_learning_rate)
        _check(0.0 <= self.cmfl_threshold <= 1.0, "federation.cmfl_threshold",
               self.cmfl_threshold, "must be in [0, 1]")
        for key in ("client_momentum", "server_momentum", "server_beta1", "server_beta2"):
            value = getattr(self, key)
            _check(math.isfinite(value) and 0.0 <= value < 1.0, f"federation.{key}", value,
                   "must be in [0, 1)")
        _check(math.isfinite(self.server_tau) and self.server_tau > 0,
               "federation.server_tau", self.server_tau, "must be > 0")
        _check(math.isfinite(self.adambc_gamma) and self.adambc_gamma > 0,
               "federation.adambc_gamma", self.adambc_gamma, "must be > 0")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy (see docs/privacy.md for the unit each mode protects).

    Attributes:
        mode: ``none``, ``dpsgd`` / ``paper`` (example-level, per client), ``client``
            (DP-FedAvg, client-level, server adds noise), ``local`` (client-level, each
            client noises its own update).
        target_epsilon: calibrate the noise multiplier so the planned run spends at
            most this (exclusive with ``noise_multiplier``).
        noise_multiplier: fixed noise multiplier (the paper's sigma in ``paper`` mode);
            0, or at least 1e-6 (:data:`MIN_NOISE_MULTIPLIER`).
        delta: the delta of (epsilon, delta)-DP.
        clipping_norm: C.
        accountant: ``rdp`` or ``prv`` (Opacus).
        max_epsilon: budget guard; a step that would push epsilon past it is not taken
            (default: ``target_epsilon``).
        preflight: one private step on one batch before training, checking that every
            trainable LoRA tensor gets a per-sample gradient and changes.
        noise_seed: research and tests only. None (the default): every run draws a
            secret noise key from the operating system, kept only in ``checkpoint.pt``.
            An integer makes the noise a public function of it: reproducible, and NOT
            private against anyone who knows it (docs/privacy.md).

    In mode ``none`` the noise and budget keys are ignored.
    """

    mode: PrivacyMode = "none"
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5
    clipping_norm: float = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"
    max_epsilon: float | None = None
    preflight: bool = True
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        modes = typing.get_args(PrivacyMode)
        _check(self.mode in modes, "privacy.mode", self.mode,
               f"must be one of {', '.join(repr(m) for m in modes)}")
        _check(0.0 < self.delta < 1.0, "privacy.delta", self.delta, "must be in (0, 1)")
        _check(math.isfinite(self.clipping_norm) and self.clipping_norm > 0,
               "privacy.clipping_norm", self.clipping_norm, "must be > 0")
        if self.target_epsilon is not None:
            _check(math.isfinite(self.target_epsilon) and self.target_epsilon > 0,
                   "privacy.target_epsilon", self.target_epsilon,
                   "must be a finite number > 0 (use privacy.mode=none for no privacy)")
        if self.noise_multiplier is not None:
            z = self.noise_multiplier
            _check(math.isfinite(z) and (z == 0 or z >= MIN_NOISE_MULTIPLIER),
                   "privacy.noise_multiplier", z, f"must be 0 or a finite number >= "
                   f"{MIN_NOISE_MULTIPLIER:g} (smaller noise cannot be accounted)")
        if self.max_epsilon is not None:
            _check(self.max_epsilon > 0, "privacy.max_epsilon", self.max_epsilon,
                   "must be > 0")
        if self.noise_seed is not None:
            _check(0 <= self.noise_seed <= MAX_SEED, "privacy.noise_seed", self.noise_seed,
                   "must be an integer in [0, 2**63) (or null for a secret noise key)")
        if not self.enabled:
            return
        _check(not (self.target_epsilon is not None and self.noise_multiplier is not None),
               "privacy.noise_multiplier", self.noise_multiplier,
               "is exclusive with privacy.target_epsilon "
               f"(={self.target_epsilon}); set only one")
        _check(self.target_epsilon is not None or self.noise_multiplier is not None,
               "privacy.target_epsilon", None,
               f"privacy.mode={self.mode!r} needs privacy.target_epsilon or "
               "privacy.noise_multiplier")

    @property
    def enabled(self) -> bool:
        from dplora_ray.privacy.mechanisms import get_mechanism

        return get_mechanism(self.mode).private

    @property
    def budget(self) -> float | None:
        """The epsilon the run may not exceed (None: no guard)."""
        if not self.enabled:
            return None
        return self.max_epsilon if self.max_epsilon is not None else self.target_epsilon


@dataclass(frozen=True)
class RuntimeConfig:
    """Where the clients run.

    Attributes:
        backend: ``actors`` (Ray actors; the default and the only option on a cluster)
            or ``inline`` (one process, no Ray: unit tests, small sweeps).
        num_workers: client worker actors (each holds the base model once).
        cpus_per_worker / gpus_per_worker: Ray resources per worker (fractional allowed).
        address: Ray cluster address (None: an embedded local Ray).
        connect_timeout_s: seconds ``address`` has to answer a TCP connect before the run
            gives up (exit 2); without it, Ray retries an unreachable address for minutes.
        torch_threads: intra-op threads per worker (None: max(1, floor(cpus_per_worker))).
        bf16_autocast: run forward/backward under bfloat16 autocast (faster on CPUs with
            bf16 support; LoRA tensors and updates stay float32).
        on_client_failure: what happens to a client whose worker died during its round
            work: ``retry`` (re-run it with the same RNG stream, so the result is the one
            it would have produced), ``drop`` (aggregate without it) or ``fail`` (end
            the run with an error; the results so far are written). A dropped client is
            still charged in the privacy ledger.
        round_timeout_s: bound on a round's client work in seconds (None: no bound);
            clients whose result is not back in time are dropped (and charged).
        max_worker_restarts: times Ray restarts a dead worker actor; also the number of
            times one client's lost work is re-run in a round under ``retry``.
        max_physical_batch_size: split every sampled (logical) batch into micro-batches
            of at most this many examples, with gradient accumulation (DP-SGD: clipping
            per micro-batch, noise once per logical step): memory is bounded by it, the
            result and the accounting are those of the logical batch
            (``federation.batch_size``). None: one pass per batch.
        kill_worker_at_round: fault injection: worker 0 kills its own process
            (``os._exit(1)``) when it starts its work of this round, on the first
            attempt only (the ``inline`` backend simulates the loss). None: off.
    """

    backend: Literal["actors", "inline"] = "actors"
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    address: str | None = None
    connect_timeout_s: float = 30.0
    torch_threads: int | None = None
    bf16_autocast: bool = False
    on_client_failure: Literal["retry", "drop", "fail"] = "retry"
    round_timeout_s: float | None = None
    max_worker_restarts: int = 3
    kill_worker_at_round: int | None = None
    max_physical_batch_size: int | None = None

    def __post_init__(self) -> None:
        count("runtime.num_workers", self.num_workers, high=MAX_WORKERS)
        if self.round_timeout_s is not None:
            _check(math.isfinite(self.round_timeout_s) and self.round_timeout_s > 0,
                   "runtime.round_timeout_s", self.round_timeout_s,
                   "must be a number of seconds > 0 (or null for no bound)")
        count("runtime.max_worker_restarts", self.max_worker_restarts, low=0, high=MAX_WORKERS)
        if self.kill_worker_at_round is not None:
            _positive_int("runtime.kill_worker_at_round", self.kill_worker_at_round)
        finite_positive("runtime.cpus_per_worker", self.cpus_per_worker,
                        "must be a finite number > 0 (fractional allowed)")
        finite_positive("runtime.gpus_per_worker", self.gpus_per_worker,
                        "must be a finite number >= 0", zero_ok=True)
        finite_positive("runtime.connect_timeout_s", self.connect_timeout_s,
                        "must be a finite number of seconds > 0")
        if self.torch_threads is not None:
            count("runtime.torch_threads", self.torch_threads, high=MAX_WORKERS)
        if self.max_physical_batch_size is not None:
            count("runtime.max_physical_batch_size", self.max_physical_batch_size)

    @property
    def threads(self) -> int:
        if self.torch_threads is not None:
            return self.torch_threads
        return max(1, int(self.cpus_per_worker))


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment. ``seed`` is the one recorded seed all randomness splits from."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        _check(0 <= self.seed <= MAX_SEED, "seed", self.seed, "must be an integer in [0, 2**63)")
        if self.federation.partition == "natural" and self.data.recipe == "custom":
            _check(self.data.group_column is not None, "data.group_column", None,
                   "is required by federation.partition='natural'")
        _check(self.federation.compression == "none" or not self.privacy.enabled,
               "federation.compression", self.federation.compression,
               f"is a non-private baseline: needs privacy.mode=none, "
               f"not {self.privacy.mode!r}")
        _check(self.federation.strategy == "lora" or not self.privacy.enabled,
               "federation.strategy", self.federation.strategy,
               f"is a non-private baseline (Vanilla FL): needs privacy.mode=none, "
               f"not {self.privacy.mode!r}")
        _check(self.federation.strategy == "lora" or not self.audit.enabled,
               "audit.enabled", True, "the privacy audit needs federation.strategy=lora")
        check_model_placement(self.model, self.runtime, self.federation)
        kill = self.runtime.kill_worker_at_round
        if kill is not None:
            _check(kill <= self.federation.rounds, "runtime.kill_worker_at_round", kill,
                   f"must be <= federation.rounds (={self.federation.rounds})")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraSection,
    "data": DataConfig,
    "federation": FederationConfig,
    "privacy": PrivacyConfig,
    "runtime": RuntimeConfig,
    "audit": AuditConfig,
    "tracking": TrackingConfig,
}
