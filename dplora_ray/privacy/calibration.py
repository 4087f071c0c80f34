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

__all__ = [
    "DP_MODES",
    "calibrate_noise_multiplier",
    "effective_noise_scale",
]

#: The privacy modes that add noise (``privacy.mode`` minus ``none``).
DP_MODES: tuple[str, ...] = ("dpsgd", "paper", "client", "local")

_TOLERANCE = 0.02  # accept epsilon in [(1 - tol) * target, target]
_MIN_NOISE = 1e-6  # below this the search stops looking for a smaller multiplier
_MAX_PROBES = 200


def effective_noise_scale(mode: str, train_a: bool) -> float:
    """Factor turning a mode's noise multiplier into the one the accountant must use.

    The accountant needs noise standard deviation divided by the L2 sensitivity of what
    is released when one protected unit changes.

    * ``dpsgd`` (per-example clipping to C, noise N(0, sigma^2 C^2) on the sum; Abadi et
      al. 2016, Alg. 1) and ``client`` (DP-FedAvg, McMahan et al. 2018, Alg. 1: each
      client update clipped to C, noise with std sigma * C on the sum), accounted for
      adding/removing one unit: the sensitivity is C, so the scale is 1.
    * ``local`` (each client clips its update to C and adds N(0, sigma^2 C^2) before
      upload): the server sees each client's upload under its identity, so "the client
      is absent" is not a meaningful neighbour; local DP compares any two datasets of the
      same client (replacement). Two clipped updates differ by up to 2C: scale 1/2.
    * ``paper`` (DP-LoRA, Liu et al. 2023, arXiv:2312.17493, Alg. 1): the client clips the
      *batch-averaged* gradient of A and, separately, of B to norm C and adds
      N(0, sigma^2 C^2) to each. Changing one record can move a clipped vector anywhere
      in the ball of radius C, i.e. by up to 2C (the average is taken before clipping, so
      nothing bounds one record's share of it). A and B together move by at most
      sqrt((2C)^2 + (2C)^2) = 2 sqrt(2) C, while the noise on the concatenated (A, B)
      vector is isotropic with std sigma * C. The effective multiplier is therefore
      sigma / (2 sqrt(2)): scale 1 / (2 sqrt(2)). With FFA-LoRA (``train_a`` False, only
      B is trained and released) the sensitivity is 2C: scale 1/2. Conditioning on the
      rest of the Poisson batch, neighbouring outputs differ by a shift of norm at most
      this sensitivity, so the sampled-Gaussian bound of Mironov et al. 2019
      (arXiv:1908.10530) applies with the effective multiplier.

    Args:
        mode: ``dpsgd``, ``paper``, ``client`` or ``local``.
        train_a: whether LoRA's A factor is trained and released (False: FFA-LoRA).

    Returns:
        The scale; effective noise multiplier = noise_multiplier * scale.

    Raises:
        PrivacyError: unknown mode.
    """
    if mode not in DP_MODES:
        raise PrivacyError(
            f"mode must be one of {', '.join(repr(m) for m in DP_MODES)}. Found {mode!r}.")
    if mode == "local":
        return 0.5
    if mode != "paper":
        return 1.0
    return 1.0 / (2.0 * math.sqrt(2.0)) if train_a else 0.5


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
