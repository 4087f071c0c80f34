"""The injected-bug table of docs/audit.md (not a test; run it by hand):

    python tests/audit_bug_table.py

For each injected bug (tests/test_audit_whitebox.py) and mode: the white-box audit at
the sizes the tests use (confidence 1 - 1e-6; claimed one-step epsilon 1, or 4 with 500
trials per world for the halved noise) and the one-run audit (400 canaries, confidence
0.95, delta 1e-5, claimed epsilon 1): whether each flagged it, and by how much.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_audit_whitebox import BUGS, CONF, MODES, SIZES, inject  # noqa: E402

from dplora_ray.audit.one_run import whitebox_one_run  # noqa: E402
from dplora_ray.audit.whitebox import sigma_for_epsilon, whitebox_audit  # noqa: E402


def main() -> None:
    print("| bug | mode | white-box: flagged by | white-box lb / accountant | sensitivity "
          "ratio | one-run lb / accountant (flagged) |")
    print("|---|---|---|---|---|---|")
    for bug in BUGS:
        for mode in MODES:
            eps, n = SIZES.get(bug, (1.0, 30))
            with pytest.MonkeyPatch.context() as mp:
                inject(mp, bug, mode)
                wb = whitebox_audit(mode, sigma_for_epsilon(mode, eps), releases=n,
                                    difference_releases=min(n, 30), confidence=CONF,
                                    noise_seed=0)
                one = whitebox_one_run(mode, sigma_for_epsilon(mode, 1.0), canaries=400,
                                       confidence=0.95, noise_seed=0)
            flagged = ", ".join(f.split(":")[0] for f in wb.failures) or "NOT FLAGGED"
            lb = float(one["epsilon_lower_bound"])
            print(f"| {bug} | {mode} | {flagged} | {wb.epsilon_lower_bound:.3g} / "
                  f"{wb.epsilon_accountant:.3g} | {wb.sensitivity_ratio:.4f} | "
                  f"{lb:.3g} / {one['epsilon_accountant']:.3g} "
                  f"({'yes' if not one['passed'] else 'no'}) |", flush=True)


if __name__ == "__main__":
    main()
