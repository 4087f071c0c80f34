"""Evaluation metrics of the paper's data sets, as pure functions.

* Classification (FPB, TFNS, PubMedQA): :func:`accuracy`, :func:`f1_per_label`,
  :func:`f1_weighted` (the support-weighted mean of per-label F1 that financial
  sentiment benchmarks report next to accuracy, e.g. FinGPT's FPB / FiQA-SA / TFNS
  tables; scikit-learn's ``f1_score(average="weighted")``). Macro-F1, which PubMedQA
  reports, is :func:`f1_macro` (mean over the labels present in truth or prediction).
* Generation (MedQuAD): :func:`rouge_l` (ROUGE-L F-measure, Lin 2004, "ROUGE: A Package
  for Automatic Evaluation of Summaries", Sec. 3.1) and :func:`perplexity`.
* Multiple choice (PIQA): :func:`multiple_choice_accuracy` over per-choice scores (e.g.
  the log-likelihood of each solution given the goal).

Invariants:
    * Inputs are not modified; every function returns a Python ``float``.
    * Empty inputs raise ``ValueError`` (a metric of nothing is a bug, not a 0).
    * No dependency beyond numpy: ROUGE-L is computed here (tokens: lower-cased runs of
      ASCII letters and digits, no stemming; the defaults of Google's ``rouge_score``
      with ``use_stemmer=False``), so results need no extra package.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

__all__ = [
    "accuracy",
    "f1_macro",
    "f1_per_label",
    "f1_weighted",
    "lcs_length",
    "multiple_choice_accuracy",
    "perplexity",
    "rouge_l",
    "rouge_l_tokens",
    "rouge_tokenize",
]

_TOKEN = re.compile(r"[a-z0-9]+")


def _labels(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(
            f"y_true and y_pred must be 1-d and of one length, got {t.shape} and {p.shape}"
        )
    if len(t) == 0:
        raise ValueError("no examples")
    return t, p


def accuracy(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """The fraction of predictions equal to the truth."""
    t, p = _labels(y_true, y_pred)
    return float(np.mean(t == p))


def f1_per_label(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_labels: int
) -> np.ndarray:
    """F1 of each label ``k`` in ``0..num_labels-1``: ``2 tp / (2 tp + fp + fn)``, 0 for a
    label that is neither true nor predicted anywhere."""
    t, p = _labels(y_true, y_pred)
    out = np.zeros(num_labels, dtype=np.float64)
    for k in range(num_labels):
        tp = int(np.sum((p == k) & (t == k)))
        fp = int(np.sum((p == k) & (t != k)))
        fn = int(np.sum((p != k) & (t == k)))
        if 2 * tp + fp + fn:
            out[k] = 2 * tp / (2 * tp + fp + fn)
    return out


def f1_macro(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_labels: int
) -> float:
    """Unweighted mean of the per-label F1 over the labels present in the truth or the
    predictions (0.0 when there are none)."""
    t, p = _labels(y_true, y_pred)
    present = (np.bincount(t, minlength=num_labels)[:num_labels]
               + np.bincount(p, minlength=num_labels)[:num_labels]) > 0
    scores = f1_per_label(t, p, num_labels)[present]
    return float(scores.mean()) if len(scores) else 0.0


def f1_weighted(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_labels: int
) -> float:
    """Support-weighted F1: ``sum_k n_k F1_k / n`` with ``n_k`` the true examples of label
    ``k``. A label with no true example weighs nothing (scikit-learn's
    ``f1_score(average="weighted")``)."""
    t, _ = _labels(y_true, y_pred)
    support = np.bincount(t, minlength=num_labels)[:num_labels].astype(np.float64)
    return float(np.dot(support, f1_per_label(y_true, y_pred, num_labels)) / len(t))


# ----------------------------------------------------------------------- generation


def rouge_tokenize(text: str) -> list[str]:
    """Lower-case, keep runs of ASCII letters and digits (``rouge_score``'s tokenizer
    without stemming)."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences.

    Bit-parallel (Hyyrö 2004, "Bit-parallel LCS-length computation revisited"): one bit
    per position of ``a``; for every token of ``b``, ``V = (V + U) | (V - U)`` with
    ``U = V & match(token)``; the LCS length is the number of zero bits of ``V``. Same
    result as the O(len(a) len(b)) dynamic programme, in O(len(b)) big-integer steps.
    """
    if not a or not b:
        return 0
    match: dict[str, int] = {}
    for i, tok in enumerate(a):
        match[tok] = match.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & match.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l_tokens(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F-measure of two token sequences: ``P = lcs / len(prediction)``,
    ``R = lcs / len(reference)``, ``F = 2PR / (P + R)`` (0 when nothing is shared)."""
    lcs = lcs_length(prediction, reference)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(prediction), lcs / len(reference)
    return 2 * p * r / (p + r)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure over (prediction, reference) pairs of texts."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("pass sequences of texts, not single strings")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no examples")
    return float(
        np.mean(
            [
                rouge_l_tokens(rouge_tokenize(p), rouge_tokenize(r))
                for p, r in zip(predictions, references)
            ]
        )
    )


def perplexity(
    token_nll: Sequence[float] | np.ndarray, token_counts: Sequence[int] | None = None
) -> float:
    """Corpus perplexity ``exp(sum NLL / tokens)``.

    Args:
        token_nll: negative log-likelihoods (natural log): one per token, or one sum per
            sequence when ``token_counts`` is given.
        token_counts: tokens of each sequence (None: ``token_nll`` is per token).
    """
    nll = np.asarray(token_nll, dtype=np.float64)
    tokens = len(nll) if token_counts is None else int(np.sum(token_counts))
    if token_counts is not None and len(token_counts) != len(nll):
        raise ValueError(f"{len(nll)} sums for {len(token_counts)} counts")
    if tokens <= 0:
        raise ValueError("no tokens")
    return float(math.exp(float(nll.sum()) / tokens))


# ----------------------------------------------------------------- multiple choice


def multiple_choice_accuracy(
    scores: Sequence[Sequence[float]] | np.ndarray, labels: Sequence[int] | np.ndarray
) -> float:
    """Accuracy of picking the highest-scoring choice.

    Args:
        scores: ``(n, choices)``; higher is likelier (e.g. the summed log-probability of
            each solution's tokens, or that divided by its length for ``acc_norm``).
        labels: index of the right choice per example.

    A tie goes to the first of the tied choices (``argmax``), so a model that scores
    every choice alike is right exactly when the answer is choice 0.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if s.ndim != 2 or s.shape[0] != len(y) or s.shape[1] < 2:
        raise ValueError(f"scores must be (n, choices >= 2) for {len(y)} labels, got {s.shape}")
    if len(y) == 0:
        raise ValueError("no examples")
    if np.any((y < 0) | (y >= s.shape[1])):
        raise ValueError(f"labels must be in 0..{s.shape[1] - 1}")
    return float(np.mean(np.argmax(s, axis=1) == y))
