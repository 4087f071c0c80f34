"""Empirical privacy audit: measure leakage next to every epsilon (see docs/audit.md).

With ``audit.enabled`` the runner calls :func:`insert_canaries` while planning (before
the privacy plan, since canaries change the clients' data) and :func:`run_audit` after
the last round, which writes ``audit.json`` and the ``audit_*`` columns and summary keys.

Invariants:
    * Off by default; with it off nothing is planted and nothing is scored.
    * Deterministic given the config and seed (its own ``SeedSequence`` stream).
    * An empirical epsilon lower bound above the accountant's epsilon (for the unit the
      attack tests) is reported loudly: a stderr line starting ``PRIVACY AUDIT FAILED``
      and ``audit_passed: false`` in ``audit.json`` and ``summary.json``.
    * Imports neither Ray nor peft (scoring runs inside the client workers).
"""

from __future__ import annotations

from dplora_ray.audit.bounds import (
    LowerBound,
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_from_rates,
    epsilon_lower_bound,
)
from dplora_ray.audit.canaries import SECRET_TEMPLATE, AuditPlan, insert_canaries
from dplora_ray.audit.metrics import (
    chance_exposure,
    extrapolated_exposure,
    roc_auc,
    sampled_exposure,
    tpr_at_fpr,
)
from dplora_ray.audit.report import AUDIT_FILE, FAILED_PREFIX, comparable_epsilon, run_audit

__all__ = [
    "AUDIT_FILE",
    "AuditPlan",
    "FAILED_PREFIX",
    "LowerBound",
    "SECRET_TEMPLATE",
    "chance_exposure",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "comparable_epsilon",
    "epsilon_from_rates",
    "epsilon_lower_bound",
    "extrapolated_exposure",
    "insert_canaries",
    "roc_auc",
    "run_audit",
    "sampled_exposure",
    "tpr_at_fpr",
]
