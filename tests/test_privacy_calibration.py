"""Calibration: never overshoots, lands within 2% of the target, fails loudly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dplora_ray.errors import PrivacyError
from dplora_ray.privacy import (
    SampledGaussian,
    calibrate_noise_multiplier,
    compute_epsilon,
    effective_noise_scale,
)


def _random_settings(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        target = float(10 ** rng.uniform(-1, 1))  # 0.1 .. 10
        q = float(10 ** rng.uniform(-3, 0))  # 0.001 .. 1
        steps = int(10 ** rng.uniform(0, 4))  # 1 .. 10^4
        delta = float(rng.choice([1e-5, 1e-6]))
        yield target, q, steps, delta


@pytest.mark.parametrize("target,q,steps,delta", list(_random_settings(24, seed=20231229)))
def test_never_overshoots_and_within_two_percent(target, q, steps, delta):
    # Execute
    sigma = calibrate_noise_multiplier(target, q, steps, delta)
    eps = compute_epsilon([SampledGaussian(sigma, q, steps)], delta)
    # Assert
    assert eps <= target
    assert eps >= 0.98 * target, (sigma, eps)


def test_pinned_opacus_setting():
    sigma = calibrate_noise_multiplier(1.0, 0.01, 1000, 1e-5)
    # Opacus' get_noise_multiplier gives 1.5234375 here (its coarser orders cost ~0.3%)
    assert sigma == pytest.approx(1.52, rel=0.02)
    assert compute_epsilon([SampledGaussian(sigma, 0.01, 1000)], 1e-5) <= 1.0


@pytest.mark.parametrize("train_a", [True, False])
def test_effective_scale_calibrates_the_papers_sigma(train_a):
    # Prepare
    scale = effective_noise_scale("paper", train_a)
    # Execute
    paper_sigma = calibrate_noise_multiplier(2.0, 0.02, 500, 1e-5, effective_scale=scale)
    dpsgd_sigma = calibrate_noise_multiplier(2.0, 0.02, 500, 1e-5)
    # Assert: the accounted multiplier is the paper's sigma times the scale
    eps = compute_epsilon([SampledGaussian(paper_sigma * scale, 0.02, 500)], 1e-5)
    assert 0.98 * 2.0 <= eps <= 2.0
    assert paper_sigma * scale == pytest.approx(dpsgd_sigma, rel=0.03)


def test_prv_calibration_never_overshoots():
    sigma = calibrate_noise_multiplier(4.0, 1.0, 10, 1e-5, "prv")
    eps = compute_epsilon([SampledGaussian(sigma, 1.0, 10)], 1e-5, "prv")
    assert 0.98 * 4.0 <= eps <= 4.0
    # PRV is tighter than RDP, so it needs less noise
    assert sigma <= calibrate_noise_multiplier(4.0, 1.0, 10, 1e-5, "rdp")


def test_large_target_gives_small_noise():
    sigma = calibrate_noise_multiplier(50.0, 1.0, 1, 1e-5)
    assert sigma < 1.0
    assert compute_epsilon([SampledGaussian(sigma, 1.0, 1)], 1e-5) <= 50.0


def test_unreachable_target_raises_one_line_naming_target_and_settings():
    with pytest.raises(PrivacyError) as info:
        calibrate_noise_multiplier(1e-3, 1.0, 1_000_000, 1e-5, max_noise=100.0)
    message = str(info.value)
    assert "\n" not in message
    assert "target_epsilon=0.001" in message
    assert "sampling_rate=1.0" in message and "steps=1000000" in message
    assert "noise_multiplier=100.0" in message


@pytest.mark.parametrize("kwargs,name", [
    ({"target_epsilon": 0.0}, "target_epsilon"),
    ({"target_epsilon": math.inf}, "target_epsilon"),
    ({"sampling_rate": 0.0}, "sampling_rate"),
    ({"sampling_rate": 1.5}, "sampling_rate"),
    ({"steps": 0}, "steps"),
    ({"delta": 1.0}, "delta"),
    ({"accountant": "gdp"}, "accountant"),
    ({"effective_scale": 0.0}, "effective_scale"),
    ({"max_noise": -1.0}, "max_noise"),
])
def test_invalid_arguments_name_the_argument_and_value(kwargs, name):
    args = {"target_epsilon": 1.0, "sampling_rate": 0.01, "steps": 100, "delta": 1e-5}
    args.update(kwargs)
    with pytest.raises(PrivacyError, match=rf"^{name} must be .*Found"):
        calibrate_noise_multiplier(**args)
