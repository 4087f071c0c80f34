"""Run the audit after the last round and write ``audit.json`` (driver side).

Order: score every planted sequence with the final global adapter, and the membership
populations also with the untrained adapter (B = 0, i.e. the frozen base model: the
reference of the calibrated attack); compute exposure, membership ROC metrics and the
epsilon lower bound; compare the bound with the accountant's epsilon *for the unit the
attack tests* (:func:`comparable_epsilon`); write ``audit.json``; on a bound above that
epsilon print a line starting ``PRIVACY AUDIT FAILED`` to stderr and record
``audit_passed: false``.

Attacks (score larger = "member"), on the label the example was trained with:

* ``loss``: ``log p(y | x)`` under the final adapter, i.e. minus the training loss
  (Yeom et al. 2018, "Privacy Risk in Machine Learning", the loss-threshold attack);
* ``calibrated``: ``log p(y | x) - log p_ref(y | x)`` with the base model as reference,
  i.e. the loss minus the reference loss (Watson et al. 2022, "On the Importance of
  Difficulty Calibration in Membership Inference Attacks"; the offline reference of
  Carlini et al. 2022).

The headline ``mia_auc`` / ``mia_tpr_at_1pct_fpr`` are the calibrated attack on the
membership canaries (fixed in advance, no selection); every (population, attack) pair is
in ``mia``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dplora_ray import results as R
from dplora_ray.audit.bounds import Population, epsilon_lower_bound
from dplora_ray.audit.canaries import AuditPlan, subset_split
from dplora_ray.audit.metrics import (
    chance_exposure,
    extrapolated_exposure,
    log_odds,
    roc_auc,
    sampled_exposure,
    tpr_at_fpr,
)
from dplora_ray.federated.encoding import EncodedSplit
from dplora_ray.privacy.mechanisms import get_mechanism

__all__ = ["AUDIT_FILE", "AUDIT_FORMAT", "FAILED_PREFIX", "comparable_epsilon", "run_audit"]

AUDIT_FILE = "audit.json"
AUDIT_FORMAT = "dplora_ray.audit/v1"
FAILED_PREFIX = "PRIVACY AUDIT FAILED"
SCORE_CHUNK = 64
HEADLINE = ("canaries", "calibrated")


def comparable_epsilon(mode: str, epsilons: Mapping[str, float],
                       audited_clients: tuple[int, ...], delta: float
                       ) -> tuple[float | None, float, str]:
    """The (epsilon, delta) that bounds an attack on ONE example of the audited clients.

    * ``dpsgd`` / ``paper`` (add/remove one example): the in/out game is the guarantee's
      own neighbouring relation; a client's examples are protected at its ledger
      epsilon, so the bound is the largest epsilon among the audited clients.
    * ``local`` (any two datasets of one client): in/out of one example is one such
      pair; the same per-client epsilon.
    * ``client`` (add/remove one whole client): a client's data with and without one
      example are two steps apart (remove the client, add it back with the other data),
      so group privacy gives ``(2 epsilon, (1 + e^epsilon) delta)``. An example-level
      attack thus lower-bounds a client-level mechanism only through this weaker pair;
      it says little about how tight the client-level epsilon is.
    * ``none``: no claim, nothing to compare.

    Each mechanism answers for itself
    (:meth:`~dplora_ray.privacy.mechanisms.Mechanism.audit_epsilon`).

    Returns:
        (epsilon or None, delta for the bound, one sentence saying why).
    """
    return get_mechanism(mode).audit_epsilon(epsilons, audited_clients, delta)


def _score(backend: Any, state_ref: Any, split: EncodedSplit, index: np.ndarray,
           num_labels: int) -> np.ndarray:
    """Label log-probabilities of ``split[index]``: fixed chunks of one length-sorted
    order, dealt to the workers with :func:`~dplora_ray.federated.pool.scatter` (a lost
    worker's chunks move on)."""
    from dplora_ray.federated.pool import WorkerPool, scatter

    index = np.asarray(index, dtype=np.int64)
    order = index[np.argsort(split.lengths()[index], kind="stable")]
    chunks = [order[s:s + SCORE_CHUNK] for s in range(0, len(order), SCORE_CHUNK)]
    pool = WorkerPool(backend, lambda m: None)
    parts = scatter(pool, "audit_scores", state_ref,
                    [subset_split(split, c) for c in chunks],
                    max_losses=3, what="privacy audit")
    out = np.full((len(split), num_labels), np.nan)
    for c, lp in zip(chunks, parts):
        out[c] = lp
    return out[index]


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def run_audit(plan: AuditPlan, backend: Any, *, initial: Mapping[str, Any],
              final: Mapping[str, Any], mode: str, epsilons: Mapping[str, float],
              delta: float, confidence: float, out_dir: str | Path, run_seconds: float,
              say: Callable[[str], None]) -> dict[str, Any]:
    """Measure leakage of the trained adapter and write ``out_dir/audit.json``.

    Args:
        plan: what :func:`~dplora_ray.audit.canaries.insert_canaries` planted.
        backend: the run's started backend (its workers score the sequences).
        initial: the untrained trainable LoRA tensors (the reference model).
        final: the final global trainable LoRA tensors.
        mode: ``privacy.mode``.
        epsilons: the ledger's epsilon per unit (empty without privacy).
        delta: ``privacy.delta``.
        confidence: of the epsilon lower bound.
        out_dir: the run folder.
        run_seconds: the run's time so far (to report the audit's relative cost).
        say: progress messages.

    Returns:
        The :data:`~dplora_ray.results.AUDIT_SUMMARY_KEYS` values for ``summary.json``
        (the :data:`~dplora_ray.results.AUDIT_ROUND_COLUMNS` among them go into the
        final row of ``rounds.parquet``).
    """
    t0 = time.perf_counter()
    q, L = plan.queries, plan.num_labels
    sec, cand = plan.section("secrets"), plan.section("candidates")
    can, nat = plan.section("canaries"), plan.section("natural")
    ref_can, ref_nat = plan.section("reference_canaries"), plan.section("reference_natural")
    y = q.labels
    lp = _score(backend, backend.put(dict(final)), q, np.arange(len(q)), L)
    mia_idx = np.concatenate([can, cand, ref_can] if len(can) else [])
    mia_idx = np.concatenate([mia_idx, nat, ref_nat]).astype(np.int64)
    lp_ref = np.full_like(lp, np.nan)  # the base model (B = 0), for the calibrated attack
    if len(mia_idx):
        lp_ref[mia_idx] = _score(backend, backend.put(dict(initial)), q, mia_idx, L)

    # exposure of the secrets among the sampled candidates
    exposures, extrapolated = [], []
    for i in sec:
        true, others = float(lp[i, y[i]]), lp[cand, y[i]]
        exposures.append(sampled_exposure(true, others))
        extrapolated.append(extrapolated_exposure(float(log_odds(np.array([true]))[0]),
                                                  log_odds(others),
                                                  10.0 ** plan.secret_digits))

    # membership inference
    def attacks(idx: np.ndarray) -> dict[str, np.ndarray]:
        own, ref = lp[idx, y[idx]], lp_ref[idx, y[idx]]
        return {"loss": own, "calibrated": own - ref}

    populations: dict[str, Population] = {}
    if len(can):  # members: the inserted canaries; non-members: the candidates
        populations["canaries"] = Population(attacks(can), attacks(cand), attacks(ref_can))
    if len(nat):
        populations["natural"] = Population(attacks(nat[plan.natural_member]),
                                            attacks(nat[~plan.natural_member]),
                                            attacks(ref_nat))
    mia = {name: {attack: {"auc": roc_auc(pop.members[attack], pop.nonmembers[attack]),
                           "tpr_at_1pct_fpr": tpr_at_fpr(pop.members[attack],
                                                         pop.nonmembers[attack], 0.01),
                           "members": len(pop.members[attack]),
                           "nonmembers": len(pop.nonmembers[attack])}
                  for attack in pop.members}
           for name, pop in populations.items()}
    head = mia.get(HEADLINE[0], mia.get("natural", {})).get(HEADLINE[1], {})

    eps_cmp, delta_cmp, why = comparable_epsilon(mode, epsilons, plan.audited_clients, delta)
    bound = epsilon_lower_bound(populations, delta_cmp, confidence)
    lb = bound.epsilon if bound is not None else None
    passed = None if eps_cmp is None or lb is None else bool(lb <= eps_cmp * (1 + 1e-9))
    epsilon = max(epsilons.values()) if epsilons else None
    seconds = time.perf_counter() - t0

    report: dict[str, Any] = {
        "format": AUDIT_FORMAT,
        "privacy_mode": mode,
        "epsilon": epsilon,
        "delta": delta if get_mechanism(mode).private else None,
        "epsilon_lower_bound": lb,
        "epsilon_compared": eps_cmp,
        "delta_compared": delta_cmp,
        "comparison": why,
        "audit_passed": passed,
        "lower_bound": bound.to_dict() if bound is not None else None,
        "exposure_mean": float(np.mean(exposures)) if exposures else None,
        "exposure_max": float(np.max(exposures)) if exposures else None,
        "exposure_chance": chance_exposure(plan.num_candidates),
        "exposure_ceiling": math.log2(plan.num_candidates + 1),
        "exposure_extrapolated_mean": float(np.mean(extrapolated)) if extrapolated else None,
        "exposure_extrapolated_max": float(np.max(extrapolated)) if extrapolated else None,
        "exposures": [float(e) for e in exposures],
        "secrets": {"count": plan.num_secrets, "repeats": plan.repeats,
                    "digits": plan.secret_digits, "candidates": plan.num_candidates,
                    "clients": sorted({int(c) for c in plan.secret_clients}),
                    "labels": [int(v) for v in plan.secret_labels],
                    "label_probability": [float(math.exp(lp[i, y[i]])) for i in sec]},
        "mia_auc": _finite_or_none(head.get("auc")),
        "mia_tpr_at_1pct_fpr": _finite_or_none(head.get("tpr_at_1pct_fpr")),
        "mia_headline": "/".join(HEADLINE) if HEADLINE[0] in mia else "natural/calibrated",
        "mia": mia,
        "audited_clients": list(plan.audited_clients),
        "audit_seconds": seconds,
        "run_seconds_before_audit": run_seconds,
        "audit_cost_fraction": seconds / run_seconds if run_seconds > 0 else None,
    }
    R.write_json_atomic(report, Path(out_dir) / AUDIT_FILE)

    nat_auc = mia.get("natural", {}).get("calibrated", {}).get("auc")
    summary = {
        R.AUDIT_PASSED: passed,
        R.AUDIT_EXPOSURE_MEAN: report["exposure_mean"],
        R.AUDIT_EXPOSURE_MAX: report["exposure_max"],
        R.AUDIT_MIA_AUC: report["mia_auc"],
        R.AUDIT_MIA_TPR_AT_1PCT_FPR: report["mia_tpr_at_1pct_fpr"],
        R.AUDIT_EPSILON_LOWER_BOUND: lb,
        R.AUDIT_NATURAL_MIA_AUC: _finite_or_none(nat_auc),
        R.AUDIT_EPSILON_COMPARED: eps_cmp,
        R.AUDIT_SECONDS: seconds,
    }

    def fmt(x: float | None, spec: str = ".3f") -> str:
        return "n/a" if x is None else format(x, spec)

    say(f"privacy audit: exposure mean {fmt(report['exposure_mean'], '.2f')} bits "
        f"(max {fmt(report['exposure_max'], '.2f')}, chance "
        f"{report['exposure_chance']:.2f}, ceiling {report['exposure_ceiling']:.2f}); "
        f"membership AUC {fmt(report['mia_auc'])}, TPR at 1% FPR "
        f"{fmt(report['mia_tpr_at_1pct_fpr'])}; epsilon >= {fmt(lb)} at "
        f"{confidence:.0%} confidence vs {fmt(eps_cmp)} accounted; {seconds:.1f} s")
    if passed is False:
        assert bound is not None and eps_cmp is not None
        print(f"{FAILED_PREFIX}: the empirical lower bound epsilon >= {bound.epsilon:.3f} "
              f"({confidence:.0%} confidence; {bound.population}/{bound.attack} attack, "
              f"TPR >= {bound.tpr_lower:.3f}, FPR <= {bound.fpr_upper:.3f}) exceeds the "
              f"accountant's epsilon {eps_cmp:.3f} for this attack's unit: the privacy "
              f"claim of this run does not hold (see {Path(out_dir) / AUDIT_FILE})",
              file=sys.stderr, flush=True)
    return summary
