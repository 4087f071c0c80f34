"""DP-AdamBC (Tang et al. 2024): the step by hand, Adam without noise, the noise variance
each privacy mode hands it, and a private run with it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dplora_ray.config import load_config
from dplora_ray.errors import ConfigError
from dplora_ray.federated.runner import run_experiment
from dplora_ray.privacy import adambc
from dplora_ray.privacy.adambc import DPAdamBC

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _steps(opt_factory, grads: list[list[float]]) -> torch.Tensor:
    p = torch.nn.Parameter(torch.zeros(len(grads[0])))
    opt = opt_factory([p])
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    return p.detach().clone()


def test_step_by_hand_subtracts_the_noise_variance_and_floors() -> None:
    # Prepare: coordinate 0 has v_hat above phi, coordinate 1 below (floored by gamma)
    lr, phi, gamma, b1, b2 = 0.1, 0.04, 1e-4, 0.9, 0.999
    grads = [[0.5, 0.1], [0.3, -0.1]]

    # Execute
    got = _steps(lambda ps: DPAdamBC(ps, lr, noise_variance=phi, gamma=gamma,
                                     betas=(b1, b2)), grads)

    # Assert: Tang et al.'s update, computed in float64
    want, floored = [], []
    for i in range(2):
        m = v = x = 0.0
        for t, g in enumerate((grads[0][i], grads[1][i]), start=1):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
            x -= lr * m_hat / math.sqrt(max(v_hat - phi, gamma))
        want.append(x)
        floored.append(v_hat - phi < gamma)  # at the last step
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    assert floored == [False, True]  # both branches of the max were exercised


def test_without_noise_it_is_adam() -> None:
    grads = [[0.5, -0.2, 3.0], [0.1, 0.4, -1.0], [0.2, 0.2, 0.5]]
    bc = _steps(lambda ps: DPAdamBC(ps, 0.01, noise_variance=0.0, gamma=1e-30), grads)
    adam = _steps(lambda ps: torch.optim.Adam(ps, lr=0.01, eps=0.0), grads)
    torch.testing.assert_close(bc, adam, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kwargs", [{"noise_variance": -1.0}, {"noise_variance": math.nan},
                                    {"noise_variance": 0.0, "gamma": 0.0}])
def test_bad_arguments_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DPAdamBC([torch.nn.Parameter(torch.zeros(1))], 0.1, **kwargs)


def test_config_refuses_a_bad_gamma() -> None:
    with pytest.raises(ConfigError, match="federation.adambc_gamma"):
        load_config(TINY, ["federation.optimizer=dpadambc", "federation.adambc_gamma=0"])


@pytest.mark.parametrize(("mode", "per_batch"), [("dpsgd", True), ("paper", False),
                                                 ("none", None)])
def test_each_mode_hands_it_the_noise_variance_of_the_gradient(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, per_batch: bool | None
) -> None:
    # Prepare: record the noise variance every DPAdamBC is built with
    seen: list[float] = []
    real_init = DPAdamBC.__init__

    def spy(self, params, lr, *, noise_variance, gamma=1e-8, betas=(0.9, 0.999)):
        seen.append(noise_variance)
        real_init(self, params, lr, noise_variance=noise_variance, gamma=gamma, betas=betas)

    monkeypatch.setattr(adambc.DPAdamBC, "__init__", spy)
    sets = [f"privacy.mode={mode}", "runtime.backend=inline", "federation.rounds=1",
            "federation.optimizer=dpadambc", "federation.learning_rate=0.01",
            "privacy.preflight=false"]
    cfg = load_config(TINY, sets)

    # Execute
    summary = run_experiment(cfg, tmp_path / mode, progress=False, log=lambda m: None)

    # Assert: (sigma C / B)^2 for DP-SGD, (sigma C)^2 for the paper's batch-mean noise
    assert summary["rounds_completed"] == 1 and len(seen) == cfg.federation.clients_per_round
    if per_batch is None:
        assert seen == [0.0] * len(seen)
        return
    sigma, C, B = (summary["noise_multiplier"], cfg.privacy.clipping_norm,
                   cfg.federation.batch_size)
    want = (sigma * C / B) ** 2 if per_batch else (sigma * C) ** 2
    assert sigma > 0 and seen == pytest.approx([want] * len(seen), rel=1e-12)
