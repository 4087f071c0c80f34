"""Unit tests of the privacy audit (issue 8): no training, no Ray.

Hand-computed values for the statistics; a simulation that the epsilon lower bound
never overshoots the true epsilon of a mechanism more often than its confidence allows;
the planting of canaries on the tiny model's tokenizer.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from dplora_ray.audit import (
    chance_exposure,
    clopper_pearson_lower,
    clopper_pearson_upper,
    comparable_epsilon,
    epsilon_from_rates,
    epsilon_lower_bound,
    extrapolated_exposure,
    roc_auc,
    sampled_exposure,
    tpr_at_fpr,
)
from dplora_ray.audit.bounds import REFERENCE_LEVELS, Population
from dplora_ray.config import AuditConfig, config_from_dict, config_to_dict, load_config
from dplora_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
AUDIT_TINY = ROOT / "configs" / "audit_tiny.yaml"


# --------------------------------------------------------------------------- statistics
def test_clopper_pearson_matches_closed_forms() -> None:
    # k = 0 and k = n have closed forms: 1 - alpha^(1/n) and alpha^(1/n)
    assert float(clopper_pearson_upper(0, 10, 0.05)) == pytest.approx(1 - 0.05 ** 0.1)
    assert float(clopper_pearson_lower(10, 10, 0.05)) == pytest.approx(0.05 ** 0.1)
    assert float(clopper_pearson_lower(0, 10, 0.05)) == 0.0
    assert float(clopper_pearson_upper(10, 10, 0.05)) == 1.0
    # the textbook exact 95% interval of 5/10 is [0.1871, 0.8129]
    assert float(clopper_pearson_lower(5, 10, 0.025)) == pytest.approx(0.187086, abs=1e-6)
    assert float(clopper_pearson_upper(5, 10, 0.025)) == pytest.approx(0.812914, abs=1e-6)


def test_epsilon_from_rates_takes_the_better_form() -> None:
    # log(0.5 / 0.05) = log 10 beats log(0.95 / 0.5)
    assert float(epsilon_from_rates(0.5, 0.05, 0.0)) == pytest.approx(math.log(10))
    assert float(epsilon_from_rates(0.5, 0.05, 0.1)) == pytest.approx(math.log(8))
    # the second form: few misses, many true negatives
    assert float(epsilon_from_rates(0.98, 0.6, 0.0)) == pytest.approx(math.log(0.4 / 0.02))
    assert float(epsilon_from_rates(0.3, 0.4, 0.0)) == 0.0  # nothing certified


def test_roc_auc_and_tpr_at_fpr_by_hand() -> None:
    assert roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert roc_auc(np.array([1.0, 3.0]), np.array([2.0])) == 0.5
    assert roc_auc(np.array([1.0]), np.array([1.0])) == 0.5  # ties count half
    non = np.arange(100.0)  # 1% FPR allows one false positive: threshold above 98
    assert tpr_at_fpr(np.array([99.5, 98.5, 50.0, 98.0]), non, 0.01) == 0.5
    assert tpr_at_fpr(np.array([1.0]), np.arange(50.0), 0.01) == 0.0  # no FP allowed


def test_exposure_by_hand() -> None:
    assert sampled_exposure(10.0, np.array([1.0, 2.0, 3.0])) == pytest.approx(2.0)  # rank 1 of 4
    assert sampled_exposure(0.0, np.array([1.0, 2.0, 3.0])) == pytest.approx(0.0)  # rank 4 of 4
    assert sampled_exposure(1.0, np.array([1.0, 2.0, 0.0])) == pytest.approx(2 - math.log2(2.5))
    assert chance_exposure(1) == pytest.approx(0.5)  # ranks 1, 2: (1 + 0) / 2
    assert chance_exposure(1000) == pytest.approx(1 / math.log(2), abs=0.01)
    # a uniformly ranked secret averages the chance exposure
    rng = np.random.default_rng(0)
    sims = [sampled_exposure(rng.normal(), rng.normal(size=99)) for _ in range(3000)]
    assert np.mean(sims) == pytest.approx(chance_exposure(99), abs=0.08)


def test_extrapolated_exposure_reads_the_fitted_tail() -> None:
    cand = np.random.default_rng(1).normal(size=2000)
    # 3 sd above a standard normal: -log2(sf(3)) = 10.38 bits; a fitted skew-normal's
    # tail is only roughly that of the sample (the fit's shape is noisy)
    assert extrapolated_exposure(3.0, cand, 1e8) == pytest.approx(10.38, abs=1.5)
    assert extrapolated_exposure(50.0, cand, 1e8) == pytest.approx(math.log2(1e8))  # capped
    assert extrapolated_exposure(-5.0, cand, 1e8) == pytest.approx(0.0, abs=1e-3)


# --------------------------------------------------------------------------- the bound
def _pop(mem: np.ndarray, non: np.ndarray, ref: np.ndarray) -> Population:
    return Population({"a": mem}, {"a": non}, {"a": ref})


def test_lower_bound_of_a_perfect_attack_by_hand() -> None:
    m, n = 200, 1000
    # members score 2, non-members spread over [0, 0.5], the reference over [0, 1]: the
    # threshold at the reference's top 1% separates them exactly
    pop = _pop(np.full(m, 2.0), np.linspace(0, 0.5, n), np.linspace(0, 1, 256))
    b = epsilon_lower_bound({"p": pop}, delta=1e-5, confidence=0.95)
    assert b is not None and b.tests == len(REFERENCE_LEVELS)
    a = 0.05 / len(REFERENCE_LEVELS) / 2
    tpr_lo, fpr_hi = a ** (1 / m), 1 - a ** (1 / n)
    assert (b.true_positives, b.false_positives) == (m, 0)
    assert b.epsilon == pytest.approx(math.log((tpr_lo - 1e-5) / fpr_hi))


@pytest.mark.parametrize("true_eps", [0.0, 1.0])
def test_lower_bound_rarely_overshoots_the_true_epsilon(true_eps: float) -> None:
    """Randomized response is exactly true_eps-DP: member scores are 1 with probability
    e^eps / (1 + e^eps), non-member scores with 1 / (1 + e^eps), plus continuous noise
    that carries no information. The 95% bound may exceed true_eps in <= 5% of runs."""
    rng = np.random.default_rng(7)
    p_in = math.exp(true_eps) / (1 + math.exp(true_eps))
    over, trials = 0, 300
    for _ in range(trials):
        mem = (rng.random(100) < p_in) + rng.normal(0, 0.3, 100)
        non = (rng.random(1000) < 1 - p_in) + rng.normal(0, 0.3, 1000)
        ref = (rng.random(256) < 1 - p_in) + rng.normal(0, 0.3, 256)
        b = epsilon_lower_bound({"p": _pop(mem, non, ref)}, delta=0.0, confidence=0.95)
        over += b is not None and b.epsilon > true_eps
    assert over / trials <= 0.05


def test_lower_bound_needs_every_kind_of_score() -> None:
    empty = _pop(np.ones(3), np.zeros(0), np.zeros(3))
    assert epsilon_lower_bound({"p": empty}, 1e-5, 0.95) is None


def test_comparable_epsilon_per_unit() -> None:
    eps = {"client-0": 0.7, "client-1": 0.9, "client-2": 3.0}
    assert comparable_epsilon("dpsgd", eps, (0, 1), 1e-5)[:2] == (0.9, 1e-5)
    assert comparable_epsilon("local", eps, (1,), 1e-5)[:2] == (0.9, 1e-5)
    e2, d2, why = comparable_epsilon("client", {"all-clients": 1.0}, (0,), 1e-5)
    assert e2 == 2.0 and d2 == pytest.approx((1 + math.e) * 1e-5) and "group privacy" in why
    assert comparable_epsilon("none", {}, (0,), 1e-5)[0] is None


# --------------------------------------------------------------------------- config
def test_audit_config_is_off_by_default_and_round_trips() -> None:
    cfg = load_config(AUDIT_TINY)
    assert load_config(None).audit == AuditConfig() and not AuditConfig().enabled
    assert cfg.audit.enabled
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(("key", "value"), [("audit.repeats", 0), ("audit.candidates", 0),
                                            ("audit.canaries", -1), ("audit.confidence", 1.0),
                                            ("audit.secret_digits", 2)])
def test_bad_audit_keys_are_named(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(AUDIT_TINY, [f"{key}={value}"])


# --------------------------------------------------------------------------- planting
@pytest.fixture(scope="module")
def planted() -> tuple[object, object]:
    from dplora_ray.federated.runner import plan_run

    base = load_config(AUDIT_TINY, ["audit.enabled=false"])
    return plan_run(base), plan_run(load_config(AUDIT_TINY))


def test_canaries_are_planted_where_the_plan_says(planted: tuple[object, object]) -> None:
    base, plan = planted
    a, audit = plan.cfg.audit, plan.audit
    n0 = len(base.data.train)
    assert audit.train_size_before == n0
    # the training split grows by the secret copies and the membership canaries
    assert len(plan.data.train) == n0 + a.canaries * a.repeats + a.mia_canaries
    new = np.arange(n0, len(plan.data.train))
    assert sorted(np.concatenate([p[p >= n0] for p in plan.parts]).tolist()) == new.tolist()
    # each secret copy is in its client, with its label and its token ids
    q = audit.queries
    for k, (c, y) in enumerate(zip(audit.secret_clients, audit.secret_labels)):
        rows = n0 + k * a.repeats + np.arange(a.repeats)
        assert set(rows.tolist()) <= set(plan.parts[c].tolist())
        assert (plan.data.train.labels[rows] == y).all()
        want = q.ids[q.offsets[k]:q.offsets[k + 1]]
        for r in rows:
            got = plan.data.train.ids[plan.data.train.offsets[r]:plan.data.train.offsets[r + 1]]
            assert np.array_equal(got, want)
    # natural non-members are out of every client; members stay where they were
    held = audit.natural_index[~audit.natural_member]
    kept = audit.natural_index[audit.natural_member]
    everyone = np.concatenate(plan.parts)
    assert not np.isin(held, everyone).any() and np.isin(kept, everyone).all()
    assert len(everyone) == len(np.unique(everyone))
    # the secrets go to the most often sampled client
    counts = np.bincount(np.concatenate(plan.cohorts), minlength=plan.cfg.federation.num_clients)
    assert counts[audit.secret_clients].min() == counts.max()
    assert [len(audit.section(s)) for s in ("secrets", "candidates", "canaries", "natural")] \
        == [a.canaries, a.candidates, a.mia_canaries, 2 * a.mia_examples]
    # the privacy plan sees the planted data (same partition as the rest of the run)
    assert plan.parts is not base.parts


def test_planting_is_deterministic_and_leaves_the_inputs_alone(planted) -> None:
    from dplora_ray.audit import insert_canaries

    base, plan = planted
    before = [p.copy() for p in base.parts]
    d1, p1, a1 = insert_canaries(plan.cfg, base.data, base.parts, base.cohorts, base.model_source)
    d2, p2, a2 = insert_canaries(plan.cfg, base.data, base.parts, base.cohorts, base.model_source)
    assert all(np.array_equal(x, y) for x, y in zip(base.parts, before))
    assert all(np.array_equal(x, y) for x, y in zip(p1, p2))
    assert a1.secrets == a2.secrets and np.array_equal(a1.queries.ids, a2.queries.ids)
    assert np.array_equal(d1.train.ids, plan.data.train.ids)


@pytest.mark.parametrize(("override", "key"), [
    ("audit.canary_clients=3", "audit.canary_clients"),  # only 2 clients exist
    ("audit.mia_examples=100", "audit.mia_examples"),  # 100 in, 100 out of 100
    ("model.max_length=20", "model.max_length"),  # the secret would be cut
])
def test_impossible_plantings_fail_before_anything_runs(override: str, key: str,
                                                        tmp_path: Path) -> None:
    from dplora_ray.federated.runner import run_experiment

    cfg = load_config(AUDIT_TINY, [override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_experiment(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()
