"""Privacy accounting for compositions of Poisson-subsampled Gaussian mechanisms.

Every private mechanism in dplora_ray (DP-SGD steps, the paper's batch-level noise,
DP-FedAvg rounds, local noise before upload) is a Gaussian mechanism applied to a
Poisson-subsampled input. A run is described by immutable :class:`SampledGaussian`
records (what happened), and :func:`compute_epsilon` turns a sequence of them into an
``(epsilon, delta)`` guarantee (how it is counted).

Two accountants:

* ``rdp``: Renyi DP of the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019,
  "Renyi Differential Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530,
  Sec. 3.3), composed additively over steps (Mironov 2017, Prop. 1), converted to
  ``(epsilon, delta)`` with the improved conversion of Balle et al. 2020 (arXiv:1905.09982,
  Thm. 21) / Canonne, Kamath, Steinke 2020 (arXiv:2004.00010, Prop. 12), minimised over
  :data:`DEFAULT_ORDERS`.
* ``prv``: numerical composition of privacy loss random variables (Gopi, Lee, Wutschitz
  2021, arXiv:2106.02848) via :class:`opacus.accountants.PRVAccountant`; the upper bound
  of its estimate is returned.

The RDP of the sampled Gaussian is computed here, vectorised with numpy/scipy, rather than
with :func:`opacus.accountants.analysis.rdp.compute_rdp`: Opacus evaluates the
fractional-order series one term per Python iteration, which for sampling rates near 0.5
needs ~10^5 terms per order (seconds to minutes for the fine order grid below). The
values agree with Opacus and with Google's ``dp_accounting`` (see
``tests/test_privacy_accountant.py``).

Invariants:
    * epsilon is a pure function of the events, delta and the accountant: nothing is
      remembered between calls except caches of pure functions (single-step RDP curves
      keyed by (noise_multiplier, sampling_rate, orders); PRV epsilons keyed by the merged
      events and delta).
    * Events with ``sampling_rate == 0`` or ``steps == 0`` contribute nothing; a zero
      noise multiplier with ``steps > 0`` gives ``math.inf``.
    * Every approximation errs on the side of a larger epsilon (orders whose series does
      not converge are bounded from above by convexity; see :func:`_log_a_frac`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import special

from dplora_ray.errors import PrivacyError
from dplora_ray.privacy.prv import epsilon_prv

__all__ = [
    "DEFAULT_ORDERS",
    "SampledGaussian",
    "compute_epsilon",
    "compute_rdp",
    "merge_events",
    "rdp_to_epsilon",
]

AccountantName = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")


def _default_orders() -> tuple[float, ...]:
    fine = [round(1.0 + k / 100, 2) for k in range(1, 100)]  # 1.01 .. 1.99
    mid = [round(2.0 + k / 10, 1) for k in range(100)]  # 2.0 .. 11.9
    upper = [12.0 + k / 4 for k in range(32)]  # 12 .. 19.75
    ints = [float(k) for k in range(20, 64)]  # 20 .. 63
    large = sorted({float(round(64 * 2 ** (k / 8))) for k in range(49)})  # 64 .. 4096
    return tuple(sorted(set(fine + mid + upper + ints + large)))


#: RDP orders: fine near 1 (large epsilons), dense up to 20 (typical training), and
#: geometric up to 4096 (very small epsilons, e.g. one step of a heavily noised
#: mechanism: sigma=20, q=0.001 gives epsilon ~5e-4 at delta=1e-5 where Opacus' default
#: orders, which stop at 63, give 0.10).
DEFAULT_ORDERS: tuple[float, ...] = _default_orders()


def _check_number(name: str, value: object, low: float, high: float, *,
                  low_open: bool = False, high_open: bool = False) -> float:
    lb = "(" if low_open else "["
    rb = ")" if high_open else "]"
    bound = f"{lb}{low:g}, {high:g}{rb}"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise PrivacyError(f"{name} must be a number in {bound}. Found {value!r}.")
    v = float(value)
    ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if math.isnan(v) or not ok:
        raise PrivacyError(f"{name} must be in {bound}. Found {value!r}.")
    return v


def _check_delta(delta: object) -> float:
    return _check_number("delta", delta, 0.0, 1.0, low_open=True, high_open=True)


@dataclass(frozen=True)
class SampledGaussian:
    """``steps`` compositions of a Poisson-subsampled Gaussian mechanism.

    Each step includes every record independently with probability ``sampling_rate``,
    sums their (clipped, sensitivity-1 after scaling) contributions and adds Gaussian
    noise with standard deviation ``noise_multiplier`` times the sensitivity. This is the
    ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), steps)`` of
    ``dp_accounting``.

    Attributes:
        noise_multiplier: noise standard deviation divided by the L2 sensitivity (the
            effective multiplier; see :func:`~dplora_ray.privacy.effective_noise_scale`).
        sampling_rate: Poisson inclusion probability of the protected unit per step.
        steps: number of compositions.

    Raises:
        PrivacyError: a value is out of range; the message gives the bound and the value.
    """

    noise_multiplier: float
    sampling_rate: float
    steps: int

    def __post_init__(self) -> None:
        nm = self.noise_multiplier
        if (isinstance(nm, bool) or not isinstance(nm, (int, float, np.floating, np.integer))
                or not math.isfinite(float(nm)) or nm < 0):
            raise PrivacyError(
                f"noise_multiplier must be a finite number >= 0. Found {nm!r}.")
        _check_number("sampling_rate", self.sampling_rate, 0.0, 1.0)
        st = self.steps
        if isinstance(st, bool) or not isinstance(st, (int, np.integer)) or st < 0:
            raise PrivacyError(f"steps must be an integer >= 0. Found {st!r}.")
        object.__setattr__(self, "noise_multiplier", float(nm))
        object.__setattr__(self, "sampling_rate", float(self.sampling_rate))
        object.__setattr__(self, "steps", int(st))

    @property
    def is_trivial(self) -> bool:
        """True when the event releases nothing about the unit (q == 0 or no steps)."""
        return self.steps == 0 or self.sampling_rate == 0.0


def merge_events(events: Sequence[SampledGaussian]) -> list[SampledGaussian]:
    """Merge events with equal (noise_multiplier, sampling_rate) by adding their steps.

    Exact for both accountants: RDP composes additively (Mironov 2017, Prop. 1) and the
    PRV accountant self-composes each distinct mechanism. Trivial events are dropped.
    The result is sorted, so equal multisets of events give equal merged lists.
    """
    steps: dict[tuple[float, float], int] = {}
    for ev in events:
        if not isinstance(ev, SampledGaussian):
            raise PrivacyError(f"events must be SampledGaussian records. Found {ev!r}.")
        if ev.is_trivial:
            continue
        key = (ev.noise_multiplier, ev.sampling_rate)
        steps[key] = steps.get(key, 0) + ev.steps
    return [SampledGaussian(z, q, t) for (z, q), t in sorted(steps.items())]


# --------------------------------------------------------------------------------------
# RDP of the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019, Sec. 3.3).
#
# For the mixture mu = (1 - q) N(0, s^2) + q N(1, s^2) against mu0 = N(0, s^2), the RDP at
# order a is log(A_a) / (a - 1) with A_a = E_{z ~ mu0}[(mu(z) / mu0(z))^a].
# --------------------------------------------------------------------------------------

_SERIES_TOL = 30.0  # stop a series once its terms are e^-30 below the running total
_SERIES_FIRST_CHUNK = 32
_SERIES_MAX_TERMS = 512


def _log_a_int(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """log A_a for integer orders a >= 1 by the binomial expansion (Mironov et al. 2019,
    Sec. 3.3, integer case): A_a = sum_i C(a, i) q^i (1-q)^(a-i) exp((i^2 - i) / (2 s^2)).
    """
    if orders.size == 0:
        return np.zeros(0)
    ints = orders.astype(np.int64)
    lengths = ints + 1
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    a = np.repeat(ints, lengths).astype(np.float64)
    i = np.arange(lengths.sum()) - np.repeat(starts, lengths)
    i = i.astype(np.float64)
    log_comb = special.gammaln(a + 1) - special.gammaln(i + 1) - special.gammaln(a - i + 1)
    terms = (log_comb + i * math.log(q) + (a - i) * math.log1p(-q)
             + (i * i - i) / (2.0 * sigma * sigma))
    peak = np.maximum.reduceat(terms, starts)
    sums = np.add.reduceat(np.exp(terms - np.repeat(peak, lengths)), starts)
    return peak + np.log(sums)


def _series_terms(q: float, sigma: float, a: np.ndarray, i: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log-magnitudes of the two series of the fractional case and the sign of C(a, i)."""
    z0 = sigma * sigma * math.log(1.0 / q - 1.0) + 0.5
    a2 = a[:, None]
    i2 = i[None, :]
    j = a2 - i2
    log_comb = special.gammaln(a2 + 1) - special.gammaln(i2 + 1) - special.gammaln(j + 1)
    sign = special.gammasgn(j + 1)
    logq, log1mq = math.log(q), math.log1p(-q)
    two_s2 = 2.0 * sigma * sigma
    s0 = (log_comb + i2 * logq + j * log1mq + (i2 * i2 - i2) / two_s2
          + special.log_ndtr((z0 - i2) / sigma))
    s1 = (log_comb + j * logq + i2 * log1mq + (j * j - j) / two_s2
          + special.log_ndtr((j - z0) / sigma))
    return s0, s1, sign


def _log_a_frac_series(q: float, sigma: float, orders: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """log A_a for fractional orders by the series of Mironov et al. 2019, Sec. 3.3.

    A_a = A0 + A1 with
    A0 = sum_i C(a, i) q^i (1-q)^(a-i) exp((i^2 - i) / (2 s^2)) Phi((z0 - i) / s),
    A1 = sum_i C(a, i) q^(a-i) (1-q)^i exp(((a-i)^2 - (a-i)) / (2 s^2)) Phi((a-i-z0) / s),
    z0 = s^2 log(1/q - 1) + 1/2; C(a, i) is the generalised binomial coefficient (its sign
    alternates for i > a + 1). Terms are summed in chunks, all orders at once, until the
    last terms are decreasing and below the total by e^-30.

    Returns:
        (log A, converged): ``converged[k]`` is False where the series did not settle
        within ``_SERIES_MAX_TERMS`` terms (its log A is then meaningless).
    """
    n = orders.size
    log_pos = np.full(n, -np.inf)
    log_neg = np.full(n, -np.inf)
    done = np.zeros(n, dtype=bool)
    active = np.arange(n)
    start, size = 0, _SERIES_FIRST_CHUNK
    while active.size and start < _SERIES_MAX_TERMS:
        i = np.arange(start, min(start + size, _SERIES_MAX_TERMS), dtype=np.float64)
        a = orders[active]
        s0, s1, sign = _series_terms(q, sigma, a, i)
        both = np.concatenate((s0, s1), axis=1)
        sgn = np.concatenate((sign, sign), axis=1)
        pos = np.where(sgn > 0, both, -np.inf)
        neg = np.where(sgn < 0, both, -np.inf)
        log_pos[active] = np.logaddexp(log_pos[active], special.logsumexp(pos, axis=1))
        log_neg[active] = np.logaddexp(log_neg[active], special.logsumexp(neg, axis=1))
        total = log_pos[active]
        if i.size >= 2:
            last0, prev0 = s0[:, -1], s0[:, -2]
            last1, prev1 = s1[:, -1], s1[:, -2]
            decreasing = (((last0 < prev0) | np.isneginf(last0))
                          & ((last1 < prev1) | np.isneginf(last1)))
            small = np.maximum(last0, last1) < total - _SERIES_TOL
            past_positive = i[-1] > a + 1
            settled = decreasing & small & past_positive
            done[active[settled]] = True
            active = active[~settled]
        start += i.size
        size *= 2
    ratio = np.where(done, log_neg - log_pos, -np.inf)
    valid = done & (ratio < -1e-9)
    with np.errstate(invalid="ignore", divide="ignore"):
        log_a = log_pos + np.log1p(-np.exp(np.minimum(ratio, 0.0)))
    return np.where(valid, log_a, np.nan), valid


def _log_a_quadrature(q: float, sigma: float, orders: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """log A_a by the trapezoidal rule, for orders whose series does not settle.

    A_a = integral of N(z; 0, s^2) ((1 - q) + q exp((2z - 1) / (2 s^2)))^a dz
    (Mironov et al. 2019, Sec. 3.3), evaluated in log space on [-12 s, a + 12 s] (beyond
    it the integrand is e^-72 below its peak). The integrand is analytic in a strip of
    half-width pi s^2 around the real axis, so the trapezoidal error decays like
    exp(-2 pi^2 s^2 / h); the rule is run with steps h and h/2 and accepted only where the
    two agree to 1e-10 (relative), taking the larger plus their difference.

    Returns:
        (log A, ok): ``ok[k]`` is False where the two step sizes disagree.
    """
    s2 = sigma * sigma
    h = min(sigma / 8.0, np.pi ** 2 * s2 / 40.0)
    out = np.empty(orders.size)
    ok = np.zeros(orders.size, dtype=bool)
    log_norm = -math.log(sigma * math.sqrt(2.0 * math.pi))
    log1mq, logq = math.log1p(-q), math.log(q)
    for k, a in enumerate(orders):
        lo, hi = -12.0 * sigma, a + 12.0 * sigma
        results = []
        for step in (h, h / 2.0):
            n = int(math.ceil((hi - lo) / step)) + 1
            if n > 500_000:  # leave it to the convexity bound
                break
            z = np.linspace(lo, hi, n)
            dz = z[1] - z[0]
            log_f = (log_norm - z * z / (2.0 * s2)
                     + a * np.logaddexp(log1mq, logq + (2.0 * z - 1.0) / (2.0 * s2)))
            log_f[0] -= math.log(2.0)
            log_f[-1] -= math.log(2.0)
            results.append(float(special.logsumexp(log_f)) + math.log(dz))
        if len(results) == 2:
            coarse, fine = results
            out[k] = max(coarse, fine) + abs(coarse - fine)  # err upwards
            ok[k] = abs(coarse - fine) <= 1e-10 * max(1.0, abs(fine))
    return out, ok


def _log_a_frac(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """log A_a for fractional orders; the series, else quadrature, else an upper bound.

    The series (:func:`_log_a_frac_series`) handles small sampling rates; near q = 1/2 its
    tail decays only polynomially and :func:`_log_a_quadrature` takes over. Should both
    fail, log A_a is bounded by convexity: it is the cumulant generating function of the
    privacy loss, so between consecutive integers n < a < n + 1 it lies below the chord
    log A_a <= (n + 1 - a) log A_n + (a - n) log A_(n+1), with log A_1 = 0. Every fallback
    can only make epsilon larger.
    """
    log_a, ok = _log_a_frac_series(q, sigma, orders)
    if ok.all():
        return log_a
    log_a = log_a.copy()
    quad, quad_ok = _log_a_quadrature(q, sigma, orders[~ok])
    idx = np.flatnonzero(~ok)
    log_a[idx[quad_ok]] = quad[quad_ok]
    ok[idx[quad_ok]] = True
    if ok.all():
        return log_a
    bad = orders[~ok]
    lo = np.floor(bad)
    ends = np.unique(np.concatenate((lo, lo + 1)))
    ends_log_a = dict(zip(ends.tolist(), _log_a_int(q, sigma, ends).tolist()))
    ends_log_a[1.0] = 0.0
    chord = np.array([(1 - t) * ends_log_a[float(n)] + t * ends_log_a[float(n) + 1]
                      for n, t in zip(lo, bad - lo)])
    log_a[~ok] = chord
    return log_a


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(noise_multiplier: float, sampling_rate: float,
                  orders: tuple[float, ...]) -> np.ndarray:
    q, sigma = sampling_rate, noise_multiplier
    alphas = np.asarray(orders, dtype=np.float64)
    if q == 0.0:
        rdp = np.zeros_like(alphas)
    elif sigma == 0.0:
        rdp = np.full_like(alphas, np.inf)
    elif q == 1.0:
        rdp = alphas / (2.0 * sigma * sigma)  # plain Gaussian mechanism
    else:
        is_int = alphas == np.round(alphas)
        log_a = np.empty_like(alphas)
        log_a[is_int] = _log_a_int(q, sigma, alphas[is_int])
        log_a[~is_int] = _log_a_frac(q, sigma, alphas[~is_int])
        rdp = np.maximum(log_a / (alphas - 1.0), 0.0)  # RDP >= 0; clip rounding noise
    rdp.setflags(write=False)
    return rdp


def _check_orders(orders: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(a) for a in orders)
    if not out or any(not (a > 1.0 and math.isfinite(a)) for a in out):
        raise PrivacyError(f"orders must be finite numbers > 1. Found {orders!r}.")
    return out


def compute_rdp(events: Sequence[SampledGaussian],
                orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP curve of a composition of sampled Gaussian mechanisms.

    Args:
        events: the mechanisms; RDP adds up over them (Mironov 2017, Prop. 1).
        orders: Renyi orders, each > 1.

    Returns:
        The RDP at each order (may contain ``inf``).
    """
    alphas = _check_orders(orders)
    total = np.zeros(len(alphas))
    for ev in merge_events(events):
        total = total + ev.steps * _rdp_one_step(ev.noise_multiplier, ev.sampling_rate,
                                                 alphas)
    return total


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float] | np.ndarray,
                   delta: float) -> tuple[float, float]:
    """Convert an RDP curve to ``(epsilon, optimal_order)`` at ``delta``.

    Uses epsilon = min_a [rdp(a) + log(1 - 1/a) - (log(delta) + log(a)) / (a - 1)]
    (Balle et al. 2020, arXiv:1905.09982, Thm. 21; Canonne, Kamath, Steinke 2020,
    arXiv:2004.00010, Prop. 12), and epsilon = 0 when the KL divergence, which is at most
    rdp(a) for any a > 1, already forces total variation below delta
    (delta >= sqrt(1 - exp(-KL)), Bretagnolle-Huber).
    """
    alphas = np.asarray(_check_orders(orders), dtype=np.float64)
    d = _check_delta(delta)
    r = np.asarray(rdp, dtype=np.float64)
    if r.shape != alphas.shape:
        raise PrivacyError(
            f"rdp must have one value per order ({alphas.size}). Found {r.size}.")
    finite = np.isfinite(r)
    if not finite.any():
        return math.inf, math.nan
    if np.any(d * d + np.expm1(-r[finite]) > 0):
        return 0.0, float(alphas[finite][np.argmin(r[finite])])
    with np.errstate(invalid="ignore"):
        eps = r + np.log1p(-1.0 / alphas) - (math.log(d) + np.log(alphas)) / (alphas - 1.0)
    eps = np.where(finite, eps, np.inf)
    k = int(np.argmin(eps))
    return max(0.0, float(eps[k])), float(alphas[k])


def compute_epsilon(events: Sequence[SampledGaussian], delta: float,
                    accountant: AccountantName = "rdp", *,
                    orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """Epsilon of the composition of ``events`` at ``delta``.

    Args:
        events: the Poisson-subsampled Gaussian mechanisms the unit took part in.
        delta: target delta, in (0, 1).
        accountant: ``"rdp"`` or ``"prv"`` (see the module docstring).
        orders: RDP orders (``rdp`` only).

    Returns:
        epsilon >= 0; 0.0 for no (or only trivial) events; ``math.inf`` when some event
        with ``steps > 0`` and ``sampling_rate > 0`` has no noise, or so little that the
        bound overflows (a true, if useless, bound).

    Raises:
        PrivacyError: bad delta, accountant or event.
    """
    d = _check_delta(delta)
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant must be one of 'rdp', 'prv'. Found {accountant!r}.")
    merged = merge_events(events)
    if not merged:
        return 0.0
    if any(ev.noise_multiplier == 0.0 for ev in merged):
        return math.inf
    alphas = _check_orders(orders)
    try:  # a vanishing multiplier (below ~1e-154) overflows the bound: no privacy at all
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            if accountant == "prv":
                return epsilon_prv(tuple(merged), d)
            eps, _ = rdp_to_epsilon(alphas, compute_rdp(merged, alphas), d)
    except (OverflowError, ZeroDivisionError, FloatingPointError):
        return math.inf
    return eps if not math.isnan(eps) else math.inf
