"""Empirical lower bounds on epsilon from a membership test (Clopper-Pearson).

If a mechanism is (epsilon, delta)-DP, every test that says "member" when its score is
at least a threshold has, for the neighbouring pair it distinguishes (Kairouz et al.
2015, Thm. 2.1; used by Jagielski et al. 2020, "Auditing Differentially Private Machine
Learning: How Private is Private SGD?", and Nasr et al. 2021, "Adversary Instantiation"):

    TPR <= e^epsilon FPR + delta      and      1 - FPR <= e^epsilon (1 - TPR) + delta,

so ``epsilon >= max(log((TPR - delta) / FPR), log((1 - FPR - delta) / (1 - TPR)))``.
With TPR and FPR estimated on finite samples we use one-sided Clopper-Pearson bounds,
``TPR_lo`` and ``FPR_hi`` at level ``alpha / 2`` each; both forms are monotone in them, so
the two forms hold together with probability ``>= 1 - alpha`` (union bound).

Choosing the threshold (and the attack, and the population) by looking at the audited
examples would inflate the bound. :func:`epsilon_lower_bound` fixes every threshold
*before* looking at them: for each attack, the scores of a reference set (examples of
the non-member distribution that are neither members nor non-members, e.g. further
never-inserted canaries) place one threshold at each upper-tail fraction in
:data:`REFERENCE_LEVELS`. Each (population, attack, level) is one test; with ``k`` tests
each is bounded at level ``alpha / k`` (Bonferroni), so the largest of the ``k`` bounds
holds with probability ``>= 1 - alpha``. Every member and non-member is used to estimate
the rates (no half is spent on selection).

Caveat: the examples of one run are audited together, so their outcomes are not
independent trials of the mechanism as Clopper-Pearson assumes. Steinke, Nasr and
Jagielski (2023, "Privacy Auditing with One (1) Training Run") show that with random,
independent membership the number of correct guesses of an epsilon-DP mechanism is still
dominated by a binomial, which is what makes one-run audits of this kind meaningful; we
keep the TPR/FPR form here (see docs/audit.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "LowerBound",
    "Population",
    "REFERENCE_LEVELS",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "epsilon_from_rates",
    "epsilon_lower_bound",
]


def clopper_pearson_lower(k: np.ndarray | int, n: int, alpha: float) -> np.ndarray:
    """One-sided ``1 - alpha`` lower bound on a binomial rate from ``k`` of ``n``."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        lo = beta.ppf(alpha, k, n - k + 1)
    return np.where(k <= 0, 0.0, lo)


def clopper_pearson_upper(k: np.ndarray | int, n: int, alpha: float) -> np.ndarray:
    """One-sided ``1 - alpha`` upper bound on a binomial rate from ``k`` of ``n``."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        hi = beta.ppf(1.0 - alpha, k + 1, n - k)
    return np.where(k >= n, 1.0, hi)


def epsilon_from_rates(tpr_lower: np.ndarray | float, fpr_upper: np.ndarray | float,
                       delta: float) -> np.ndarray:
    """``max(0, log((TPR - delta) / FPR), log((1 - FPR - delta) / (1 - TPR)))``, with
    a form counted only where its numerator is positive."""
    t = np.asarray(tpr_lower, dtype=np.float64)
    f = np.asarray(fpr_upper, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where((t - delta > 0) & (f > 0), np.log((t - delta) / f), 0.0)
        b = np.where((1 - f - delta > 0) & (1 - t > 0), np.log((1 - f - delta) / (1 - t)), 0.0)
    return np.maximum(0.0, np.maximum(a, b))


#: upper-tail fractions of the reference scores at which thresholds are placed (both
#: tails: the first form of the bound wants few false positives, the second few misses)
REFERENCE_LEVELS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95, 0.98, 0.99)


@dataclass(frozen=True)
class Population:
    """One membership population: scores per attack (larger means "member")."""

    members: Mapping[str, np.ndarray]
    nonmembers: Mapping[str, np.ndarray]
    reference: Mapping[str, np.ndarray]  # never used to estimate rates


@dataclass(frozen=True)
class LowerBound:
    """The best test and its bound (``epsilon`` is 0 when nothing is certified)."""

    epsilon: float
    confidence: float
    delta: float
    tests: int  # Bonferroni family size
    population: str
    attack: str
    reference_level: float
    threshold: float
    true_positives: int
    members: int
    false_positives: int
    nonmembers: int
    tpr_lower: float
    fpr_upper: float

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def epsilon_lower_bound(populations: Mapping[str, Population], delta: float,
                        confidence: float,
                        levels: tuple[float, ...] = REFERENCE_LEVELS) -> LowerBound | None:
    """The largest Bonferroni-corrected Clopper-Pearson bound over a fixed family of
    threshold tests (see the module doc).

    Args:
        populations: name -> scores; a population needs at least one member,
            non-member and reference score per attack to take part.
        delta: the delta the bound is stated at.
        confidence: ``1 - alpha`` for the whole family.
        levels: upper-tail fractions of the reference scores giving the thresholds.

    Returns:
        The best test's bound and details, or None when no population takes part.
    """
    family = [(name, attack) for name in sorted(populations)
              for attack in sorted(populations[name].members)
              if min(len(populations[name].members[attack]),
                     len(populations[name].nonmembers[attack]),
                     len(populations[name].reference.get(attack, ()))) > 0]
    if not family:
        return None
    k = len(family) * len(levels)
    alpha_each = (1.0 - confidence) / k / 2  # two one-sided bounds per test
    best: LowerBound | None = None
    for name, attack in family:
        pop = populations[name]
        mem = np.asarray(pop.members[attack], dtype=np.float64)
        non = np.asarray(pop.nonmembers[attack], dtype=np.float64)
        ref = np.asarray(pop.reference[attack], dtype=np.float64)
        for level in levels:
            thr = float(np.quantile(ref, 1.0 - level, method="inverted_cdf"))
            tp, fp = int(np.sum(mem >= thr)), int(np.sum(non >= thr))
            tpr_lo = float(clopper_pearson_lower(tp, len(mem), alpha_each))
            fpr_hi = float(clopper_pearson_upper(fp, len(non), alpha_each))
            eps = float(epsilon_from_rates(tpr_lo, fpr_hi, delta))
            if best is None or eps > best.epsilon:
                best = LowerBound(epsilon=eps, confidence=confidence, delta=delta, tests=k,
                                  population=name, attack=attack, reference_level=level,
                                  threshold=thr, true_positives=tp, members=len(mem),
                                  false_positives=fp, nonmembers=len(non),
                                  tpr_lower=tpr_lo, fpr_upper=fpr_hi)
    return best
