"""The PRV accountant (Gopi, Lee, Wutschitz 2021, arXiv 2106.02848) through Opacus, with
a guard against grids that do not fit in memory.

Used by :func:`~dplora_ray.privacy.accountant.compute_epsilon` with ``accountant="prv"``.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import TYPE_CHECKING

import numpy as np

from dplora_ray.errors import PrivacyError

if TYPE_CHECKING:
    from dplora_ray.privacy.accountant import SampledGaussian

__all__ = ["PRV_MAX_GRID_POINTS", "epsilon_prv"]


#: the largest PRV discretisation grid we let Opacus build (points; several float64
#: arrays of this length live at once: 7.5e6 points measured 1.6 GB peak, so about 3.5 GB
#: at the cap)
PRV_MAX_GRID_POINTS = 2**24


def _check_prv_grid(events: tuple[SampledGaussian, ...], delta: float) -> None:
    """Refuse (PrivacyError) a PRV computation whose grid would not fit in memory.

    Opacus' grid has ``2 L / mesh`` points with ``mesh = eps_error / sqrt(T log(12 /
    delta_error) / 2)`` (Gopi et al. 2021), so it grows with the square root of the total
    step count T; at T = 1e7, q = 0.01 it asks for far more memory than the machine has
    and the process is killed rather than raising. The size is computed here first, with
    the same formulas and Opacus' own safe domain bound.
    """
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        compute_safe_domain_size,
    )

    eps_error, delta_error = 0.01, delta / 1000  # Opacus' get_epsilon defaults
    total = sum(ev.steps for ev in events)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", UserWarning)
            half = compute_safe_domain_size(
                prvs=[PoissonSubsampledGaussianPRV(ev.sampling_rate, ev.noise_multiplier)
                      for ev in events],
                max_self_compositions=[ev.steps for ev in events],
                eps_error=eps_error, delta_error=delta_error)
        points = 2.0 * float(half) / (eps_error / math.sqrt(
            total * math.log(12 / delta_error) / 2))
    except (ValueError, RuntimeError, OverflowError, FloatingPointError, MemoryError):
        return  # Opacus will say what is wrong
    if not math.isfinite(points) or points > PRV_MAX_GRID_POINTS:
        raise PrivacyError(
            f"the prv accountant would need a grid of {points:.3g} points (more than "
            f"{PRV_MAX_GRID_POINTS:.3g}, the memory limit) for {total} steps at "
            f"delta={delta!r}; use accountant='rdp'")


@functools.lru_cache(maxsize=1024)
def epsilon_prv(events: tuple[SampledGaussian, ...], delta: float) -> float:
    """PRV epsilon of merged events (cached: a pure function, and a round's clients often
    share one history)."""
    from opacus.accountants import PRVAccountant  # lazy: opacus imports torch

    accountant = PRVAccountant()  # a fresh accountant we own; history set once
    accountant.history = [(ev.noise_multiplier, ev.sampling_rate, ev.steps)
                          for ev in events]
    _check_prv_grid(events, delta)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            # Opacus sizes the PRV domain with an internal RDP bound on its own short
            # order grid and warns when that grid is too short, and takes log(1 - q) = -inf
            # for q = 1; both are harmless here.
            warnings.simplefilter("ignore", UserWarning)
            eps = float(accountant.get_epsilon(delta))
    except (ValueError, RuntimeError, OverflowError, FloatingPointError, MemoryError) as exc:
        # MemoryError: Opacus sizes its PRV grid by the step count (T = 1e7 at q = 0.01
        # asks for more memory than any machine has)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PrivacyError(
            f"the prv accountant failed for events={events!r} at delta={delta!r} "
            f"({first}); use accountant='rdp'") from None
    if math.isnan(eps):
        raise PrivacyError(
            f"the prv accountant returned NaN for events={events!r} at delta={delta!r}; "
            "use accountant='rdp'")
    return max(0.0, eps)
