"""Audit cost: wall time of a run with the empirical privacy audit on vs off (issue 8:
the audit is off by default and costs under 20% of the run time when on).

The same tiny-model config (``configs/tiny.yaml``, inline backend, one worker) runs twice
through the public :func:`dplora_ray.run_experiment`: once as is (``audit.enabled``
false, the default) and once with ``audit.enabled=true`` and the audit's default sizes
(quick mode: smaller candidate and membership populations). Figures:

* ``audit_cost_fraction`` = (wall_on - wall_off) / wall_off, from ``wall_seconds`` of the
  two ``summary.json`` files, after an uncounted warm-up run (includes the canaries added to the training data, the
  attacks and their scoring);
* ``audit_seconds`` (time spent in the post-training audit, from the audit-on summary)
  and its share of the audit-on run, ``audit_seconds / wall_on``.

The audit's cost is fixed (it scores a fixed number of sequences once, after the last
round) while training grows with rounds x local steps, so the fraction falls as runs get
longer: the quick run (2 rounds of 3 steps, well under a second of training) is a smoke
test and its fraction is far above what real runs pay; the full run trains 20 rounds of
20 steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import tiny_config

__all__ = ["TARGET", "measure", "settings"]

TARGET = 0.20


def settings(quick: bool) -> dict[str, Any]:
    """Dotted-key overrides of ``configs/tiny.yaml`` shared by both runs."""
    s: dict[str, Any] = {"runtime.backend": "inline", "runtime.num_workers": 1,
                         "runtime.torch_threads": 1}
    if quick:
        s.update({"federation.rounds": 2, "federation.local_steps": 3,
                  "data.max_train_examples": 200})
    else:
        s.update({"federation.rounds": 20, "federation.local_steps": 20,
                  "data.max_train_examples": 400})
    return s


def _audit_settings(quick: bool) -> dict[str, Any]:
    s: dict[str, Any] = {"audit.enabled": True}
    if quick:
        s.update({"audit.candidates": 200, "audit.mia_examples": 20,
                  "audit.mia_canaries": 20})
    return s


def measure(quick: bool, workdir: Path) -> dict[str, Any]:
    """Runs the config with the audit off, then on; returns the walls and fractions."""
    from dplora_ray import run_experiment

    base = settings(quick)
    # warm-up (imports, tokenizer and model construction, first allocations): not counted
    run_experiment(tiny_config({**base, "federation.rounds": 1}), workdir / "audit-cost-warmup",
                   overwrite=True, progress=False, log=lambda m: None)
    runs: dict[str, dict[str, Any]] = {}
    for name, extra in (("off", {}), ("on", _audit_settings(quick))):
        cfg = tiny_config({**base, **extra})
        summary = run_experiment(cfg, workdir / f"audit-cost-{name}", overwrite=True,
                                 progress=False, log=lambda m: None)
        runs[name] = summary
    wall_off = float(runs["off"]["wall_seconds"])
    wall_on = float(runs["on"]["wall_seconds"])
    audit_seconds = float(runs["on"].get("audit_seconds") or float("nan"))
    return {
        "settings": {**base, **_audit_settings(quick)},
        "wall_seconds_off": wall_off,
        "wall_seconds_on": wall_on,
        "audit_seconds": audit_seconds,
        "audit_seconds_fraction_of_run": audit_seconds / wall_on,
        "audit_cost_fraction": (wall_on - wall_off) / wall_off,
        "audit_off_has_no_audit_figures": runs["off"].get("audit_seconds") is None,
        "audit_exposure_mean": runs["on"].get("audit_exposure_mean"),
        "target": TARGET,
        "label": f"tiny-llama, inline, {base['federation.rounds']} rounds x "
                 f"{base['federation.local_steps']} local steps",
    }
