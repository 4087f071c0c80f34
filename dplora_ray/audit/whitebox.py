"""White-box audit: Dirac gradient canaries through one step of each mechanism's real code.

For a mode (``dpsgd``, ``paper``, ``client``, ``local``) the harness of
:mod:`dplora_ray.audit.dirac` runs the production trainer / transform / aggregator on a
linear model whose per-example gradients the auditor chooses, and a canary whose clipped
contribution is a known vector (Nasr et al. 2021, 2023). Each *trial* is one run with its
own noise key (the runner's: fresh secret keys, or keys derived from a public
``noise_seed`` for reproducible tests) and the same public seed and data; it releases
round 0 (never with the canary) and round 1 (without the canary in world 0, with it in
world 1). Three checks:

1. **Sensitivity probe** (deterministic): world 0 and world 1 with the *same* noise key
   give two releases whose noise cancels exactly; their difference is the canary's
   clipped contribution. Its norm divided by the sensitivity the accountant assumes is
   ``sensitivity_ratio``; above ``1 + SENSITIVITY_TOLERANCE`` the claimed epsilon cannot
   hold (the accountant's epsilon at sigma / ratio is larger). Catches skipped or
   overshooting clipping of any size.
2. **Threshold tests** (distribution-free): the score of a release is its projection on
   the canary direction in units of the claimed sensitivity (world 0 at 0, world 1 at 1,
   noise std ``sigma_eff`` if correct). Two attacks: ``release`` (round 1's score) and
   ``difference`` (round 1 minus round 0: cancels noise that is reused across rounds).
   Thresholds are fixed in advance at ``0.5 +- z sigma_eff``, z = 0, 0.5, ..., 3
   (``sqrt 2 sigma_eff`` for the difference); each gives ``eps >= log((TPR - delta) / FPR)`` and
   ``log((1 - FPR - delta) / (1 - TPR))`` with one-sided Clopper-Pearson bounds,
   Bonferroni over the family (the trials are independent runs: the binomial model is
   exact here).
3. **Gaussian-DP fit**: under the mechanism's own noise model (the score is Gaussian with
   the same variance in both worlds) the shift-to-noise ratio ``mu`` has an exact lower
   confidence bound (t interval of the shift over chi-square interval of the std);
   ``eps_G(mu_lower, delta)`` (Balle and Wang 2018, analytic Gaussian mechanism) is a
   lower bound on epsilon. Tight for correct code; catches noise that is absent, smaller
   than claimed, reused, or the same in every run (zero variance: ``mu = inf``).

The audit fails (``passed: False``) when the probe's ratio exceeds its tolerance or either
lower bound exceeds the accountant's epsilon for ONE step of the mode at the same sigma
and sampling rate 1 (what a single release of the canary costs). The confidence is split:
half for the threshold family, half for the two Gaussian fits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dplora_ray.audit.bounds import (
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_from_rates,
)

__all__ = [
    "SENSITIVITY_TOLERANCE",
    "THRESHOLD_Z",
    "WhiteboxResult",
    "gaussian_delta",
    "gaussian_epsilon",
    "gdp_mu_lower",
    "one_step_epsilon",
    "sigma_for_epsilon",
    "threshold_epsilon_lower",
    "whitebox_audit",
]

#: thresholds of the score at 0.5 +- z * (noise std the claim implies), fixed in advance
THRESHOLD_Z = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
#: relative float tolerance of the sensitivity probe (float32 rounding is ~1e-7)
SENSITIVITY_TOLERANCE = 1e-4
ATTACKS = ("release", "difference")


# --------------------------------------------------------------------------- statistics
def gaussian_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of the Gaussian mechanism with sensitivity / std = ``mu``
    (Balle and Wang 2018, Thm. 8): ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``."""
    from scipy.stats import norm

    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    a = norm.cdf(-epsilon / mu + mu / 2)
    # e^eps Phi(x) in logs: Phi(x) underflows long before e^eps overflows
    b = math.exp(epsilon + norm.logcdf(-epsilon / mu - mu / 2))
    return float(max(0.0, a - b))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon at which a Gaussian mechanism of ``mu`` is (eps, delta)-DP
    (``inf`` for ``mu = inf``, 0 when even eps = 0 needs no more than ``delta``)."""
    from scipy.optimize import brentq

    if not mu > 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(hi, mu) > delta:
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    return float(brentq(lambda e: gaussian_delta(e, mu) - delta, 0.0, hi, xtol=1e-10))


def one_step_epsilon(sigma_eff: float, delta: float, accountant: str = "rdp") -> float:
    """The accountant's epsilon for one release at effective multiplier ``sigma_eff``
    and sampling rate 1."""
    from dplora_ray.privacy.accountant import SampledGaussian, compute_epsilon

    return compute_epsilon([SampledGaussian(sigma_eff, 1.0, 1)], delta,
                           accountant)  # type: ignore[arg-type]


def gdp_mu_lower(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[float, float]:
    """(estimate, one-sided ``1 - alpha`` lower bound) of ``mu = (mean_y - mean_x) / s``
    for two Gaussian samples of equal variance ``s^2``.

    The bound combines two exact intervals, each at ``alpha / 2``: the two-sample t
    interval of the shift (from below) and the chi-square interval of the pooled standard
    deviation (from above), so ``mu >= shift_lower / s_upper`` with probability
    ``>= 1 - alpha``. A pooled standard deviation of 0 with a positive shift gives ``inf``
    (noise that is absent, or the same in every run)."""
    from scipy.stats import chi2
    from scipy.stats import t as student_t

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    nx, ny = len(x), len(y)
    df = nx + ny - 2
    shift = float(y.mean() - x.mean())
    pooled = math.sqrt((float(((x - x.mean()) ** 2).sum())
                        + float(((y - y.mean()) ** 2).sum())) / df)
    if pooled <= 1e-12 * max(1.0, abs(shift)):
        return (math.inf, math.inf) if shift > 0 else (0.0, 0.0)
    scale = math.sqrt(1.0 / nx + 1.0 / ny)
    shift_lo = shift - float(student_t.ppf(1.0 - alpha / 2, df)) * pooled * scale
    s_hi = pooled * math.sqrt(df / float(chi2.ppf(alpha / 2, df)))
    return shift / pooled, max(0.0, shift_lo / s_hi)


def threshold_epsilon_lower(x: np.ndarray, y: np.ndarray, thresholds: Sequence[float],
                            delta: float, alpha_each: float) -> dict[str, Any]:
    """The best of the threshold tests "score >= t means world 1" (``x``: world-0
    scores, ``y``: world-1 scores), each with one-sided Clopper-Pearson bounds at
    ``alpha_each`` (TPR from below, FPR from above)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    best: dict[str, Any] = {"epsilon": 0.0}
    for t in thresholds:
        tp, fp = int(np.sum(y >= t)), int(np.sum(x >= t))
        tpr_lo = float(clopper_pearson_lower(tp, len(y), alpha_each))
        fpr_hi = float(clopper_pearson_upper(fp, len(x), alpha_each))
        eps = float(epsilon_from_rates(tpr_lo, fpr_hi, delta))
        if eps > best["epsilon"] or "threshold" not in best:
            best = {"epsilon": eps, "threshold": float(t), "true_positives": tp,
                    "false_positives": fp, "tpr_lower": tpr_lo, "fpr_upper": fpr_hi}
    return best


# --------------------------------------------------------------------------- the audit
@dataclass
class WhiteboxResult:
    """One mode's white-box audit (see the module doc); ``to_dict`` is what
    ``audit.json`` holds under ``whitebox``."""

    mode: str
    canary: str
    noise_multiplier: float
    sigma_eff: float
    delta: float
    accountant: str
    confidence: float
    releases: int  # trials per world (release attack)
    difference_releases: int  # trials per world that also release round 0
    epsilon_accountant: float  # one step, q = 1
    epsilon_gaussian: float  # exact Gaussian-mechanism epsilon at sigma_eff
    sensitivity_ratio: float
    epsilon_threshold_lower: float
    epsilon_gdp_lower: float
    epsilon_lower_bound: float
    ratio_to_accountant: float
    mu_claimed: float
    tests: dict[str, Any] = field(default_factory=dict)
    passed: bool = True
    failures: list[str] = field(default_factory=list)
    noise_reproducible: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k, v in out.items():  # JSON has no inf
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = str(v)
        return out

    def summary_line(self) -> str:
        return (f"white-box {self.mode}: epsilon >= {self.epsilon_lower_bound:.3f} "
                f"({self.confidence:.6g} confidence; threshold "
                f"{self.epsilon_threshold_lower:.3f}, Gaussian fit "
                f"{self.epsilon_gdp_lower:.3f}) vs accountant {self.epsilon_accountant:.3f} "
                f"for one step (exact Gaussian {self.epsilon_gaussian:.3f}); ratio "
                f"{self.ratio_to_accountant:.2f}; sensitivity {self.sensitivity_ratio:.6f} "
                f"x claimed")


def _run_keys(noise_seed: int | None, world: int, n: int) -> list[Any]:
    from dplora_ray.privacy.streams import NoiseKey

    if noise_seed is None:  # the runner's keys: fresh secrets from the OS
        return [NoiseKey.generate() for _ in range(n)]
    base = NoiseKey.from_seed(noise_seed)
    return [base.derive(world, i) for i in range(n)]


def whitebox_audit(mode: str, noise_multiplier: float, *, delta: float = 1e-5,
                   releases: int = 1000, difference_releases: int = 200,
                   confidence: float = 0.95, noise_seed: int | None = None,
                   clipping_norm: float = 1.0, accountant: str = "rdp") -> WhiteboxResult:
    """Run the white-box audit of ``mode`` at the mechanism's ``noise_multiplier``.

    Args:
        mode: ``dpsgd``, ``paper``, ``client`` or ``local``.
        noise_multiplier: the mode's sigma (as in ``privacy.noise_multiplier``).
        delta: the delta of the bounds and of the accountant's epsilon.
        releases: independent trials per world.
        difference_releases: how many of them also release round 0 (the difference
            attack; noise reused across rounds makes it exact).
        confidence: of the whole family (probe aside, which is deterministic).
        noise_seed: None: every trial draws a fresh secret key, as a run does; an
            integer: trial keys derived from it (reproducible; public).
        clipping_norm: C.
        accountant: ``rdp`` or ``prv``, for the one-step epsilon.
    """
    from dplora_ray.audit.dirac import scenario
    from dplora_ray.privacy.streams import NoiseKey

    t0 = time.perf_counter()
    sc = scenario(mode, clipping_norm)
    sigma = float(noise_multiplier)
    sigma_eff = sigma * sc.effective_scale
    n_diff = min(difference_releases, releases)

    # 1. the sensitivity probe: one key, both worlds; the noise cancels
    probe_key = (NoiseKey.from_seed(noise_seed).derive(2) if noise_seed is not None
                 else NoiseKey.generate())
    r_out, r_in = sc.release(probe_key, 1, 0, sigma), sc.release(probe_key, 1, 1, sigma)
    sens_ratio = float(np.linalg.norm(r_in - r_out)) / sc.delta_claimed

    # 2./3. independent trials
    scores: dict[str, list[np.ndarray]] = {a: [] for a in ATTACKS}
    for world in (0, 1):
        keys = _run_keys(noise_seed, world, releases)
        s1 = np.array([sc.score(sc.release(k, 1, world, sigma)) for k in keys])
        s0 = np.array([sc.score(sc.release(k, 0, 0, sigma)) for k in keys[:n_diff]])
        scores["release"].append(s1)
        scores["difference"].append(s1[:n_diff] - s0)

    alpha = 1.0 - confidence
    spread = {"release": sigma_eff, "difference": math.sqrt(2.0) * sigma_eff}
    thresholds = {a: sorted({0.5 + sgn * z * spread[a] for z in THRESHOLD_Z
                             for sgn in (-1.0, 1.0)}) for a in ATTACKS}
    k = sum(len(t) for t in thresholds.values())
    tests: dict[str, Any] = {}
    eps_thr, eps_gdp = 0.0, 0.0
    for a in ATTACKS:
        x, y = scores[a]
        thr = threshold_epsilon_lower(x, y, thresholds[a], delta, alpha / 2 / k / 2)
        mu_hat, mu_lo = gdp_mu_lower(x, y, alpha / 2 / len(ATTACKS))
        eps_g = gaussian_epsilon(mu_lo, delta)
        tests[a] = {"threshold": thr, "mu_estimate": mu_hat, "mu_lower": mu_lo,
                    "epsilon_gdp_lower": eps_g, "trials_per_world": len(x),
                    "world0_mean": float(np.mean(x)), "world1_mean": float(np.mean(y)),
                    "world0_std": float(np.std(x, ddof=1)) if len(x) > 1 else 0.0,
                    "world1_std": float(np.std(y, ddof=1)) if len(y) > 1 else 0.0}
        eps_thr, eps_gdp = max(eps_thr, thr["epsilon"]), max(eps_gdp, eps_g)
    tests["threshold_family"] = k

    eps_acc = one_step_epsilon(sigma_eff, delta, accountant) if sigma_eff > 0 else math.inf
    eps_exact = gaussian_epsilon(1.0 / sigma_eff, delta) if sigma_eff > 0 else math.inf
    lb = max(eps_thr, eps_gdp)
    failures = []
    if sens_ratio > 1.0 + SENSITIVITY_TOLERANCE:
        failures.append(f"sensitivity: the canary moves the release by {sens_ratio:.6f} "
                        "times the sensitivity the accountant assumes")
    if eps_thr > eps_acc * (1 + 1e-9):
        failures.append(f"threshold test: epsilon >= {eps_thr:.3f} > {eps_acc:.3f}")
    if eps_gdp > eps_acc * (1 + 1e-9):
        failures.append(f"Gaussian fit: epsilon >= {eps_gdp:.3f} > {eps_acc:.3f}")
    return WhiteboxResult(
        mode=mode, canary=sc.what, noise_multiplier=sigma, sigma_eff=sigma_eff, delta=delta,
        accountant=accountant, confidence=confidence, releases=releases,
        difference_releases=n_diff, epsilon_accountant=eps_acc, epsilon_gaussian=eps_exact,
        sensitivity_ratio=sens_ratio, epsilon_threshold_lower=eps_thr,
        epsilon_gdp_lower=eps_gdp, epsilon_lower_bound=lb,
        ratio_to_accountant=(lb / eps_acc if math.isfinite(eps_acc) and eps_acc > 0
                             else math.nan),
        mu_claimed=1.0 / sigma_eff if sigma_eff > 0 else math.inf, tests=tests,
        passed=not failures, failures=failures, noise_reproducible=noise_seed is not None,
        seconds=time.perf_counter() - t0)


def sigma_for_epsilon(mode: str, epsilon: float, delta: float = 1e-5,
                      accountant: str = "rdp") -> float:
    """The ``noise_multiplier`` of ``mode`` whose one-step accountant epsilon (q = 1) is
    ``epsilon``."""
    from scipy.optimize import brentq

    from dplora_ray.privacy.mechanisms import get_mechanism

    scale = get_mechanism(mode).effective_scale(True)
    z = brentq(lambda s: one_step_epsilon(s, delta, accountant) - epsilon, 1e-2, 1e3,
               xtol=1e-10)
    return float(z / scale)
