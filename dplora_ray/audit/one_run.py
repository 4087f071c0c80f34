"""One-run audit (Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1)
Training Run").

``m`` canaries, each included by an independent fair coin ``S_j``; after the ONE run the
auditor scores every canary, guesses "in" for the ``k`` highest scores and "out" for the
``k`` lowest, and abstains on the rest (``r = 2k`` guesses). Their theorem: if the run is
epsilon-DP for each canary, the number ``W`` of correct guesses satisfies, for every
``v``,

    P[W >= v] <= f(v) := P[Binomial(r, e^eps / (1 + e^eps)) >= v]

(no independence between canaries is assumed: the coins are what is random), and for
(epsilon, delta)-DP (their approximate-DP theorem)

    P[W >= v] <= f(v) + 2 m delta max_{1 <= i <= m} (f(v - i) - f(v)) / i.

An epsilon whose right-hand side at the observed ``v`` is below ``beta`` is rejected at
confidence ``1 - beta``; :func:`one_run_epsilon_lower` returns the largest rejected
epsilon (the right-hand side grows with epsilon). The guess sizes ``k`` are a fixed grid
(:data:`GUESS_FRACTIONS`), Bonferroni-corrected.

:func:`whitebox_one_run` runs this on the Dirac harness (:mod:`dplora_ray.audit.dirac`):
ONE release of the real code path holding the included canaries. ``dpsgd``: one client,
one DP-SGD step, every included canary an example with its own coordinate; ``client``:
one DP-FedAvg round, every included canary a client with its own coordinate; ``paper``
and ``local``: one round of ``m`` clients, client j holding the canary (world 1) or not
(world 0) of the mode's Dirac game, each upload scored on its own.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

__all__ = [
    "GUESS_FRACTIONS",
    "count_correct",
    "one_run_bound",
    "one_run_epsilon_lower",
    "whitebox_one_run",
]

#: k / m for the guess sizes tried (k "in" guesses and k "out" guesses each)
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def _tail(v: int, r: int, p: float) -> float:
    """P[Binomial(r, p) >= v]."""
    from scipy.stats import binom

    if v <= 0:
        return 1.0
    if v > r:
        return 0.0
    return float(binom.sf(v - 1, r, p))


def one_run_bound(epsilon: float, correct: int, guesses: int, canaries: int,
                  delta: float) -> float:
    """The theorem's bound on ``P[W >= correct]`` for an (epsilon, delta)-DP run."""
    from scipy.stats import binom

    p = 1.0 / (1.0 + math.exp(-epsilon))
    f = _tail(correct, guesses, p)
    if delta <= 0 or correct <= 0:
        return f
    i = np.arange(1, min(canaries, correct) + 1)
    # f(v - i) = P[Binomial >= v - i] (1 once v - i <= 0)
    f_i = np.where(correct - i <= 0, 1.0, binom.sf(correct - i - 1, guesses, p))
    return f + 2.0 * canaries * delta * float(np.max((f_i - f) / i))


def one_run_epsilon_lower(correct: int, guesses: int, canaries: int, beta: float,
                          delta: float = 0.0) -> float:
    """The largest epsilon rejected at level ``beta`` by ``correct`` right guesses out of
    ``guesses`` (0 when none is)."""
    if guesses <= 0 or one_run_bound(0.0, correct, guesses, canaries, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_bound(hi, correct, guesses, canaries, delta) < beta:
        lo, hi = hi, 2.0 * hi
        if hi > 200:
            return math.inf
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if one_run_bound(mid, correct, guesses, canaries, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def count_correct(scores: np.ndarray, included: np.ndarray, k: int) -> int:
    """Correct guesses when the ``k`` highest scores are guessed in and the ``k`` lowest
    out (ties broken by position, which the coins do not depend on)."""
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
    inc = np.asarray(included, dtype=bool)
    return int(inc[order[len(order) - k:]].sum() + (~inc[order[:k]]).sum())


def one_run_bound_from_scores(scores: np.ndarray, included: np.ndarray,
                              confidence: float, delta: float) -> dict[str, Any]:
    """The best Bonferroni-corrected bound over :data:`GUESS_FRACTIONS`."""
    m = len(scores)
    ks = sorted({max(1, int(round(f * m))) for f in GUESS_FRACTIONS if 2 * f * m <= m})
    beta = (1.0 - confidence) / max(1, len(ks))
    best: dict[str, Any] = {"epsilon": 0.0, "k": None}
    for k in ks:
        v = count_correct(scores, included, k)
        eps = one_run_epsilon_lower(v, 2 * k, m, beta, delta)
        eps0 = one_run_epsilon_lower(v, 2 * k, m, beta, 0.0)
        if best["k"] is None or eps > best["epsilon"]:
            best = {"epsilon": eps, "epsilon_delta0": eps0, "k": k, "guesses": 2 * k,
                    "correct": v, "accuracy": v / (2 * k)}
    best.update(canaries=m, included=int(np.sum(included)), confidence=confidence,
                delta=delta, guess_sizes=ks, beta_each=beta)
    return best


def _scores_batched(mode: str, sigma: float, included: np.ndarray, key: Any,
                    clipping_norm: float) -> np.ndarray:
    """``dpsgd`` / ``client``: one release holding every included canary on its own
    coordinate; the score of canary j is coordinate j in units of C (0 out, 1 in)."""
    import torch

    from dplora_ray.audit.dirac import (
        CANARY_SCALE,
        DiracWorker,
        flatten,
        harness_config,
    )
    from dplora_ray.federated.aggregator import Aggregator
    from dplora_ray.federated.client import ClientJob
    from dplora_ray.privacy.mechanisms import get_mechanism

    m, C = len(included), clipping_norm
    mech = get_mechanism(mode)
    idx = np.flatnonzero(included)
    sign = 1.0 if mode == "dpsgd" else -1.0  # plain training moves against the gradient
    examples = np.zeros((m, 2 * m))
    examples[np.arange(m), np.arange(m)] = sign * CANARY_SCALE * C
    cfg = harness_config(mode, C, batch_size=max(m, 1))
    worker = DiracWorker(cfg, examples)
    zero = {k: torch.zeros_like(p) for k, p in worker.trainable_params.items()}

    def upload(client: int, rows: np.ndarray) -> dict[str, Any]:
        job = ClientJob(client_id=client, indices=rows, seed=client, noise_multiplier=sigma,
                        noise_key=mech.noise_key_for(key, "client", 1, client))
        return dict(worker.train_client(zero, job).update or {})

    if mode == "dpsgd":
        release = flatten(upload(0, idx))[:m]
        return -release * cfg.federation.batch_size / C
    uploads = [upload(int(j), np.array([j])) for j in idx]
    agg = Aggregator(zero, mode, server_learning_rate=1.0, clipping_norm=C,
                     noise_key=mech.noise_key_for(key, "server"))
    agg.step(1, sigma, 1.0, [1] * len(uploads), *uploads)
    return flatten(agg.get_state())[:m] / C


def whitebox_one_run(mode: str, noise_multiplier: float, *, canaries: int = 1000,
                     delta: float = 1e-5, confidence: float = 0.95,
                     noise_seed: int | None = None, clipping_norm: float = 1.0,
                     accountant: str = "rdp") -> dict[str, Any]:
    """One-run audit of ONE release of ``mode`` with ``canaries`` Dirac canaries (see
    the module doc); compared with the accountant's epsilon of one step (q = 1)."""
    from dplora_ray.audit.dirac import scenario
    from dplora_ray.audit.whitebox import one_step_epsilon
    from dplora_ray.privacy.streams import NoiseKey

    t0 = time.perf_counter()
    coin_rng = np.random.default_rng(None if noise_seed is None else [noise_seed, 0x1])
    included = coin_rng.random(canaries) < 0.5
    key = NoiseKey.from_seed(noise_seed) if noise_seed is not None else NoiseKey.generate()
    sigma = float(noise_multiplier)
    if mode in ("dpsgd", "client"):
        scores = _scores_batched(mode, sigma, included, key, clipping_norm)
        scale = 1.0
    else:
        sc = scenario(mode, clipping_norm)
        scale = sc.effective_scale
        scores = np.array([sc.score(sc.release(key.derive(j), 1, int(s), sigma))
                           for j, s in enumerate(included)])
    best = one_run_bound_from_scores(scores, included, confidence, delta)
    sigma_eff = sigma * scale
    eps_acc = one_step_epsilon(sigma_eff, delta, accountant) if sigma_eff > 0 else math.inf
    passed = bool(best["epsilon"] <= eps_acc * (1 + 1e-9))
    out = {"mode": mode, "noise_multiplier": sigma, "sigma_eff": sigma_eff,
           "epsilon_accountant": eps_acc, "epsilon_lower_bound": best["epsilon"],
           "ratio_to_accountant": (best["epsilon"] / eps_acc
                                   if math.isfinite(eps_acc) and eps_acc > 0 else None),
           "passed": passed, "noise_reproducible": noise_seed is not None,
           "seconds": time.perf_counter() - t0, **best}
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in out.items()}
