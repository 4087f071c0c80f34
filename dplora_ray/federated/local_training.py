"""Local training inside a client worker: the three trainers and their batches.

* ``plain`` (modes ``none``, ``client``, ``local``): fixed-size batches drawn without
  replacement, the local optimizer on the batch-mean gradient.
* ``dpsgd``: Poisson batches (q = batch_size / n), per-example gradients (Opacus), exact
  float32 clipping, noise once per logical step
  (:class:`~dplora_ray.privacy.dpsgd.Float32ClipDPOptimizer`).
* ``paper``: Poisson batches, the batch-mean gradients of A and of B each clipped to C
  and noised (DP-LoRA Alg. 1).

Logical and physical batches: ``federation.batch_size`` is the logical batch (what the
accountant sees); ``runtime.max_physical_batch_size`` splits each sampled batch into
micro-batches of at most that many examples, run one after the other with gradient
accumulation: per-example clipping per micro-batch and noise once per logical step in
``dpsgd`` (Opacus' skipped steps), the batch-mean gradient summed over micro-batches in
the other trainers. The result equals the one big batch up to float rounding; memory is
bounded by the physical batch.

:class:`LocalTraining` is a mixin of :class:`~dplora_ray.federated.client.ClientWorker`,
which owns the model, the data and the optimizer settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dplora_ray.privacy.noise import (
    NonFiniteUpdateError,
    add_gaussian_noise,
    clip_by_global_norm,
)

if TYPE_CHECKING:
    from dplora_ray.federated.client import ClientJob

__all__ = ["LocalTraining"]


class LocalTraining:
    """The trainers of a client worker (see the module doc)."""

    # set by ClientWorker
    cfg: Any
    model: Any
    choices: int
    _params: dict[str, Any]  # name -> trainable Parameter (with Opacus' grad_sample)

    def _loss(self, idx: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def _optimizer(self, params: list[torch.nn.Parameter],
                   noise_std: float = 0.0) -> torch.optim.Optimizer:
        raise NotImplementedError

    def _noise_key(self, job: ClientJob) -> Any:
        raise NotImplementedError

    def _fold_grad_samples(self) -> None:
        raise NotImplementedError

    def paper_groups(self) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    device: torch.device

    def _micro_batches(self, idx: np.ndarray) -> list[np.ndarray]:
        """``idx`` cut into chunks of at most ``runtime.max_physical_batch_size``."""
        size = self.cfg.runtime.max_physical_batch_size
        if size is None or len(idx) <= size:
            return [idx]
        return [idx[s:s + size] for s in range(0, len(idx), size)]

    def _accumulate_mean_gradient(self, idx: np.ndarray) -> float:
        """Backward of the mean loss over ``idx`` (micro-batch by micro-batch, each
        chunk's mean weighted by its share); returns the mean loss."""
        chunks = self._micro_batches(idx)
        if len(chunks) == 1:
            loss = self._loss(idx)
            loss.backward()
            return float(loss.detach())
        total = 0.0
        for chunk in chunks:
            loss = self._loss(chunk)
            (loss * (len(chunk) / len(idx))).backward()
            total += float(loss.detach()) * len(chunk)
        return total / len(idx)

    def _fixed_batches(self, job: ClientJob, rng: np.random.Generator):
        B = self.cfg.federation.batch_size
        n = len(job.indices)
        for _ in range(self.cfg.federation.local_steps):
            pick = rng.choice(n, size=min(B, n), replace=False)
            yield job.indices[np.sort(pick)]

    def _poisson_batches(self, job: ClientJob, rng: np.random.Generator, rate: float):
        n = len(job.indices)
        for _ in range(self.cfg.federation.local_steps):
            yield job.indices[rng.random(n) < rate]

    def _poisson_rate(self, job: ClientJob) -> float:
        return min(1.0, self.cfg.federation.batch_size / len(job.indices))

    def _train_plain(self, job: ClientJob) -> tuple[list[float], int, float]:
        rng = np.random.default_rng(job.seed)
        params = list(self._params.values())
        opt = self._optimizer(params)
        self.model.train()
        losses = []
        for idx in self._fixed_batches(job, rng):
            opt.zero_grad(set_to_none=True)
            losses.append(self._accumulate_mean_gradient(idx))
            opt.step()
        self.model.eval()
        n = len(job.indices)
        return losses, self.cfg.federation.local_steps, min(1.0, self.cfg.federation.batch_size / n)

    def _train_dpsgd(self, job: ClientJob) -> tuple[list[float], int, float]:
        from dplora_ray.privacy.dpsgd import Float32ClipDPOptimizer

        rng = np.random.default_rng(job.seed)
        key = self._noise_key(job)
        rate = self._poisson_rate(job)
        params = list(self._params.values())
        C, B = self.cfg.privacy.clipping_norm, self.cfg.federation.batch_size
        # Opacus adds N(0, (sigma C)^2) to the sum and divides by the expected batch
        inner = self._optimizer(params, noise_std=job.noise_multiplier * C / B)
        opt = Float32ClipDPOptimizer(
            inner, noise_multiplier=job.noise_multiplier, max_grad_norm=C,
            expected_batch_size=B, loss_reduction="mean")
        self.model.train()
        losses = []
        try:
            for step, idx in enumerate(self._poisson_batches(job, rng, rate)):
                opt.generator = key.generator(step, device=self.device)  # one stream per step
                opt.zero_grad(set_to_none=True)
                if len(idx) == 0:
                    # Empty Poisson batch: a Llama forward on zero rows breaks Opacus'
                    # hooks, so give every parameter an empty per-sample gradient; the
                    # optimizer then takes a noise-only step (still accounted).
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), device=p.device,
                                                    dtype=torch.float32)
                    opt.step()
                    continue
                chunks = self._micro_batches(idx)
                total = 0.0
                for c, chunk in enumerate(chunks):
                    if c:  # after a skipped step: clears the per-sample gradients only
                        opt.zero_grad(set_to_none=True)
                    loss = self._loss(chunk)
                    # Opacus ("mean") scales each row's gradient by the number of rows;
                    # with `choices` rows per example, dividing by `choices` and summing
                    # an example's rows gives its per-example gradient
                    (loss / self.choices).backward()
                    self._fold_grad_samples()
                    total += float(loss.detach()) * len(chunk)
                    if c < len(chunks) - 1:  # clip and accumulate; noise once, at the end
                        opt.signal_skip_step(do_skip=True)
                    opt.step()
                losses.append(total / len(idx) if len(chunks) > 1 else float(loss.detach()))
        finally:
            opt.zero_grad(set_to_none=True)
            self.model.eval()
        return losses, self.cfg.federation.local_steps, rate

    def _train_paper(self, job: ClientJob) -> tuple[list[float], int, float]:
        rng = np.random.default_rng(job.seed)
        key = self._noise_key(job)
        rate = self._poisson_rate(job)
        C = self.cfg.privacy.clipping_norm
        std = job.noise_multiplier * C
        opt = self._optimizer(list(self._params.values()), noise_std=std)
        self.model.train()
        losses = []
        for step, idx in enumerate(self._poisson_batches(job, rng, rate)):
            opt.zero_grad(set_to_none=True)
            if len(idx) > 0:
                losses.append(self._accumulate_mean_gradient(idx))
            self._paper_noise_inplace(C, std, key.generator(step))
            opt.step()
        self.model.eval()
        return losses, self.cfg.federation.local_steps, rate

    def _paper_noise_inplace(self, clipping_norm: float, std: float,
                             gen: torch.Generator) -> None:
        """DP-LoRA Alg. 1: clip the batch-mean gradient of the A factors and that of the
        B factors each to C (in float32), add N(0, std^2) to each; a missing gradient
        counts as 0. Every trainable tensor is in one of the two groups
        (:meth:`paper_groups`), so none trains without clipping and noise."""
        for group in self.paper_groups():
            if not group:
                continue
            grads = {k: (self._params[k].grad.float() if self._params[k].grad is not None
                         else torch.zeros_like(self._params[k], dtype=torch.float32))
                     for k in group}
            try:
                clipped, _ = clip_by_global_norm(grads, clipping_norm)
            except NonFiniteUpdateError:
                continue  # the parameters go non-finite and the update is rejected
            noised = add_gaussian_noise(clipped, std, gen)
            for k in group:
                self._params[k].grad = noised[k]
