"""Choosing the audit (``audit.mode``) and the ``dplora-ray audit`` command (issue 17).

* ``blackbox`` (default): the run plants canaries and attacks the trained adapter
  (:mod:`dplora_ray.audit.report`); ``dplora-ray audit`` then trains with
  ``audit.enabled=true``.
* ``whitebox``: :func:`~dplora_ray.audit.whitebox.whitebox_audit` of ``privacy.mode`` at
  the run's noise multiplier (Dirac canaries, many independent releases of one step).
* ``one_run``: :func:`~dplora_ray.audit.one_run.whitebox_one_run` (Steinke et al. 2023:
  ``audit.one_run_canaries`` canaries in ONE release).

The last two need no training: ``dplora-ray audit`` runs them alone (seconds on CPU), and
``dplora-ray train`` with ``audit.enabled`` runs them after the last round at the noise
multiplier the run used. Either way ``audit.json`` holds the result, and a bound above the
accountant's epsilon prints a line starting ``PRIVACY AUDIT FAILED`` to stderr and
records ``audit_passed: false``; ``dplora-ray audit`` then exits with status 3.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dplora_ray.audit.report import AUDIT_FILE, FAILED_PREFIX

__all__ = ["AUDIT_FAILED_EXIT", "MECHANISM_AUDIT_FORMAT", "add_parser", "audit_after_run",
           "run_mechanism_audit", "summary_values"]

MECHANISM_AUDIT_FORMAT = "dplora_ray.audit.mechanism/v1"
AUDIT_FAILED_EXIT = 3


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.inf if x == "inf" else None
    return v


def run_mechanism_audit(cfg: Any, out_dir: str | Path, *,
                        noise_multiplier: float | None = None,
                        say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``cfg.audit.mode`` (``whitebox`` or ``one_run``) for ``cfg.privacy.mode`` and
    write ``out_dir/audit.json``.

    Args:
        cfg: the experiment config.
        out_dir: where ``audit.json`` goes (created).
        noise_multiplier: the mode's sigma; default ``privacy.noise_multiplier``, or the
            one the run's privacy plan calibrates from ``privacy.target_epsilon``.
        say: progress and result lines.

    Returns:
        The report written (``audit_passed`` is None without privacy).
    """
    from dplora_ray import results as R
    from dplora_ray.privacy.mechanisms import get_mechanism

    a, pc = cfg.audit, cfg.privacy
    mech = get_mechanism(pc.mode)
    report: dict[str, Any] = {"format": MECHANISM_AUDIT_FORMAT, "audit_mode": a.mode,
                              "privacy_mode": pc.mode, "delta": pc.delta,
                              "confidence": a.confidence}
    if not mech.private:
        report.update(audit_passed=None, epsilon_lower_bound=None, epsilon_compared=None,
                      comparison="privacy.mode is 'none': there is no claim to check")
    else:
        sigma = noise_multiplier
        if sigma is None:
            sigma = pc.noise_multiplier
        if sigma is None:
            from dplora_ray.federated.planning import plan_run

            sigma = plan_run(cfg).privacy.noise_multiplier
        common = {"delta": pc.delta, "confidence": a.confidence,
                  "noise_seed": pc.noise_seed, "clipping_norm": pc.clipping_norm,
                  "accountant": pc.accountant}
        if a.mode == "whitebox":
            from dplora_ray.audit.whitebox import whitebox_audit

            say(f"white-box audit of privacy.mode={pc.mode!r} at noise multiplier "
                f"{sigma:.4g}: {a.releases} releases per world ...")
            res = whitebox_audit(pc.mode, sigma, releases=a.releases, **common)
            detail = res.to_dict()
            say(res.summary_line())
            what = (f"white-box Dirac canary, {a.releases} releases per world; "
                    + ("; ".join(res.failures) if res.failures else "no check failed"))
        else:
            from dplora_ray.audit.one_run import whitebox_one_run

            say(f"one-run audit of privacy.mode={pc.mode!r} at noise multiplier "
                f"{sigma:.4g}: {a.one_run_canaries} canaries ...")
            detail = whitebox_one_run(pc.mode, sigma, canaries=a.one_run_canaries, **common)
            what = (f"one-run audit, {detail['correct']} of {detail['guesses']} guesses "
                    f"right among {detail['canaries']} canaries")
            say(f"one-run {pc.mode}: epsilon >= {_finite(detail['epsilon_lower_bound']):.3f} "
                f"({a.confidence:.6g} confidence; {what}) vs accountant "
                f"{detail['epsilon_accountant']:.3f} for one step")
        report.update(
            audit_passed=bool(detail["passed"]),
            epsilon_lower_bound=detail["epsilon_lower_bound"],
            epsilon_compared=detail["epsilon_accountant"],
            noise_multiplier=sigma,
            comparison=("the accountant's epsilon for ONE release of the canary at the "
                        "same noise multiplier (sampling rate 1): what the white-box "
                        "releases cost the canary"),
            **{a.mode: detail})
        report[R.AUDIT_SECONDS] = detail["seconds"]
        if not detail["passed"]:
            print(f"{FAILED_PREFIX}: {a.mode} audit of privacy.mode={pc.mode!r}: {what}; "
                  f"epsilon >= {_finite(detail['epsilon_lower_bound']):.3f} at "
                  f"{a.confidence:.6g} confidence against the accountant's "
                  f"{detail['epsilon_accountant']:.3f} for one step: the privacy claim "
                  f"does not hold (see {Path(out_dir) / AUDIT_FILE})",
                  file=sys.stderr, flush=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    R.write_json_atomic(report, out / AUDIT_FILE)
    return report


def summary_values(report: dict[str, Any]) -> dict[str, Any]:
    """The ``summary.json`` audit keys of a mechanism audit (the black-box ones None)."""
    from dplora_ray import results as R

    out: dict[str, Any] = dict.fromkeys(R.AUDIT_SUMMARY_KEYS)
    out[R.AUDIT_PASSED] = report.get("audit_passed")
    lb = _finite(report.get("epsilon_lower_bound"))
    out[R.AUDIT_EPSILON_LOWER_BOUND] = lb if lb is None or math.isfinite(lb) else None
    out[R.AUDIT_EPSILON_COMPARED] = report.get("epsilon_compared")
    out[R.AUDIT_SECONDS] = report.get(R.AUDIT_SECONDS)
    return out


def audit_after_run(cfg: Any, out_dir: Path, privacy_plan: Any, say: Callable[[str], None],
                    rounds_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The runner's call after the last round (``audit.mode`` ``whitebox`` / ``one_run``):
    audit at the noise multiplier the run used; returns the summary's audit keys and sets
    the final row's audit columns."""
    from dplora_ray import results as R

    values = summary_values(run_mechanism_audit(
        cfg, out_dir, noise_multiplier=privacy_plan.noise_multiplier, say=say))
    if rounds_rows:
        rounds_rows[-1].update({k: values[k] for k in R.AUDIT_ROUND_COLUMNS})
    return values


# --------------------------------------------------------------------------- the command
def add_parser(subparsers: Any, handler: Callable[[argparse.Namespace], int]) -> None:
    """Register ``dplora-ray audit`` (``handler``: :func:`dplora_ray.cli._cmd_audit`,
    which runs :func:`run_mechanism_audit` or, for ``blackbox``, a training run)."""
    p = subparsers.add_parser(
        "audit", help="empirical privacy audit (black-box, white-box or one-run)",
        description="Run the audit that audit.mode selects: blackbox trains the config "
                    "with canaries and attacks the adapter; whitebox and one_run audit one "
                    "step of privacy.mode's code path at the run's noise multiplier "
                    "(no training). Exit status 3 when the audit fails.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--mode", choices=("blackbox", "whitebox", "one_run"), default=None,
                   help="the audit (default: the config's audit.mode)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--out", default=None, help="output folder (default: "
                   "runs/audit-<config name>-<time>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty output folder (blackbox)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=handler)
