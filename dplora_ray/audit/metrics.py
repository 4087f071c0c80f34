"""Leakage metrics: exposure of secrets, membership-inference ROC.

Conventions: an attack *score* is larger for "more likely a member"; a secret's score is
the model's log-probability of the secret's label after the secret's prompt.

Exposure (Carlini et al. 2019, "The Secret Sharer", Def. 3): for a secret s among the
candidate space R, ``exposure = log2 |R| - log2 rank(s)``, where rank 1 is the candidate
the model scores highest. The space (10^digits strings) is too large to enumerate, so
``M`` candidates are sampled uniformly from it and s is ranked among those ``M + 1``
strings (:func:`sampled_exposure`): ``log2(M + 1) - log2(1 + #better + #ties / 2)``.
This estimates the full-space exposure up to its ceiling ``log2(M + 1)`` bits; a model
that did not memorise s puts it at a uniformly random rank, whose expected exposure is
:func:`chance_exposure` (about ``1 / ln 2 = 1.44`` bits). Beyond the ceiling, the paper's
Sec. 4.3 approximation fits a skew-normal to the candidates' scores and reads the
secret's tail probability from it (:func:`extrapolated_exposure`); we fit it to the
log-odds of the label, which are unbounded.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "chance_exposure",
    "extrapolated_exposure",
    "log_odds",
    "roc_auc",
    "sampled_exposure",
    "tpr_at_fpr",
]


def sampled_exposure(secret_score: float, candidate_scores: np.ndarray) -> float:
    """Exposure of a secret ranked among sampled candidates (ties count half)."""
    c = np.asarray(candidate_scores, dtype=np.float64)
    better = float(np.sum(c > secret_score))
    ties = float(np.sum(c == secret_score))
    rank = 1.0 + better + 0.5 * ties
    return math.log2(len(c) + 1) - math.log2(rank)


def chance_exposure(num_candidates: int) -> float:
    """Expected :func:`sampled_exposure` when the secret's rank is uniform on 1..M+1."""
    n = num_candidates + 1
    return math.log2(n) - float(np.mean(np.log2(np.arange(1, n + 1))))


def log_odds(log_prob: np.ndarray) -> np.ndarray:
    """``log p - log(1 - p)`` from ``log p`` (stable near p = 0 and p = 1)."""
    lp = np.minimum(np.asarray(log_prob, dtype=np.float64), -1e-12)
    return lp - np.log(-np.expm1(lp))


def extrapolated_exposure(secret_score: float, candidate_scores: np.ndarray,
                          space_size: float) -> float:
    """Exposure from a skew-normal fit to the candidates' scores (Carlini et al. 2019,
    Sec. 4.3): ``-log2 P(score >= secret_score)`` under the fit, capped at
    ``log2(space_size)`` (and at 0 from below)."""
    from scipy import stats

    c = np.asarray(candidate_scores, dtype=np.float64)
    cap = math.log2(space_size)
    if len(c) < 3 or float(np.std(c)) == 0.0:
        return cap if secret_score > float(np.max(c, initial=-np.inf)) else 0.0
    shape, loc, scale = stats.skewnorm.fit(c)
    log_tail = float(stats.skewnorm.logsf(secret_score, shape, loc, scale))
    return float(min(cap, max(0.0, -log_tail / math.log(2))))


def roc_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count half)."""
    from scipy.stats import rankdata

    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    if len(m) == 0 or len(n) == 0:
        return math.nan
    ranks = rankdata(np.concatenate([m, n]))
    u = float(ranks[: len(m)].sum()) - len(m) * (len(m) + 1) / 2.0
    return u / (len(m) * len(n))


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray,
               max_fpr: float = 0.01) -> float:
    """The largest true-positive rate of a threshold test ``score > t`` whose
    false-positive rate is at most ``max_fpr`` (Carlini et al. 2022, "Membership
    Inference Attacks From First Principles": the low-FPR regime is what matters)."""
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.sort(np.asarray(nonmember_scores, dtype=np.float64))[::-1]
    if len(m) == 0 or len(n) == 0:
        return math.nan
    allowed = int(math.floor(max_fpr * len(n) + 1e-9))  # false positives we may take
    if allowed >= len(n):
        return 1.0
    return float(np.mean(m > n[allowed]))
