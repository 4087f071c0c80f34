"""The privacy plan of a run, fixed before training: delta checked against the data, the
sampling checked against the mechanism, the noise multiplier calibrated so that every
accounting unit's planned (q, steps) stays within ``privacy.target_epsilon``, and the
planned epsilon."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dplora_ray.privacy.accountant import SampledGaussian, compute_epsilon
from dplora_ray.privacy.calibration import calibrate_noise_multiplier
from dplora_ray.privacy.mechanisms import Mechanism, get_mechanism

if TYPE_CHECKING:
    from dplora_ray.config import ExperimentConfig

__all__ = ["PrivacyPlan", "plan_privacy"]


@dataclass(frozen=True)
class PrivacyPlan:
    """Noise and accounting parameters fixed before training."""

    mechanism: Mechanism
    noise_multiplier: float  # what the mechanism uses (the paper's sigma in `paper`)
    effective_noise_multiplier: float  # what the accountant sees
    budget: float | None
    planned_epsilon: float | None

    @property
    def mode(self) -> str:
        return self.mechanism.name

    @property
    def unit(self) -> str:
        return self.mechanism.unit

    @property
    def private(self) -> bool:
        return self.mechanism.private


def plan_privacy(cfg: ExperimentConfig, parts: Sequence[np.ndarray],
                 cohorts: Sequence[np.ndarray]) -> PrivacyPlan:
    """Check delta and the sampling against the mechanism, calibrate sigma (or take
    ``privacy.noise_multiplier``) so that every accounting unit's planned (q, steps)
    stays within ``privacy.target_epsilon``, and compute the planned epsilon.

    Only the Pareto front of the units' (q, steps) matters: a unit with both a lower
    rate and fewer steps than another spends less.
    """
    pc = cfg.privacy
    mech = get_mechanism(pc.mode)
    if not mech.private:
        return PrivacyPlan(mech, 0.0, 0.0, None, None)
    mech.check_delta(pc.delta, parts, cfg.federation.num_clients)
    mech.check_config(cfg)
    scale = mech.effective_scale(cfg.lora.train_a)
    plans = dict.fromkeys(mech.accounting_plans(cfg, parts, cohorts))
    front = [(q, t) for (q, t) in plans
             if not any(q2 >= q and t2 >= t and (q2, t2) != (q, t) for (q2, t2) in plans)]
    if pc.noise_multiplier is not None:
        sigma = pc.noise_multiplier
    else:
        assert pc.target_epsilon is not None
        sigma = max(calibrate_noise_multiplier(pc.target_epsilon, q, t, pc.delta,
                                               pc.accountant, effective_scale=scale)
                    for (q, t) in front) if front else 0.0
    planned = max((compute_epsilon([SampledGaussian(sigma * scale, q, t)], pc.delta,
                                   pc.accountant) for (q, t) in front), default=0.0)
    _check_first_round(cfg, mech, sigma * scale, parts, cohorts)
    return PrivacyPlan(mech, sigma, sigma * scale, pc.budget, planned)


def _check_first_round(cfg: ExperimentConfig, mech: Mechanism, z: float,
                       parts: Sequence[np.ndarray], cohorts: Sequence[np.ndarray]) -> None:
    """A budget (``privacy.max_epsilon``) that the first round with a client already
    exceeds would stop the run before it trains at all: a ConfigError instead."""
    from dplora_ray.errors import ConfigError
    from dplora_ray.privacy.ledger import PrivacyLedger

    pc = cfg.privacy
    budget = pc.budget
    if budget is None or pc.max_epsilon is None:  # the target itself is calibrated to fit
        return
    for r, cohort in enumerate(cohorts, start=1):
        entries = mech.ledger_entries(r, cohort, z, cfg, parts)
        if not entries:
            continue
        ledger = PrivacyLedger(mode=pc.mode, accountant=pc.accountant, delta=pc.delta,
                               unit_of_privacy=mech.unit)
        cost = ledger.epsilon_if(entries)
        if cost > budget * (1 + 1e-9):  # the runner's guard, with its tolerance
            raise ConfigError("privacy.max_epsilon", pc.max_epsilon,
                              f"is below what round {r} alone costs (epsilon {cost:.4g} at "
                              f"delta {pc.delta:g}): no round could run; raise it or the "
                              "noise")
        return
