"""Noise calibration: the smallest noise multiplier that meets a target epsilon.

Invariants:
    * The returned noise multiplier never overshoots: its epsilon, computed afresh with
      :func:`~dplora_ray.privacy.accountant.compute_epsilon`, is at most the target.
    * Each bisection probe is an independent computation (no accountant state is reused
      or mutated between probes; cf. ``dp_accounting.mechanism_calibration``).
    * An unreachable target raises :class:`~dplora_ray.errors.PrivacyError`; it is never
      silently clipped.
"""

from __future__ import annotations

import math

from dplora_ray.errors import PrivacyError
from dplora_ray.privacy.accountant import (
    ACCOUNTANTS,
    AccountantName,
    SampledGaussian,
    compute_epsilon,
)

__all__ = ["calibrate_noise_multiplier"]

_TOLERANCE = 0.02  # accept epsilon in [(1 - tol) * target, target]
_MIN_NOISE = 1e-6  # below this the search stops looking for a smaller multiplier
_MAX_PROBES = 200


def _validate(target_epsilon: float, sampling_rate: float, steps: int, delta: float,
              accountant: str, effective_scale: float, max_noise: float) -> None:
    def bad(name: str, value: object, bound: str) -> PrivacyError:
        return PrivacyError(f"{name} must be {bound}. Found {value!r}.")

    def number(value: object) -> bool:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and not math.isnan(value))

    if not (number(target_epsilon) and math.isfinite(target_epsilon)
            and target_epsilon > 0):
        raise bad("target_epsilon", target_epsilon, "a finite number > 0")
    if not (number(sampling_rate) and 0 < sampling_rate <= 1):
        raise bad("sampling_rate", sampling_rate, "in (0, 1]")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise bad("steps", steps, "an integer >= 1")
    if not (number(delta) and 0 < delta < 1):
        raise bad("delta", delta, "in (0, 1)")
    if accountant not in ACCOUNTANTS:
        raise bad("accountant", accountant, "one of 'rdp', 'prv'")
    if not (number(effective_scale) and math.isfinite(effective_scale)
            and effective_scale > 0):
        raise bad("effective_scale", effective_scale, "a finite number > 0")
    if not (number(max_noise) and math.isfinite(max_noise) and max_noise > 0):
        raise bad("max_noise", max_noise, "a finite number > 0")


def calibrate_noise_multiplier(target_epsilon: float, sampling_rate: float, steps: int,
                               delta: float, accountant: AccountantName = "rdp", *,
                               effective_scale: float = 1.0,
                               max_noise: float = 1e4) -> float:
    """Smallest noise multiplier whose epsilon does not exceed ``target_epsilon``.

    Bisection (on a log scale) over sigma for
    ``compute_epsilon([SampledGaussian(sigma * effective_scale, sampling_rate, steps)],
    delta, accountant) <= target_epsilon``: it stops once that epsilon lies within 2% below
    the target (or the bracket is narrower than one part in a million) and returns the
    upper end of the bracket, whose epsilon is known to be at most the target.

    Args:
        target_epsilon: the budget, > 0.
        sampling_rate: Poisson sampling rate per step, in (0, 1].
        steps: number of steps (rounds for ``client``, participations for ``local``).
        delta: target delta, in (0, 1).
        accountant: ``"rdp"`` or ``"prv"``.
        effective_scale: multiplier from the mode's sigma to the accounted one (see
            :func:`effective_noise_scale`); the returned value is the mode's sigma.
        max_noise: the largest sigma considered.

    Returns:
        sigma with epsilon(sigma * effective_scale) <= target_epsilon.

    Raises:
        PrivacyError: invalid argument, or the target is unreachable even at
            ``max_noise``.
    """
    _validate(target_epsilon, sampling_rate, steps, delta, accountant, effective_scale,
              max_noise)

    def epsilon(sigma: float) -> float:
        event = SampledGaussian(sigma * effective_scale, sampling_rate, steps)
        try:
            return compute_epsilon([event], delta, accountant)
        except PrivacyError:
            if accountant == "prv":  # numerical failure at an extreme probe
                return math.inf
            raise

    def good_enough(eps: float) -> bool:
        return (1.0 - _TOLERANCE) * target_epsilon <= eps <= target_epsilon

    # Bracket: lo infeasible (epsilon > target) or 0, hi feasible (epsilon <= target).
    hi = min(1.0, max_noise)
    eps_hi = epsilon(hi)
    if eps_hi <= target_epsilon:
        lo = 0.0
        while not good_enough(eps_hi):
            trial = hi / 2.0
            if trial < _MIN_NOISE:
                return hi
            eps_trial = epsilon(trial)
            if eps_trial > target_epsilon:
                lo = trial
                break
            hi, eps_hi = trial, eps_trial
        else:
            return hi
    else:
        while True:
            lo = hi
            if hi >= max_noise:
                raise PrivacyError(
                    f"target_epsilon={target_epsilon!r} is unreachable: noise_multiplier="
                    f"{max_noise!r} (the maximum) still gives epsilon={eps_hi:.6g} "
                    f"(sampling_rate={sampling_rate!r}, steps={steps!r}, delta={delta!r}, "
                    f"accountant={accountant!r}, effective_scale={effective_scale:.6g})")
            hi = min(hi * 2.0, max_noise)
            eps_hi = epsilon(hi)
            if eps_hi <= target_epsilon:
                break

    for _ in range(_MAX_PROBES):
        if good_enough(eps_hi) or hi <= lo * (1.0 + 1e-6):
            break
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 2.0
        eps_mid = epsilon(mid)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi
