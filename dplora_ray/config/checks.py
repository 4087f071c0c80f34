"""The value checks every config section uses, and the documented limits on counts.

Each check raises :class:`~dplora_ray.errors.ConfigError` naming the dotted key and the
value. The limits bound counts that no real run needs but that would make planning hang
or overflow (a cohort schedule of 10^12 rounds, a synthetic corpus of 10^12 examples,
a seed wider than 64 bits):

=========================================================  ===================
keys                                                       at most
=========================================================  ===================
``federation.rounds``, ``num_clients``,                    1,000,000
``clients_per_round``, ``local_steps``, ``batch_size``,
``eval_every``; ``data.test_size``, ``data.max_new_tokens``;
``runtime.max_physical_batch_size``; ``audit.canaries``,
``repeats``, ``canary_clients``, ``candidates``,
``mia_examples``, ``mia_canaries``
``data.max_train_examples``                                1,000,000,000
``runtime.num_workers``, ``runtime.torch_threads``,        1,024
``runtime.max_worker_restarts``
``seed``, ``privacy.noise_seed``                           2**63 - 1
``federation.rounds`` x ``federation.num_clients``         100,000,000
=========================================================  ===================

The last bounds planning: every round's cohort is drawn up front (a Poisson cohort draws
one number per client), and the schedule is kept in memory and in every checkpoint.
Planning costs tens of microseconds per round besides: 1,000,000 rounds of a small
population plan in well under a minute (``tests/test_robustness_runtime.py``).

Elsewhere: the synthetic recipe generates at most 1,000,000 examples
(:mod:`dplora_ray.data.loading`), a sweep expands to at most 100,000 trials
(:mod:`dplora_ray.sweeps.spec`), and a nonzero ``privacy.noise_multiplier`` is at least
1e-6 (:mod:`dplora_ray.config.sections`).
"""

from __future__ import annotations

import math

from dplora_ray.errors import ConfigError

__all__ = ["MAX_COHORT_DRAWS", "MAX_COUNT", "MAX_EXAMPLES", "MAX_SEED", "MAX_WORKERS",
           "check", "count",
           "finite_positive", "positive_int"]

MAX_COUNT = 1_000_000
MAX_EXAMPLES = 1_000_000_000
MAX_WORKERS = 1024
MAX_SEED = 2**63 - 1
MAX_COHORT_DRAWS = 100_000_000  # federation.rounds x federation.num_clients


def check(cond: bool, key: str, value: object, reason: str) -> None:
    if not cond:
        raise ConfigError(key, value, reason)


def positive_int(key: str, value: int) -> None:
    check(value >= 1, key, value, "must be an integer >= 1")


def count(key: str, value: int, low: int = 1, high: int = MAX_COUNT) -> None:
    """An integer in [low, high]; the upper limit is documented in this module."""
    check(value >= low, key, value, f"must be an integer >= {low}")
    check(value <= high, key, value, f"must be <= {high:,} (a documented limit)")


def finite_positive(key: str, value: float, reason: str = "must be a finite number > 0",
                    zero_ok: bool = False) -> None:
    """A finite number > 0 (>= 0 with ``zero_ok``): rejects inf as well as NaN."""
    check(math.isfinite(value) and (value >= 0 if zero_ok else value > 0), key, value, reason)
