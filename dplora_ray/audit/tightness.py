"""The tightness table of docs/audit.md: for each mode and one-step epsilon, the
accountant's epsilon, the white-box lower bound and the one-run lower bound.

    python -m dplora_ray.audit.tightness [--releases 1000] [--canaries 1000]
        [--confidence 0.95] [--epsilons 1 4 8] [--noise-seed 0]

Each row calibrates the mode's noise multiplier so that ONE release (sampling rate 1)
costs ``epsilon`` under the accountant (RDP, delta 1e-5), then runs
:func:`~dplora_ray.audit.whitebox.whitebox_audit` and
:func:`~dplora_ray.audit.one_run.whitebox_one_run` at that multiplier.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "tightness_rows"]


def tightness_rows(epsilons: Sequence[float] = (1.0, 4.0, 8.0),
                   modes: Sequence[str] = ("dpsgd", "paper", "client", "local"),
                   releases: int = 1000, canaries: int = 1000, confidence: float = 0.95,
                   delta: float = 1e-5, noise_seed: int | None = 0) -> list[dict[str, Any]]:
    from dplora_ray.audit.one_run import whitebox_one_run
    from dplora_ray.audit.whitebox import sigma_for_epsilon, whitebox_audit

    rows = []
    for eps in epsilons:
        for mode in modes:
            sigma = sigma_for_epsilon(mode, eps, delta)
            t0 = time.process_time()
            wb = whitebox_audit(mode, sigma, releases=releases, delta=delta,
                                confidence=confidence, noise_seed=noise_seed)
            t1 = time.process_time()
            one = whitebox_one_run(mode, sigma, canaries=canaries, delta=delta,
                                   confidence=confidence, noise_seed=noise_seed)
            rows.append({"mode": mode, "epsilon": eps, "sigma": sigma,
                         "epsilon_accountant": wb.epsilon_accountant,
                         "epsilon_gaussian": wb.epsilon_gaussian,
                         "whitebox": wb.epsilon_lower_bound,
                         "whitebox_threshold": wb.epsilon_threshold_lower,
                         "whitebox_passed": wb.passed,
                         "one_run": float(one["epsilon_lower_bound"]),
                         "one_run_delta0": float(one["epsilon_delta0"]),
                         "one_run_passed": one["passed"],
                         "cpu_whitebox": t1 - t0, "cpu_one_run": time.process_time() - t1})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dplora_ray.audit.tightness",
                                description=__doc__.splitlines()[0])
    p.add_argument("--releases", type=int, default=1000)
    p.add_argument("--canaries", type=int, default=1000)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    p.add_argument("--modes", nargs="+", default=["dpsgd", "paper", "client", "local"])
    p.add_argument("--noise-seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = tightness_rows(args.epsilons, args.modes, args.releases, args.canaries,
                          args.confidence, noise_seed=args.noise_seed)
    print("| mode | sigma | accountant eps (1 step) | exact Gaussian eps | white-box lb "
          "(ratio) | threshold-only lb | one-run lb (ratio) | one-run lb, delta=0 | "
          "passed | CPU s (wb / 1-run) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = r["epsilon_accountant"]
        print(f"| {r['mode']} | {r['sigma']:.3f} | {acc:.3f} | {r['epsilon_gaussian']:.3f} | "
              f"{r['whitebox']:.3f} ({r['whitebox'] / acc:.2f}) | "
              f"{r['whitebox_threshold']:.3f} | {r['one_run']:.3f} "
              f"({r['one_run'] / acc:.2f}) | {r['one_run_delta0']:.3f} | "
              f"{'yes' if r['whitebox_passed'] and r['one_run_passed'] else 'NO'} | "
              f"{r['cpu_whitebox']:.1f} / {r['cpu_one_run']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
