"""Accountant: agreement with dp_accounting and Opacus, pinned values, edge cases."""

from __future__ import annotations

import itertools
import logging
import math
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
from scipy import integrate

from dplora_ray.errors import PrivacyError
from dplora_ray.privacy import (
    DEFAULT_ORDERS,
    SampledGaussian,
    compute_epsilon,
    effective_noise_scale,
)
from dplora_ray.privacy.accountant import compute_rdp, merge_events, rdp_to_epsilon

try:  # only the comparisons with dp_accounting need it; every other test runs without
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant, rdp_privacy_accountant
except ImportError:  # pragma: no cover - dp-accounting is a dev dependency
    dp_accounting = None

needs_dp_accounting = pytest.mark.skipif(dp_accounting is None,
                                         reason="dp-accounting is not installed")

NOISES = (0.5, 1.0, 3.0, 20.0)
RATES = (0.001, 0.01, 0.1, 1.0)
STEPS = (1, 10, 100, 1_000, 10_000, 100_000)
DELTAS = (1e-5, 1e-6)


@pytest.fixture(scope="module")
def dp_accounting_rdp() -> dict[tuple[float, float], np.ndarray]:
    """dp_accounting's one-step RDP curve per (noise, rate), on DEFAULT_ORDERS.

    RdpAccountant composes a SelfComposedDpEvent by multiplying the one-step RDP by the
    count, so the curve is computed once per pair and scaled by the steps below
    (test_self_composed_matches_scaled_curve checks this shortcut on the public API).
    """
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    curves = {}
    for z, q in itertools.product(NOISES, RATES):
        acc = RdpAccountant(orders=DEFAULT_ORDERS)
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
        curves[(z, q)] = np.array(acc._rdp)  # read only
    return curves


def _reference_epsilon(curves, z, q, steps, delta) -> float:
    eps, _ = rdp_privacy_accountant.compute_epsilon(DEFAULT_ORDERS, steps * curves[(z, q)],
                                                    delta)
    return float(eps)


@needs_dp_accounting
def test_agrees_with_dp_accounting_rdp_within_one_percent(dp_accounting_rdp):
    # Prepare
    worst, checked = 0.0, 0
    # Execute
    for z, q, steps, delta in itertools.product(NOISES, RATES, STEPS, DELTAS):
        ref = _reference_epsilon(dp_accounting_rdp, z, q, steps, delta)
        ours = compute_epsilon([SampledGaussian(z, q, steps)], delta)
        if ref > 10:
            continue
        checked += 1
        rel = abs(ours - ref) / ref if ref > 0 else abs(ours)
        worst = max(worst, rel)
        # Assert
        assert rel <= 0.01, (z, q, steps, delta, ours, ref)
        # dp_accounting sums the fractional-order series by absolute values (an upper
        # bound), so ours is never looser
        assert ours <= ref * (1 + 1e-9) + 1e-12, (z, q, steps, delta, ours, ref)
    assert checked >= 60
    print(f"max relative difference vs dp_accounting over {checked} points: {worst:.2e}")


@needs_dp_accounting
def test_self_composed_matches_scaled_curve(dp_accounting_rdp):
    for z, q, steps in [(1.0, 0.01, 10_000), (3.0, 0.1, 100)]:
        acc = RdpAccountant(orders=DEFAULT_ORDERS)
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps))
        direct = acc.get_epsilon(1e-5)
        assert direct == pytest.approx(_reference_epsilon(dp_accounting_rdp, z, q, steps,
                                                          1e-5), rel=1e-12)
        assert compute_epsilon([SampledGaussian(z, q, steps)], 1e-5) == pytest.approx(
            direct, rel=0.01)


def test_rdp_matches_opacus_where_opacus_is_fast():
    from opacus.accountants.analysis.rdp import compute_rdp as opacus_rdp

    orders = [a for a in DEFAULT_ORDERS if a <= 256]  # Opacus gives nan from ~2048 on
    for z, q in [(1.1, 0.01), (20.0, 0.001), (3.0, 0.05)]:
        ours = compute_rdp([SampledGaussian(z, q, 1)], orders)
        ref = opacus_rdp(q=q, noise_multiplier=z, steps=1, orders=orders)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-11)


def _log_a_by_quadrature(q: float, sigma: float, alpha: float) -> float:
    """log E_{z~N(0, s^2)}[((1-q) + q exp((2z - 1) / (2 s^2)))^alpha], numerically."""
    def log_f(z: float) -> float:
        mix = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
        return -z * z / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi)) + alpha * mix

    lo, hi = -40 * sigma, 40 * sigma + 2 * alpha + 10
    peak = max(log_f(z) for z in np.linspace(lo, hi, 2001))
    value, _ = integrate.quad(lambda z: math.exp(log_f(z) - peak), lo, hi, epsabs=0,
                              epsrel=1e-12, limit=1000, points=[0.5, alpha])
    return peak + math.log(value)


FRACTIONAL_CASES = [(0.5, 0.1, 1.03), (1.0, 0.5, 1.34), (3.0, 0.3, 1.64), (0.7, 0.2, 5.5),
                    (2.0, 0.9, 4.7), (20.0, 0.5, 2.5)]


@pytest.mark.parametrize("z,q,alpha", FRACTIONAL_CASES)
def test_fractional_orders_match_direct_integration(z, q, alpha):
    """Includes sampling rates where the series (and dp_accounting's) does not settle."""
    exact = _log_a_by_quadrature(q, z, alpha) / (alpha - 1)
    ours = float(compute_rdp([SampledGaussian(z, q, 1)], [alpha])[0])
    assert ours == pytest.approx(exact, rel=1e-7)


def test_convexity_fallback_is_an_upper_bound(monkeypatch):
    # Prepare: pretend neither the series nor the quadrature settles
    from dplora_ray.privacy import accountant

    def never(q, sigma, orders):
        return np.full(orders.size, np.nan), np.zeros(orders.size, dtype=bool)

    monkeypatch.setattr(accountant, "_log_a_frac_series", never)
    monkeypatch.setattr(accountant, "_log_a_quadrature", never)
    accountant._rdp_one_step.cache_clear()
    try:
        for z, q, alpha in FRACTIONAL_CASES:
            # Execute
            bound = float(compute_rdp([SampledGaussian(z, q, 1)], [alpha])[0])
            # Assert
            exact = _log_a_by_quadrature(q, z, alpha) / (alpha - 1)
            assert exact * (1 - 1e-9) <= bound < math.inf
    finally:
        accountant._rdp_one_step.cache_clear()


def test_opacus_reference_noise_multiplier_meets_its_target():
    # opacus.accountants.utils.get_noise_multiplier(target_epsilon=1, target_delta=1e-5,
    # sample_rate=0.01, steps=1000, accountant="rdp") == 1.5234375
    eps = compute_epsilon([SampledGaussian(1.5234375, 0.01, 1000)], 1e-5)
    assert 0.97 < eps <= 1.0


def test_large_orders_make_small_epsilons_tight():
    from opacus.accountants.rdp import RDPAccountant

    ours = compute_epsilon([SampledGaussian(20.0, 0.001, 1)], 1e-5)
    with_opacus_orders = compute_epsilon([SampledGaussian(20.0, 0.001, 1)], 1e-5,
                                         orders=RDPAccountant.DEFAULT_ALPHAS)
    assert 0 < ours < 0.005
    assert with_opacus_orders == pytest.approx(0.10, abs=0.01)


def test_default_orders_grid():
    assert DEFAULT_ORDERS == tuple(sorted(set(DEFAULT_ORDERS)))
    assert DEFAULT_ORDERS[0] == 1.01
    assert {1.5, 1.99, 2.5, 10.0, 19.75, 20.0, 63.0, 1024.0, 4096.0} <= set(DEFAULT_ORDERS)
    assert DEFAULT_ORDERS[-1] >= 4096


def test_prv_is_finite_and_close_to_rdp():
    event = [SampledGaussian(1.1, 0.01, 1000)]
    rdp = compute_epsilon(event, 1e-5, "rdp")
    prv = compute_epsilon(event, 1e-5, "prv")
    assert math.isfinite(prv)
    assert 0.75 * rdp <= prv <= 1.01 * rdp


def test_paper_scale_and_its_epsilon():
    assert effective_noise_scale("paper", True) == pytest.approx(1 / (2 * math.sqrt(2)))
    assert effective_noise_scale("paper", False) == 0.5
    for mode in ("dpsgd", "client"):
        assert effective_noise_scale(mode, True) == effective_noise_scale(mode, False) == 1.0
    # local DP: replacement neighbours, two clipped updates differ by up to 2C
    assert effective_noise_scale("local", True) == effective_noise_scale("local", False) == 0.5
    with pytest.raises(PrivacyError, match="'none'"):
        effective_noise_scale("none", True)
    sigma = 4.0
    paper = compute_epsilon(
        [SampledGaussian(sigma * effective_noise_scale("paper", True), 0.01, 500)], 1e-5)
    same = compute_epsilon([SampledGaussian(sigma / (2 * math.sqrt(2)), 0.01, 500)], 1e-5)
    dpsgd = compute_epsilon([SampledGaussian(sigma, 0.01, 500)], 1e-5)
    assert paper == same
    assert paper > dpsgd


def test_trivial_and_degenerate_events():
    assert compute_epsilon([], 1e-5) == 0.0
    assert compute_epsilon([], 1e-5, "prv") == 0.0
    assert compute_epsilon([SampledGaussian(1.0, 0.0, 100), SampledGaussian(0.0, 0.5, 0)],
                           1e-5) == 0.0
    assert compute_epsilon([SampledGaussian(0.0, 0.1, 1)], 1e-5) == math.inf
    assert compute_epsilon([SampledGaussian(0.0, 0.1, 1)], 1e-5, "prv") == math.inf
    base = [SampledGaussian(1.0, 0.01, 100)]
    assert compute_epsilon(base + [SampledGaussian(1.0, 0.0, 100)], 1e-5) == \
        compute_epsilon(base, 1e-5)


def test_composition_is_additive_and_order_free():
    split = [SampledGaussian(1.0, 0.01, 300), SampledGaussian(2.0, 0.1, 5),
             SampledGaussian(1.0, 0.01, 700)]
    whole = [SampledGaussian(2.0, 0.1, 5), SampledGaussian(1.0, 0.01, 1000)]
    assert merge_events(split) == merge_events(whole)
    assert compute_epsilon(split, 1e-5) == compute_epsilon(whole, 1e-5)
    assert compute_epsilon(whole, 1e-5) > compute_epsilon(whole[1:], 1e-5)


def test_epsilon_decreases_with_noise_and_delta():
    eps = [compute_epsilon([SampledGaussian(z, 0.05, 200)], 1e-5) for z in (0.6, 0.9, 1.5, 4)]
    assert eps == sorted(eps, reverse=True)
    assert compute_epsilon([SampledGaussian(1, 0.05, 200)], 1e-6) > \
        compute_epsilon([SampledGaussian(1, 0.05, 200)], 1e-5)


def test_rdp_to_epsilon_formula_by_hand():
    # one order, one value: eps = r + log(1 - 1/a) - (log(delta) + log(a)) / (a - 1)
    a, r, delta = 3.0, 0.5, 1e-5
    expected = r + math.log(1 - 1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
    eps, order = rdp_to_epsilon([a], [r], delta)
    assert eps == pytest.approx(expected)
    assert order == a
    assert rdp_to_epsilon([2.0], [math.inf], delta)[0] == math.inf


@pytest.mark.parametrize("kwargs,message", [
    ({"noise_multiplier": 1.0, "sampling_rate": 1.3, "steps": 1},
     r"sampling_rate must be in \[0, 1\]. Found 1.3."),
    ({"noise_multiplier": -1.0, "sampling_rate": 0.1, "steps": 1},
     r"noise_multiplier must be a finite number >= 0. Found -1.0."),
    ({"noise_multiplier": math.nan, "sampling_rate": 0.1, "steps": 1}, r"Found nan"),
    ({"noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": -2},
     r"steps must be an integer >= 0. Found -2."),
    ({"noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 1.5}, r"Found 1.5"),
])
def test_sampled_gaussian_validation(kwargs, message):
    with pytest.raises(PrivacyError, match=message):
        SampledGaussian(**kwargs)


def test_sampled_gaussian_is_frozen_and_picklable():
    ev = SampledGaussian(1, 0.5, 3)
    assert isinstance(ev.noise_multiplier, float)
    with pytest.raises(AttributeError):
        ev.steps = 4  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(ev)) == ev


def test_bad_delta_and_accountant():
    ev = [SampledGaussian(1.0, 0.01, 10)]
    for delta in (0.0, 1.0, -1e-5, math.nan):
        with pytest.raises(PrivacyError, match="delta must be in"):
            compute_epsilon(ev, delta)
    with pytest.raises(PrivacyError, match="Found 'moments'"):
        compute_epsilon(ev, 1e-5, "moments")  # type: ignore[arg-type]


def test_prv_at_a_huge_step_count_is_a_one_line_privacy_error():
    """T = 1e7 at q = 0.01 used to ask Opacus for a grid no machine holds (the process
    was killed); the size is checked first."""
    with pytest.raises(PrivacyError, match=r"would need a grid of .* use accountant='rdp'"):
        compute_epsilon([SampledGaussian(1.0, 0.01, 10**7)], 1e-5, "prv")
    assert compute_epsilon([SampledGaussian(1.0, 0.01, 10**7)], 1e-5, "rdp") > 0


def test_only_the_dp_accounting_comparisons_skip_without_it():
    # Execute: this module again, in a process where dp_accounting cannot be imported
    code = ("import sys; sys.modules['dp_accounting'] = None; import pytest; "
            "raise SystemExit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', "
            f"{__file__!r}, '-k', 'not without_it and not huge_step']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)

    # Assert: everything else ran and passed
    tail = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert re.search(r"\d+ passed, 2 skipped", tail), tail
    assert int(tail.split()[0]) >= 20
