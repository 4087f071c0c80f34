"""Client worker: one frozen base model serving many virtual clients.

A :class:`ClientWorker` loads the base model once and wraps it with one LoRA adapter.
A virtual client is only its partition, its public RNG stream (batches, dropout), in
private modes the secret noise key of its (stream, round) (:mod:`~dplora_ray.privacy.
streams`) and its accounting; the worker swaps the global state in, trains, and returns
the update. It runs inline or as a Ray actor; it imports no Ray.

Local training (``privacy.mode``; the worker asks the mode's mechanism,
:mod:`dplora_ray.privacy.mechanisms`, which trainer and which update transform to use):

* ``none`` / ``client`` / ``local``: plain local training on fixed-size batches drawn
  without replacement; ``client`` then clips the update to C (the server adds the noise,
  McMahan et al. 2018, Alg. 1); ``local`` clips it and adds N(0, sigma^2 C^2) before
  upload.
* ``dpsgd``: DP-SGD (Abadi et al. 2016) through Opacus' ``GradSampleModule`` (per-sample
  gradients, wrapped once per worker) and ``DPOptimizer`` with exact float32 per-sample
  clipping to C (:class:`~dplora_ray.privacy.dpsgd.Float32ClipDPOptimizer`, whatever the
  autocast), N(0, sigma^2 C^2) on the sum, division by the expected batch size, Poisson
  batches with q = batch_size / n_client; an empty batch takes a noise-only step.
* ``paper``: DP-LoRA Algorithm 1 (Liu et al. 2023) as written: the batch-averaged
  gradient of all A factors and that of all B factors are each clipped to C, each gets
  N(0, sigma^2 C^2), then the optimizer steps; Poisson batches as above.

Task types (``data.task``, :mod:`dplora_ray.data.tasks`): classification reads the
label-word logits at the last prompt token; multiple choice and generation score target
tokens with the causal-LM log-likelihood (:meth:`ClientWorker._target_logprobs`). A
multiple-choice example is several rows (one per choice); under DP-SGD the rows' per-sample
gradients are summed into one per-example gradient before Opacus clips them.
``federation.strategy=full`` (Vanilla FL) trains and sends every weight instead of LoRA.

Invariants: what leaves a worker is LoRA tensors (in the transfer dtype, already noised in
``dpsgd``/``paper``/``local``) and scalar metrics; never text, token ids or labels.
Randomness: batch sampling and dropout come from the job's public ``seed``; noise only
from the job's ``noise_key`` (one generator per local step), never from the seed.
Wire format: :mod:`.wire`; preflight: :mod:`.preflight`; evaluation: :mod:`.client_eval`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dplora_ray.config import ExperimentConfig, config_from_dict
from dplora_ray.errors import PrivacyError
from dplora_ray.federated.compression import cmfl_should_upload, ternary_encode
from dplora_ray.federated.encoding import EncodedData
from dplora_ray.federated.local_training import LocalTraining
from dplora_ray.federated.wire import TRANSFER_DTYPES, PackedUpdate, tensor_bytes
from dplora_ray.hardware import (
    check_lora_float32,
    enable_gradient_checkpointing,
    grad_sample_module,
)
from dplora_ray.models import (
    build_lora_model,
    load_base_model,
    load_state_inplace,
    lora_param_items,
)
from dplora_ray.privacy.mechanisms import get_mechanism
from dplora_ray.privacy.noise import (
    global_l2_norm,
)
from dplora_ray.privacy.streams import NoiseKey
from dplora_ray.results import STATUS_NONFINITE, STATUS_OK, STATUS_SKIPPED_IRRELEVANT

__all__ = ["ClientJob", "ClientResult", "ClientWorker", "PackedUpdate", "tensor_bytes"]



@dataclass(frozen=True)
class ClientJob:
    """One client's work in one round.

    ``seed`` is public (batches, dropout); ``noise_key`` is the secret key of this
    client's noise stream in this round (``run_key.derive(stream, round, client)``), None
    when the mechanism adds no noise on the client.
    """

    client_id: int
    indices: np.ndarray
    seed: int
    noise_multiplier: float = 0.0
    noise_key: NoiseKey | None = field(default=None, repr=False)


@dataclass
class ClientResult:
    client_id: int
    worker: int
    status: str
    num_examples: int
    train_loss: float
    update: dict[str, torch.Tensor] | None
    update_norm: float
    bytes_up: int
    seconds: float
    steps: int
    sampling_rate: float
    extras: dict[str, Any] = field(default_factory=dict)


class ClientWorker(LocalTraining):
    """Holds the frozen base model once and trains virtual clients on it.

    Args:
        cfg: the experiment config as plain data (``config_to_dict``).
        data: the tokenised train/test splits shared by all workers.
        worker_index: position of this worker (recorded in ``clients.parquet``).
    """

    def __init__(self, cfg: Mapping[str, Any] | ExperimentConfig, data: EncodedData,
                 worker_index: int = 0) -> None:
        import warnings

        import transformers

        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.cfg = cfg if isinstance(cfg, ExperimentConfig) else config_from_dict(cfg)
        self.worker_index = worker_index
        self.data = data
        rt = self.cfg.runtime
        torch.set_num_threads(rt.threads)
        use_cuda = rt.gpus_per_worker > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        if self.device.type == "cuda":  # refuse a GPU share that cannot hold the worker
            from dplora_ray.resources import check_worker_fits

            check_worker_fits(self.cfg, self.device)
        base, _ = load_base_model(self.cfg.model, self.device)
        quantized = self.cfg.model.quantization != "none"  # placed at load, cannot move
        # federation.strategy=full (Vanilla FL): no adapter, every weight trains and travels
        self.full = self.cfg.federation.strategy == "full"
        if self.full:
            base.requires_grad_(True)
            self.model = base if quantized else base.to(self.device)
        else:
            model = build_lora_model(base, self.cfg.lora, seed=self.cfg.seed)
            self.model = model if quantized else model.to(self.device)
            check_lora_float32(self.model)  # whatever model.dtype: exact clipping, noise
        if self.cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(self._base())
        self._live = dict(self._named_lora())  # every travelling tensor, keyed once
        self._init_state = {k: p.detach().to("cpu", torch.float32).clone()
                            for k, p in self._live.items()}
        self._params = {k: p for k, p in self._live.items() if p.requires_grad}
        self.mech = get_mechanism(self.cfg.privacy.mode)
        self._paper_groups: tuple[list[str], list[str]] | None = None
        self.label_ids = torch.tensor(data.label_token_ids, device=self.device)
        self.task_type = data.task_type
        self.choices = data.train.choices
        self.autocast = rt.bf16_autocast
        self.gsm = None
        if self.mech.local_training == "dpsgd":  # its hooks survive the checkpointing
            self.gsm = grad_sample_module(self.model)

    # ----------------------------------------------------------------- helpers
    def _named_lora(self):
        """The tensors that travel, keyed like the files they are saved in: LoRA
        parameters (PEFT adapter keys), or every parameter with ``strategy=full``."""
        if self.full:
            return sorted(self.model.named_parameters())
        return sorted(lora_param_items(self.model))

    def _base(self):
        return self.model if self.full else self.model.get_base_model()

    def initial_state(self) -> dict[str, torch.Tensor]:
        """All LoRA tensors at their seeded init (A and B), float32 on CPU (also after
        training: the model's tensors then hold the last client's values)."""
        return {k: v.clone() for k, v in self._init_state.items()}

    def trainable_keys(self) -> list[str]:
        return list(self._params)

    def _autocast(self, enabled: bool):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _logits(self, batch: Mapping[str, torch.Tensor], train: bool = True) -> torch.Tensor:
        """Label-word logits at the last prompt token, shape [batch, num_labels]."""
        base = self._base()
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        # bf16 autocast speeds up training on CPUs with bf16 support; evaluation stays
        # float32 (measured slower under autocast on this CPU)
        with self._autocast(self.autocast and train):
            hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            last = hidden[torch.arange(ids.shape[0], device=self.device),
                          batch["last_index"].to(self.device)]
            head = base.get_output_embeddings()
            weight = head.weight[self.label_ids]
            logits = last.float() @ weight.float().T
            if getattr(head, "bias", None) is not None:
                logits = logits + head.bias[self.label_ids].float()
        return logits

    def _target_logprobs(self, batch: Mapping[str, torch.Tensor], train: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the summed log-probability of its target tokens (given everything
        before them) and the number of target tokens. Only the target positions go
        through the (frozen) LM head, so a row's score depends on its own tokens only."""
        base = self._base()
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        target = batch["target_mask"].to(self.device)[:, 1:].bool()
        with self._autocast(self.autocast and train):
            hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            rows, cols = target.nonzero(as_tuple=True)  # position cols predicts cols + 1
            h = hidden[rows, cols]
            head = base.get_output_embeddings()
            logits = h.float() @ head.weight.float().T
            if getattr(head, "bias", None) is not None:
                logits = logits + head.bias.float()
        lp = torch.log_softmax(logits, dim=-1).gather(
            1, ids[rows, cols + 1].unsqueeze(1)).squeeze(1)
        n_rows = ids.shape[0]
        total = torch.zeros(n_rows, device=self.device, dtype=lp.dtype).index_add(0, rows, lp)
        count = torch.zeros(n_rows, device=self.device, dtype=lp.dtype).index_add(
            0, rows, torch.ones_like(lp))
        return total, count

    def _batch_loss(self, batch: Mapping[str, torch.Tensor], train: bool = True
                    ) -> torch.Tensor:
        """Per-example losses ``[examples]`` of the task type (see
        :mod:`dplora_ray.data.tasks`)."""
        labels = batch["labels"].to(self.device)
        if self.task_type == "classification":
            # one label token per sequence: the loss is per sequence by construction, so
            # padding cannot mix examples (unlike HF's token-averaged `labels=` loss)
            return F.cross_entropy(self._logits(batch, train), labels, reduction="none")
        total, count = self._target_logprobs(batch, train)
        if self.task_type == "multiple_choice":
            scores = total.view(-1, self.choices)
            return F.cross_entropy(scores, labels, reduction="none")
        return -total / count.clamp_min(1.0)  # generation: mean NLL of the answer tokens

    def _fold_grad_samples(self) -> None:
        """Per-sample gradients as clipping needs them: float32 whatever the autocast (bf16
        per-sample gradients gave bf16 norms and clip factors, and clipped norms above C);
        for multiple choice, an example is ``choices`` consecutive rows: their per-row
        gradients are summed into one per-example gradient before clipping."""
        for p in self._params.values():
            gs = p.grad_sample
            if gs is None:
                continue
            gs = gs.to(torch.float32)
            if self.choices > 1 and gs.shape[0] > 0:
                gs = gs.view(-1, self.choices, *gs.shape[1:]).sum(dim=1)
            p.grad_sample = gs

    def paper_groups(self) -> tuple[list[str], list[str]]:
        """``paper`` mode: the trainable tensors of the A group and of the B group (every
        trainable tensor is in exactly one, else PrivacyError)."""
        if self._paper_groups is None:
            self._paper_groups = get_mechanism("paper").paper_groups(list(self._params))
        return self._paper_groups

    def _noise_key(self, job: ClientJob) -> NoiseKey:
        if job.noise_key is None:
            raise PrivacyError(f"privacy.mode={self.mech.name!r} draws noise on the client "
                               "but the job carries no noise key")
        return job.noise_key

    def _load_global(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy the global state into the model. Once per client job and per evaluation
        chunk, so it copies into the live parameters keyed once (``_named_lora``: peft's
        file keys from ``get_peft_model_state_dict``) with the same exact key and shape
        check: ``peft.set_peft_model_state_dict`` (:func:`~dplora_ray.models.
        load_lora_state_inplace`) walks the whole model on every call, 10-20x slower
        (70-180 ms against 8 ms on SmolLM2's 30 layers)."""
        state = {k: v.float() for k, v in state.items()}
        load_state_inplace(self._live, state, what="model" if self.full else "LoRA")

    def _optimizer(self, params: list[torch.nn.Parameter],
                   noise_std: float = 0.0) -> torch.optim.Optimizer:
        """The local optimizer; ``noise_std`` is the per-coordinate standard deviation
        of the DP noise in the gradient it will see (``dpadambc`` subtracts its square)."""
        fed = self.cfg.federation
        lr = fed.learning_rate
        if fed.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr)
        if fed.optimizer == "sgdm":
            return torch.optim.SGD(params, lr=lr, momentum=fed.client_momentum)
        if fed.optimizer == "dpadambc":
            from dplora_ray.privacy.adambc import DPAdamBC

            return DPAdamBC(params, lr=lr, noise_variance=noise_std ** 2,
                            gamma=fed.adambc_gamma)
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    # ----------------------------------------------------------------- training
    def train_clients(self, global_state: Mapping[str, torch.Tensor],
                      jobs: list[ClientJob],
                      last_update: Mapping[str, torch.Tensor] | None = None
                      ) -> list[ClientResult]:
        """Train each job's client from ``global_state``; results in job order."""
        return [self.train_client(global_state, job, last_update) for job in jobs]

    def train_client(self, global_state: Mapping[str, torch.Tensor], job: ClientJob,
                     last_update: Mapping[str, torch.Tensor] | None = None) -> ClientResult:
        """Train one client. ``last_update`` is the last applied global update (used by
        ``federation.compression=cmfl`` only; None in the first round: upload)."""
        start = time.perf_counter()
        trainer = {"plain": self._train_plain, "dpsgd": self._train_dpsgd,
                   "paper": self._train_paper}[self.mech.local_training]
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(job.seed)  # dropout only; scoped, restored on exit
            self._load_global(global_state)
            losses, steps, rate = trainer(job)
        delta = {k: (p.detach().float().cpu() - global_state[k].float())
                 for k, p in self._params.items()}
        norm = global_l2_norm(delta)
        status = STATUS_OK
        C = self.cfg.privacy.clipping_norm
        update: dict[str, torch.Tensor] | None = None
        if not math.isfinite(norm) or not all(torch.isfinite(t).all() for t in delta.values()):
            status = STATUS_NONFINITE
        else:  # the mechanism's client-side transform (client: clip; local: clip + noise)
            update = self.mech.client_transform(delta, C, job.noise_multiplier,
                                                job.noise_key)
        extras: dict[str, Any] = {}
        compression = self.cfg.federation.compression
        if update is not None and compression == "cmfl":
            upload, rel = cmfl_should_upload(update, last_update,
                                             self.cfg.federation.cmfl_threshold)
            extras["cmfl_relevance"] = rel
            if not upload:
                status, update = STATUS_SKIPPED_IRRELEVANT, None
        payload = None
        if update is not None and compression == "ternary":
            # mixed dtypes (uint8 codes, float32 scales): pickles as a plain dict
            payload = PackedUpdate(ternary_encode(update))
        elif update is not None:
            dtype = TRANSFER_DTYPES[self.cfg.federation.transfer_dtype]
            payload = PackedUpdate({k: v.to(dtype).contiguous()
                                    for k, v in sorted(update.items())})
        finite_losses = [x for x in losses if math.isfinite(x)]
        return ClientResult(
            client_id=job.client_id, worker=self.worker_index, status=status,
            num_examples=len(job.indices),
            train_loss=float(np.mean(finite_losses)) if finite_losses else math.nan,
            update=payload, update_norm=norm,
            bytes_up=tensor_bytes(payload) if payload is not None else 0,
            seconds=time.perf_counter() - start, steps=steps, sampling_rate=rate,
            extras=extras)

    def _loss(self, idx: np.ndarray) -> torch.Tensor:
        return self._batch_loss(self.data.train.batch(idx, self.data.pad_id)).mean()

    # ----------------------------------------------------------------- preflight
    def preflight(self) -> dict[str, Any]:
        """One private step on a synthetic batch (:func:`~dplora_ray.federated.preflight.
        run_preflight`); parameters are restored afterwards."""
        from dplora_ray.federated.preflight import run_preflight

        return run_preflight(self)

    # ----------------------------------------------------------------- evaluation
    @torch.inference_mode()
    def evaluate(self, state: Mapping[str, torch.Tensor], index: np.ndarray,
                 batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Per-example loss and prediction on test examples (classification: label-word
        cross-entropy and label; multiple choice: cross-entropy over the choice scores
        and the likeliest choice; generation: mean answer-token NLL and 0)."""
        out = self.evaluate_detail(state, index, batch_size, generate=False)
        return out["loss"], out["pred"]

    def evaluate_detail(self, state: Mapping[str, torch.Tensor], index: np.ndarray,
                        batch_size: int = 32, generate: bool = True) -> dict[str, Any]:
        """Per-example results on test examples
        (:func:`~dplora_ray.federated.client_eval.evaluate_detail`)."""
        from dplora_ray.federated.client_eval import evaluate_detail

        return evaluate_detail(self, state, index, batch_size, generate)

    # ----------------------------------------------------------------- public pieces
    # what tools outside the training loop (the audit's scoring, the benchmarks) use:
    # the trainable tensors (keyed like the adapter file), loading a global state, the
    # label-word logits, the mean loss of training examples, the local optimizer
    @property
    def trainable_params(self) -> dict[str, torch.nn.Parameter]:
        return self._params

    def load_global(self, state: Mapping[str, torch.Tensor]) -> None:
        self._load_global(state)

    def label_logits(self, batch: Mapping[str, torch.Tensor], train: bool = True
                     ) -> torch.Tensor:
        return self._logits(batch, train)

    def loss(self, idx: np.ndarray) -> torch.Tensor:
        """Mean per-example loss of the training examples ``idx``."""
        return self._loss(idx)

    def make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return self._optimizer(params)

    def ping(self) -> int:
        return self.worker_index
