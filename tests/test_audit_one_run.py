"""One-run audit (issue 17; Steinke, Nasr and Jagielski 2023): the bound by hand, its
validity on an exactly epsilon-DP mechanism, and the white-box one-run audit of each
mode's real code path (correct code passes; noise switched off fails).

The white-box audits run at confidence ``1 - 1e-6`` with ``delta = 1e-9``: the
approximate-DP term of the theorem, ``2 m delta max_i (f(v - i) - f(v)) / i``, must stay
well below ``beta`` for any epsilon to be rejected, and at ``m = 400``, ``delta = 1e-9``
it is at most 8e-7 times a fraction (measured: it never decides the outcome here).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dplora_ray.audit.one_run import (
    count_correct,
    one_run_bound,
    one_run_bound_from_scores,
    one_run_epsilon_lower,
    whitebox_one_run,
)
from dplora_ray.audit.whitebox import sigma_for_epsilon

CONF = 1 - 1e-6
DELTA = 1e-9


def test_all_guesses_right_by_hand() -> None:
    # P[Binomial(r, p) >= r] = p^r = beta  =>  eps = log(p / (1 - p)), p = beta^(1/r)
    for r, beta in [(20, 0.05), (100, 1e-3)]:
        p = beta ** (1 / r)
        assert one_run_epsilon_lower(r, r, 1000, beta) == pytest.approx(
            math.log(p / (1 - p)), rel=1e-6)
    # half right is what eps = 0 predicts: nothing is rejected
    assert one_run_epsilon_lower(50, 100, 1000, 0.05) == 0.0
    assert one_run_epsilon_lower(0, 0, 1000, 0.05) == 0.0
    # delta > 0 only weakens the bound
    assert (one_run_epsilon_lower(90, 100, 1000, 0.05, 1e-5)
            <= one_run_epsilon_lower(90, 100, 1000, 0.05))
    assert one_run_bound(1.0, 90, 100, 1000, 1e-5) >= one_run_bound(1.0, 90, 100, 1000, 0.0)


def test_guesses_take_the_top_and_bottom_scores() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5])
    included = np.array([True, False, False, True, True])
    # top 2: 0.9 (in, right), 0.8 (out, wrong); bottom 2: 0.1 (out, right), 0.2 (in, wrong)
    assert count_correct(scores, included, 2) == 2
    assert count_correct(scores, included, 1) == 2


@pytest.mark.parametrize("true_eps", [0.5, 2.0])
def test_bound_rarely_exceeds_the_true_epsilon(true_eps: float) -> None:
    """Randomized response on each canary's coin is exactly true_eps-DP per canary; the
    95% bound may exceed true_eps in at most 5% of audits (it is conservative: never)."""
    rng = np.random.default_rng(11)
    keep = math.exp(true_eps) / (1 + math.exp(true_eps))
    over, worst = 0, 0.0
    for _ in range(100):
        included = rng.random(500) < 0.5
        reported = np.where(rng.random(500) < keep, included, ~included)
        scores = reported + rng.uniform(0, 0.5, 500)  # noise that carries no information
        b = one_run_bound_from_scores(scores, included, 0.95, 0.0)
        over += b["epsilon"] > true_eps
        worst = max(worst, b["epsilon"])
    assert over <= 5
    assert worst > 0.3 * true_eps  # and it is not vacuous


@pytest.mark.parametrize("mode", ["dpsgd", "paper", "client", "local"])
def test_correct_mechanisms_pass_the_one_run_audit(mode: str) -> None:
    sigma = sigma_for_epsilon(mode, 4.0, delta=DELTA)
    r = whitebox_one_run(mode, sigma, canaries=400, delta=DELTA, confidence=CONF,
                         noise_seed=0)
    assert r["passed"] and r["epsilon_accountant"] == pytest.approx(4.0)
    assert 0.0 <= r["epsilon_lower_bound"] < r["epsilon_accountant"]
    assert r["included"] == pytest.approx(200, abs=45)  # fair coins
    json.dumps(r)


@pytest.mark.parametrize("mode", ["dpsgd", "local"])
def test_noise_switched_off_fails_the_one_run_audit(mode: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from test_audit_whitebox import inject  # the same injections as the white-box tests

    sigma = sigma_for_epsilon(mode, 1.0, delta=DELTA)
    inject(monkeypatch, "noise_off", mode)
    r = whitebox_one_run(mode, sigma, canaries=400, delta=DELTA, confidence=CONF,
                         noise_seed=0)
    assert not r["passed"]
    # every coin is read off the release; only the fixed guess count can be off (k = 200
    # "in" guesses when slightly fewer or more than 200 coins came up heads)
    assert r["guesses"] == 400 and r["correct"] == 400 - abs(r["included"] - 200)
    assert r["epsilon_lower_bound"] > 2 * r["epsilon_accountant"]
