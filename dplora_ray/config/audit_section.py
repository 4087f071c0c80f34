"""The ``audit`` section of a config (:class:`AuditConfig`), on its own so that
:mod:`dplora_ray.config.sections` stays short; re-exported there and by
:mod:`dplora_ray.config`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dplora_ray.config.checks import check as _check
from dplora_ray.config.checks import count

__all__ = ["AuditConfig"]


@dataclass(frozen=True)
class AuditConfig:
    """Empirical privacy audit (issue 8; see docs/audit.md). Off by default.

    When enabled, the run plants canaries in the clients' data before the privacy plan is
    made, and after the last round measures what leaks: the exposure of secret canaries
    (Carlini et al. 2019), membership inference (Yeom et al. 2018, and calibrated by the
    base model), and an empirical lower bound on epsilon with Clopper-Pearson intervals
    (Jagielski et al. 2020; Nasr et al. 2021), reported next to the accountant's epsilon.

    Attributes:
        enabled: run the audit.
        canaries: secret canaries ("my account number is <digits>", each with a random
            label), each inserted ``repeats`` times.
        repeats: copies of each secret canary in its client's data.
        canary_clients: clients that hold the secret canaries (the most often sampled).
        secret_digits: digits of a secret (the candidate space has 10^digits secrets).
        candidates: secrets sampled from the candidate space to rank the true one.
        mia_examples: natural training examples per side of the membership attack (this
            many stay in training as members, as many are held out as non-members).
        mia_canaries: canaries with random labels inserted once each (members; their
            non-members are the ``candidates``, also with random labels); the
            population the epsilon bound relies on.
        confidence: confidence of the epsilon lower bound.
        mode: which audit (issue 17): ``blackbox`` (the above, after training),
            ``whitebox`` (Dirac gradient canaries through one step of the mode's code,
            many independent releases: :mod:`dplora_ray.audit.whitebox`) or ``one_run``
            (Steinke et al. 2023 on one release with ``one_run_canaries`` canaries:
            :mod:`dplora_ray.audit.one_run`). The last two plant nothing in the run.
        releases: white-box trials per world (with and without the canary).
        one_run_canaries: canaries of the one-run audit (each in by a fair coin).
    """

    enabled: bool = False
    canaries: int = 8
    repeats: int = 10
    canary_clients: int = 1
    secret_digits: int = 8
    candidates: int = 1000
    mia_examples: int = 100
    mia_canaries: int = 100
    confidence: float = 0.95
    mode: Literal["blackbox", "whitebox", "one_run"] = "blackbox"
    releases: int = 1000
    one_run_canaries: int = 1000

    def __post_init__(self) -> None:
        for key in ("canaries", "mia_examples", "mia_canaries"):
            count(f"audit.{key}", getattr(self, key), low=0)
        for key in ("repeats", "canary_clients", "candidates", "releases",
                    "one_run_canaries"):
            count(f"audit.{key}", getattr(self, key))
        _check(4 <= self.secret_digits <= 18, "audit.secret_digits", self.secret_digits,
               "must be in [4, 18]")
        _check(0.5 <= self.confidence < 1.0, "audit.confidence", self.confidence,
               "must be in [0.5, 1)")
        if self.enabled:
            _check(self.canaries + self.mia_examples + self.mia_canaries > 0,
                   "audit.canaries", self.canaries,
                   "audit.enabled needs canaries, mia_examples or mia_canaries > 0")
