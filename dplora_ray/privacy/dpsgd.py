"""Opacus' DP-SGD optimizer with exact float32 clipping and per-step noise streams.

Opacus' ``DPOptimizer.clip_and_accumulate`` takes per-example norms and clip factors in
the dtype of the per-sample gradients. Under bfloat16 autocast those are bf16, and the
clipped per-example gradients were measured up to 1.0098 C on tiny-llama and 1.0046 C on
SmolLM2 (41% of clipped gradients above C): the sensitivity, and so the epsilon, did not
hold. :class:`Float32ClipDPOptimizer` overrides that one step: the per-sample gradients
are cast to float32 first, and the factors come from
:func:`~dplora_ray.privacy.noise.per_sample_clip_factors`, which guarantees
``||factor_i g_i|| <= C`` in the arithmetic that is then summed. The rest (noise on the
sum, division by the expected batch size, the optimizer step) is Opacus'.

Noise: the caller sets :attr:`generator` before each step (one named stream per step, see
:mod:`dplora_ray.privacy.streams`); Opacus draws N(0, sigma^2 C^2) from it.

Imports Opacus (and torch); never imported by ``dplora_ray.privacy`` itself.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from dplora_ray.privacy.noise import per_sample_clip_factors

__all__ = ["Float32ClipDPOptimizer"]


class Float32ClipDPOptimizer(DPOptimizer):
    """``opacus.optimizers.DPOptimizer`` whose per-example clipping is exact in float32.

    After each :meth:`clip_and_accumulate`, :attr:`last_clip_factors` holds the factors
    used (float32, one per example of the step), so the clipping can be checked.
    """

    last_clip_factors: torch.Tensor | None = None

    def clip_and_accumulate(self) -> None:
        grads = [self._get_flat_grad_sample(p).to(torch.float32) for p in self.params]
        factors = per_sample_clip_factors(grads, float(self.max_grad_norm))
        self.last_clip_factors = factors.detach()
        for p, g in zip(self.params, grads):
            _check_processed_flag(p.grad_sample)
            f = factors.to(g.device)
            clipped_sum = torch.einsum("i,i...", f, g).to(p.dtype)
            if p.summed_grad is not None:
                p.summed_grad += clipped_sum
            else:
                p.summed_grad = clipped_sum
            _mark_as_processed(p.grad_sample)
