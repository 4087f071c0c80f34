"""Clipping and Gaussian noise on named tensors (LoRA updates and gradients).

The two steps of the Gaussian mechanism on a vector made of several tensors: clip the
concatenation to L2 norm C (so one protected unit moves it by a bounded amount), then add
N(0, std^2) to every coordinate with std = noise_multiplier * C (Dwork and Roth 2014,
Thm. A.1; Abadi et al. 2016, Alg. 1; McMahan et al. 2018, Alg. 1).

Invariants:
    * No function mutates its inputs (none here ends in ``_inplace``); results are new
      tensors.
    * Randomness comes only from the ``torch.Generator`` passed in, drawn in sorted key
      order, so the same generator state gives the same noise whatever the dict order.
    * A non-finite norm raises :class:`NonFiniteUpdateError` instead of being clipped
      (clipping NaN/inf would silently break the sensitivity bound); a zero norm is
      returned unchanged (no division by zero).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from dplora_ray.errors import PrivacyError

__all__ = [
    "NonFiniteUpdateError",
    "add_gaussian_noise",
    "clip_by_global_norm",
    "global_l2_norm",
    "per_sample_clip_factors",
]


class NonFiniteUpdateError(PrivacyError):
    """A tensor set to be clipped or released has a NaN or infinite L2 norm.

    Args:
        norm: the offending norm (nan or inf).
        what: what was being processed, e.g. ``"update of client-3"``.
    """

    def __init__(self, norm: float, what: str = "update") -> None:
        self.norm = norm
        self.what = what
        super().__init__(
            f"{what} has a non-finite global L2 norm ({norm}); refusing to clip or "
            "release it")

    def __reduce__(self):  # keep pickling exact across Ray
        return (type(self), (self.norm, self.what))


def _check_floating(name: str, tensor: object) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise PrivacyError(f"tensors[{name!r}] must be a torch.Tensor. Found {type(tensor)!r}.")
    if not tensor.is_floating_point():
        raise PrivacyError(
            f"tensors[{name!r}] must have a floating dtype. Found {tensor.dtype}.")
    return tensor


def global_l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the concatenation of all tensors (accumulated in float64).

    Returns 0.0 for an empty mapping; may return nan or inf.
    """
    squares = []
    for name in sorted(tensors):
        t = _check_floating(name, tensors[name]).detach()
        squares.append(float(t.to(torch.float64).square().sum()))
    return math.sqrt(math.fsum(squares)) if squares else 0.0


def clip_by_global_norm(tensors: Mapping[str, torch.Tensor], clipping_norm: float
                        ) -> tuple[dict[str, torch.Tensor], float]:
    """Scale all tensors together so that their global L2 norm is at most ``clipping_norm``.

    Args:
        tensors: named tensors (e.g. one client's LoRA update).
        clipping_norm: C > 0.

    Returns:
        (clipped copies, the global norm before clipping). Tensors whose global norm is
        already <= C (including zero) are returned as unchanged copies.

    Raises:
        NonFiniteUpdateError: the global norm is nan or inf.
        PrivacyError: ``clipping_norm`` is not a finite number > 0, or a tensor is not
            floating point.
    """
    if (isinstance(clipping_norm, bool) or not isinstance(clipping_norm, (int, float))
            or not math.isfinite(clipping_norm) or clipping_norm <= 0):
        raise PrivacyError(f"clipping_norm must be a finite number > 0. Found {clipping_norm!r}.")
    norm = global_l2_norm(tensors)
    if not math.isfinite(norm):
        raise NonFiniteUpdateError(norm)
    if norm <= clipping_norm:
        return {k: tensors[k].detach().clone() for k in tensors}, norm
    factor = clipping_norm / norm
    # Rounding of the scaled elements (float16/bfloat16 especially) can leave the norm a
    # hair above C, which would break the sensitivity bound: shrink until it holds.
    slack = max(torch.finfo(t.dtype).eps for t in tensors.values())
    for _ in range(8):
        clipped = {k: tensors[k].detach() * factor for k in tensors}
        clipped_norm = global_l2_norm(clipped)
        if clipped_norm <= clipping_norm:
            return clipped, norm
        factor *= clipping_norm / clipped_norm * (1.0 - slack)
    raise PrivacyError(  # pragma: no cover - rounding cannot survive eight shrinkings
        f"clipping to clipping_norm={clipping_norm!r} did not converge")


def per_sample_clip_factors(grad_samples: list[torch.Tensor], clipping_norm: float
                            ) -> torch.Tensor:
    """Per-example factors that scale each example's gradient to L2 norm <= C, exactly.

    ``grad_samples`` are the per-example gradients of each parameter (first dimension:
    the examples), cast to float32 whatever dtype the forward and backward ran in (bf16
    autocast included): norms are accumulated in float64, the factors are float32, and any
    example whose scaled gradient (computed in float32, as it will be summed) still lands
    above C after rounding is shrunk again until it does not. So
    ``|| factor_i * g_i ||_2 <= C`` holds for every example in the float32 arithmetic the
    caller uses. A non-finite norm gives a NaN factor (the update is then non-finite and
    rejected), never a silently clipped one.

    Returns:
        float32 factors in [0, 1], shape ``[examples]``, on the first tensor's device.
    """
    if (isinstance(clipping_norm, bool) or not isinstance(clipping_norm, (int, float))
            or not math.isfinite(clipping_norm) or clipping_norm <= 0):
        raise PrivacyError(f"clipping_norm must be a finite number > 0. Found {clipping_norm!r}.")
    if not grad_samples:
        raise PrivacyError("per_sample_clip_factors needs at least one tensor")
    n = grad_samples[0].shape[0]
    device = grad_samples[0].device
    if n == 0:  # an empty Poisson batch: nothing to clip
        return torch.zeros(0, dtype=torch.float32, device=device)
    flat = [g.detach().to(torch.float32).reshape(n, -1) for g in grad_samples]

    def norms(factors: torch.Tensor | None) -> torch.Tensor:
        total = torch.zeros(n, dtype=torch.float64, device=device)
        for g in flat:
            x = g if factors is None else g * factors.unsqueeze(1)  # float32, as summed
            total += x.to(torch.float64).square().sum(dim=1)
        return total.sqrt()

    before = norms(None)
    factors = (clipping_norm / before).clamp(max=1.0).to(torch.float32)
    factors = torch.where(torch.isfinite(before), factors, torch.full_like(factors, math.nan))
    slack = torch.finfo(torch.float32).eps
    for _ in range(8):
        after = norms(factors)
        over = after > clipping_norm  # NaN compares False: left as NaN
        if not bool(over.any()):
            return factors
        shrink = (clipping_norm / after * (1.0 - 2 * slack)).to(torch.float32)
        factors = torch.where(over, factors * shrink, factors)
    raise PrivacyError(  # pragma: no cover - rounding cannot survive eight shrinkings
        f"per-example clipping to clipping_norm={clipping_norm!r} did not converge")


def add_gaussian_noise(tensors: Mapping[str, torch.Tensor], std: float,
                       generator: torch.Generator) -> dict[str, torch.Tensor]:
    """New tensors with independent N(0, std^2) noise added to every element.

    Noise is drawn from ``generator`` in sorted key order, in float32 (float64 for float64
    tensors) on the generator's device, then added and cast back to each tensor's dtype
    and device.

    Args:
        tensors: named floating-point tensors.
        std: noise standard deviation (noise_multiplier * clipping_norm), >= 0.
        generator: the only source of randomness.

    Returns:
        A dict with the same keys (in sorted order) and noised copies.

    Raises:
        PrivacyError: ``std`` is negative or not finite, ``generator`` is not a
            ``torch.Generator``, or a tensor is not floating point.
    """
    if (isinstance(std, bool) or not isinstance(std, (int, float))
            or not math.isfinite(std) or std < 0):
        raise PrivacyError(f"std must be a finite number >= 0. Found {std!r}.")
    if not isinstance(generator, torch.Generator):
        raise PrivacyError(f"generator must be a torch.Generator. Found {generator!r}.")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        t = _check_floating(name, tensors[name]).detach()
        draw_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        noise = torch.randn(t.shape, generator=generator, dtype=draw_dtype,
                            device=generator.device)
        noised = t.to(draw_dtype) + noise.to(t.device) * std
        out[name] = noised.to(t.dtype)
    return out
