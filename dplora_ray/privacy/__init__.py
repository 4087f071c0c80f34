"""Differential privacy for dplora_ray: clipping, Gaussian noise, accounting, calibration,
and the privacy ledger. Imports neither Ray nor peft.

Invariants:
    * Epsilon is always computed from the ledger's entries (typed, append-only records of
      Poisson-subsampled Gaussian releases), never stored or updated incrementally; a
      loaded ledger recomputes it.
    * Ledger entries carry the EFFECTIVE noise multiplier (noise std / L2 sensitivity):
      for the paper's batch-level mechanism that is sigma / (2 sqrt 2), or sigma / 2 with
      FFA-LoRA (:func:`effective_noise_scale`).
    * Calibration never returns a noise multiplier whose epsilon exceeds the target, and
      an unreachable target raises :class:`~dplora_ray.errors.PrivacyError`.
    * Noise is drawn only from a ``torch.Generator`` passed in; no global RNG is used.
    * Functions do not mutate their inputs (unless their name ends in ``_inplace``).

The tensor helpers (:func:`clip_by_global_norm`, :func:`add_gaussian_noise`,
:func:`global_l2_norm`, :class:`NonFiniteUpdateError`) import torch on first use, so the
accounting part (and ``dplora-ray privacy ...``) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dplora_ray.privacy.accountant import DEFAULT_ORDERS, SampledGaussian, compute_epsilon
from dplora_ray.privacy.calibration import calibrate_noise_multiplier
from dplora_ray.privacy.ledger import LedgerEntry, PrivacyLedger
from dplora_ray.privacy.mechanisms import effective_noise_scale

if TYPE_CHECKING:
    from dplora_ray.privacy.noise import (
        NonFiniteUpdateError,
        add_gaussian_noise,
        clip_by_global_norm,
        global_l2_norm,
    )

__all__ = [
    "DEFAULT_ORDERS",
    "LedgerEntry",
    "NonFiniteUpdateError",
    "PrivacyLedger",
    "SampledGaussian",
    "add_gaussian_noise",
    "calibrate_noise_multiplier",
    "clip_by_global_norm",
    "compute_epsilon",
    "effective_noise_scale",
    "global_l2_norm",
]

_LAZY_NOISE = ("NonFiniteUpdateError", "add_gaussian_noise", "clip_by_global_norm",
               "global_l2_norm")


def __getattr__(name: str) -> Any:
    if name in _LAZY_NOISE:
        from dplora_ray.privacy import noise

        return getattr(noise, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
