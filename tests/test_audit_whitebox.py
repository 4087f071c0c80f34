"""White-box audit (issue 17): Dirac gradient canaries through one step of each
mechanism's real code path, and the six injected bugs it must catch.

Statistical soundness. Every audit here runs at confidence ``1 - 1e-6``: by construction
(Clopper-Pearson and exact Gaussian intervals, Bonferroni over the family, independent
trials) a correct mechanism fails with probability at most 1e-6, and the trial keys are
derived from a public ``noise_seed`` so each test sees one fixed draw. The bugs are sized
so that detection has margin (numbers in docs/audit.md):

* noise off, noise reused across rounds, noise from the public seed: the released
  scores have no noise (or the same noise in every trial, or in both rounds), so the
  Gaussian fit's shift-to-noise ratio is infinite; 30 trials per world suffice;
* noise multiplier halved: claimed epsilon 4 for one step; the fit's bound is 1.31-1.41
  times that with 500 trials per world (5.23 in dpsgd ... 5.63 in client);
* clipping skipped or 1% above C: the sensitivity probe (same noise key with and without
  the canary, so the noise cancels exactly) measures 4 (2 for ``paper``) and 1.01 times
  the claimed sensitivity, against a float tolerance of 1e-4.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dplora_ray.audit.whitebox import (
    SENSITIVITY_TOLERANCE,
    gaussian_delta,
    gaussian_epsilon,
    gdp_mu_lower,
    one_step_epsilon,
    sigma_for_epsilon,
    whitebox_audit,
)

MODES = ("dpsgd", "paper", "client", "local")
CONF = 1 - 1e-6
TRIALS = 200  # per world, for the correct mechanisms
BUGS = ("noise_off", "noise_halved", "clipping_skipped", "clipping_1pct_over",
        "noise_reused", "noise_from_public_seed")


# --------------------------------------------------------------------------- statistics
def test_gaussian_epsilon_inverts_the_analytic_delta() -> None:
    # mu = 1: delta(0) = Phi(1/2) - Phi(-1/2)
    assert gaussian_delta(0.0, 1.0) == pytest.approx(0.3829249, abs=1e-6)
    for mu in (0.1, 0.5, 1.0, 3.0):
        eps = gaussian_epsilon(mu, 1e-5)
        assert gaussian_delta(eps, mu) == pytest.approx(1e-5, rel=1e-5)
    assert gaussian_epsilon(0.0, 1e-5) == 0.0 and gaussian_epsilon(math.inf, 1e-5) == math.inf
    # the accountant (RDP) is never below the exact Gaussian epsilon for one step
    for z in (0.8, 2.0, 4.0):
        assert one_step_epsilon(z, 1e-5) >= gaussian_epsilon(1 / z, 1e-5)
    assert one_step_epsilon(sigma_for_epsilon("dpsgd", 1.0), 1e-5) == pytest.approx(1.0)
    # paper's sigma is 2 sqrt 2 times the effective multiplier, local's 2 times
    assert sigma_for_epsilon("paper", 1.0) == pytest.approx(
        2 * math.sqrt(2) * sigma_for_epsilon("dpsgd", 1.0))


def test_gdp_lower_bound_covers_the_true_mu() -> None:
    rng = np.random.default_rng(3)
    misses = 0
    for _ in range(400):
        x, y = rng.normal(0, 2, 200), rng.normal(1, 2, 200)  # mu = 0.5
        misses += gdp_mu_lower(x, y, 0.05)[1] > 0.5
    assert misses / 400 <= 0.05
    assert gdp_mu_lower(np.zeros(5), np.ones(5), 0.05) == (math.inf, math.inf)
    assert gdp_mu_lower(np.ones(5), np.ones(5), 0.05) == (0.0, 0.0)


# --------------------------------------------------------------------------- correct code
@pytest.mark.parametrize("mode", MODES)
def test_correct_mechanisms_pass(mode: str) -> None:
    sigma = sigma_for_epsilon(mode, 1.0)
    r = whitebox_audit(mode, sigma, releases=TRIALS, difference_releases=50,
                       confidence=CONF, noise_seed=0)
    assert r.passed and not r.failures, r.failures
    assert r.epsilon_accountant == pytest.approx(1.0)
    # the canary is a worst case: it moves the release by exactly the claimed sensitivity
    assert abs(r.sensitivity_ratio - 1.0) <= SENSITIVITY_TOLERANCE
    # and the noise is what the accountant assumes (std sigma_eff in score units)
    t = r.tests["release"]
    assert t["world0_std"] == pytest.approx(r.sigma_eff, rel=0.15)
    assert t["world1_mean"] - t["world0_mean"] == pytest.approx(1.0, abs=6 * r.sigma_eff
                                                                  * math.sqrt(2 / TRIALS))
    assert r.epsilon_lower_bound <= r.epsilon_accountant
    json.dumps(r.to_dict())  # what audit.json holds


def test_fresh_secret_keys_pass_too() -> None:
    """Without a noise seed every trial draws its key from the OS, as a run does."""
    r = whitebox_audit("local", sigma_for_epsilon("local", 1.0), releases=100,
                       difference_releases=50, confidence=CONF)
    assert r.passed and not r.noise_reproducible


# --------------------------------------------------------------------------- bug injection
def _scale_noise(mp: pytest.MonkeyPatch, mode: str, factor: float) -> None:
    """The mechanism draws ``factor`` times the noise the accountant is told about."""
    from dplora_ray.federated import aggregator
    from dplora_ray.federated.client import ClientWorker
    from dplora_ray.privacy.mechanisms import LocalLevel

    if mode in ("dpsgd", "paper"):
        name = f"_train_{mode}"
        train = getattr(ClientWorker, name)
        mp.setattr(ClientWorker, name, lambda self, job: train(
            self, dataclasses.replace(job, noise_multiplier=job.noise_multiplier * factor)))
    elif mode == "local":
        transform = LocalLevel.client_transform
        mp.setattr(LocalLevel, "client_transform",
                   lambda self, u, c, z, key: transform(self, u, c, z * factor, key))
    else:
        dp_fedavg = aggregator.dp_fedavg
        mp.setattr(aggregator, "dp_fedavg", lambda ups, tmpl, c, z, cohort, gen: dp_fedavg(
            ups, tmpl, c, z * factor, cohort, gen))


def _break_clipping(mp: pytest.MonkeyPatch, scale: float | None) -> None:
    """Every clipping step of every mode skips clipping (None) or clips to scale * C."""
    from dplora_ray.federated import aggregator, local_training
    from dplora_ray.privacy import dpsgd, noise

    clip, factors = noise.clip_by_global_norm, noise.per_sample_clip_factors

    def bad_clip(tensors: Any, c: float) -> Any:
        if scale is None:
            return {k: v.detach().clone() for k, v in tensors.items()}, noise.global_l2_norm(
                tensors)
        return clip(tensors, c * scale)

    def bad_factors(grads: list[torch.Tensor], c: float) -> torch.Tensor:
        if scale is None:
            return torch.ones(grads[0].shape[0], dtype=torch.float32)
        return factors(grads, c * scale)

    for module in (noise, local_training, aggregator):
        mp.setattr(module, "clip_by_global_norm", bad_clip)
    mp.setattr(dpsgd, "per_sample_clip_factors", bad_factors)


def _reuse_noise(mp: pytest.MonkeyPatch) -> None:
    """Every round draws the noise of round 0 (the derived key ignores the position)."""
    from dplora_ray.federated.aggregator import Aggregator
    from dplora_ray.privacy.mechanisms import Mechanism

    key_for = Mechanism.noise_key_for
    mp.setattr(Mechanism, "noise_key_for",
               lambda self, run_key, party, *position: key_for(self, run_key, party))
    mp.setattr(Aggregator, "_noise_generator", lambda self, server_round:
               self.noise_key.generator(0))


def _public_seed_noise(mp: pytest.MonkeyPatch) -> None:
    """The noise key is derived from the run's public seed (what issue 12 removed)."""
    from dplora_ray.privacy.mechanisms import Mechanism
    from dplora_ray.privacy.streams import NoiseKey

    def key_for(self: Any, run_key: Any, party: str, *position: int) -> Any:
        if self.noise_stream is None or self.noise_by != party:
            return None
        return NoiseKey.from_seed(0).derive(self.noise_stream, *position)

    mp.setattr(Mechanism, "noise_key_for", key_for)


def inject(mp: pytest.MonkeyPatch, bug: str, mode: str) -> None:
    if bug == "noise_off":
        _scale_noise(mp, mode, 0.0)
    elif bug == "noise_halved":
        _scale_noise(mp, mode, 0.5)
    elif bug == "clipping_skipped":
        _break_clipping(mp, None)
    elif bug == "clipping_1pct_over":
        _break_clipping(mp, 1.01)
    elif bug == "noise_reused":
        _reuse_noise(mp)
    else:
        _public_seed_noise(mp)


#: (claimed one-step epsilon, trials per world) per bug: a small audit that catches it
#: with margin (noise off / reused / public and the clipping bugs need no more than 30)
SIZES = {"noise_halved": (4.0, 500)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bug", BUGS)
def test_injected_bug_fails_the_audit(bug: str, mode: str, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    eps, n = SIZES.get(bug, (1.0, 30))
    sigma = sigma_for_epsilon(mode, eps)
    inject(monkeypatch, bug, mode)
    r = whitebox_audit(mode, sigma, releases=n, difference_releases=min(n, 30),
                       confidence=CONF, noise_seed=0)
    assert not r.passed and r.failures
    if bug.startswith("clipping"):
        want = {"clipping_skipped": 2.0 if mode == "paper" else 4.0,
                "clipping_1pct_over": 1.01}[bug]
        assert r.sensitivity_ratio == pytest.approx(want, rel=1e-4)
        assert r.failures[0].startswith("sensitivity")
    else:
        # the statistical bound itself exceeds the accountant's epsilon, with margin
        assert r.epsilon_lower_bound > 1.25 * r.epsilon_accountant


# --------------------------------------------------------------------------- selection
ROOT = Path(__file__).resolve().parents[1]
WB_CONFIG = ROOT / "configs" / "audit_whitebox.yaml"
SMALL = ["--set", "audit.releases=30", "--set", "privacy.noise_seed=0",
         "--set", f"audit.confidence={CONF}", "--set", "audit.one_run_canaries=200"]


@pytest.mark.parametrize("audit_mode", ["whitebox", "one_run"])
def test_audit_command_passes_correct_code_and_fails_a_bug(
        audit_mode: str, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from dplora_ray.audit import AUDIT_FILE, FAILED_PREFIX
    from dplora_ray.audit.modes import AUDIT_FAILED_EXIT
    from dplora_ray.cli import main

    # the one-run theorem's delta term is 2 m delta (...): at confidence 1 - 1e-6 it
    # rejects nothing unless delta << 1e-6 / m (docs/audit.md)
    delta = "1e-5" if audit_mode == "whitebox" else "1e-9"
    args = ["audit", str(WB_CONFIG), "--mode", audit_mode, *SMALL, "--set",
            f"privacy.delta={delta}", "--set", "privacy.mode=local", "--set",
            "privacy.noise_multiplier=8.09"]  # local at 8.09: epsilon 1 at delta 1e-5
    assert main([*args, "--out", str(tmp_path / "ok")]) == 0
    ok = json.loads((tmp_path / "ok" / AUDIT_FILE).read_text())
    assert ok["audit_passed"] is True and ok["audit_mode"] == audit_mode
    if audit_mode == "whitebox":
        assert ok["epsilon_compared"] == pytest.approx(1.0, rel=1e-3)
    assert FAILED_PREFIX not in capsys.readouterr().err

    inject(monkeypatch, "noise_off", "local")
    assert main([*args, "--out", str(tmp_path / "bad")]) == AUDIT_FAILED_EXIT
    bad = json.loads((tmp_path / "bad" / AUDIT_FILE).read_text())
    assert bad["audit_passed"] is False
    assert any(line.startswith(FAILED_PREFIX) for line in capsys.readouterr().err.splitlines())


def test_train_runs_the_selected_audit_after_the_last_round(tmp_path: Path) -> None:
    """``audit.mode=whitebox`` plants nothing and audits the mode at the run's sigma."""
    from dplora_ray import results as R
    from dplora_ray.audit import AUDIT_FILE
    from dplora_ray.config import load_config
    from dplora_ray.federated.runner import run_experiment

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "runtime.backend=inline", "federation.rounds=1", "federation.local_steps=1",
        "privacy.mode=local", "privacy.noise_seed=0", "audit.enabled=true",
        "audit.mode=whitebox", "audit.releases=30", f"audit.confidence={CONF}"])
    summary = run_experiment(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    report = json.loads((tmp_path / "run" / AUDIT_FILE).read_text())
    assert report["whitebox"]["noise_multiplier"] == pytest.approx(summary["noise_multiplier"])
    assert report["audit_passed"] is True and summary[R.AUDIT_PASSED] is True
    assert summary[R.AUDIT_EXPOSURE_MEAN] is None  # nothing was planted
