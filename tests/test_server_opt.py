"""Server optimizers (Reddi et al. 2021): hand-computed steps, the state through a
checkpoint, and runs that resume to the uninterrupted result."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dplora_ray.cli import main
from dplora_ray.config import load_config
from dplora_ray.errors import ConfigError
from dplora_ray.federated.runner import load_checkpoint, run_experiment
from dplora_ray.federated.server_opt import ServerOptimizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def test_fedavg_is_a_plain_step() -> None:
    opt = ServerOptimizer("fedavg", 0.5)
    new, applied = opt.step({"w": _t(1, 1)}, {"w": _t(2, -4)})
    assert torch.equal(new["w"], _t(2, -1)) and torch.equal(applied["w"], _t(1, -2))
    assert opt.state_dict()["m"] == {} and opt.state_dict()["v"] == {}


def test_fedavgm_by_hand() -> None:
    opt = ServerOptimizer("fedavgm", 1.0, momentum=0.5)
    x, _ = opt.step({"w": _t(0.0)}, {"w": _t(2.0)})  # m = 2, x = 2
    x, _ = opt.step(x, {"w": _t(2.0)})  # m = 0.5 * 2 + 2 = 3, x = 5
    assert float(x["w"]) == pytest.approx(5.0)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_steps_by_hand(name: str) -> None:
    # Prepare
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.1
    opt = ServerOptimizer(name, lr, beta1=b1, beta2=b2, tau=tau)
    g1, g2 = 0.5, -0.2

    # Execute
    x, _ = opt.step({"w": _t(0.0)}, {"w": _t(g1)})
    x, _ = opt.step(x, {"w": _t(g2)})

    # Assert: the formulas of Reddi et al. 2021, Alg. 2, v starting at tau^2
    m, v, want = 0.0, tau * tau, 0.0
    for g in (g1, g2):
        m = b1 * m + (1 - b1) * g
        if name == "fedadam":
            v = b2 * v + (1 - b2) * g * g
        else:
            v = v - (1 - b2) * g * g * math.copysign(1.0, v - g * g)
        want += lr * m / (math.sqrt(v) + tau)
    assert float(x["w"]) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi"])
def test_state_survives_a_checkpoint(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [{"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)}
             for _ in range(4)]
    start = {"a": torch.zeros(3, 4), "b": torch.ones(5)}
    straight = ServerOptimizer(name, 0.3)
    x = start
    for g in grads:
        x, _ = straight.step(x, g)
    first = ServerOptimizer(name, 0.3)
    y = start
    for g in grads[:2]:
        y, _ = first.step(y, g)
    second = ServerOptimizer(name, 0.3)
    second.load_state_dict(first.state_dict())
    for g in grads[2:]:
        y, _ = second.step(y, g)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_bad_server_optimizer_settings_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="federation.server_beta2"):
        load_config(TINY, ["federation.server_beta2=1.0"])
    with pytest.raises(ConfigError, match="federation.server_tau"):
        load_config(TINY, ["federation.server_tau=0"])
    with pytest.raises(ConfigError, match="federation.server_optimizer"):
        load_config(TINY, ["federation.server_optimizer=adam"])


@pytest.mark.parametrize("mode", ["dpsgd", "none"])
def test_fedadam_run_resumes_to_the_uninterrupted_result(tmp_path: Path, mode: str) -> None:
    # Prepare: the same run twice, one stopped after round 1 (its worker died under
    # on_client_failure=fail) and resumed; a reproducible noise key so both draw the same
    common = [f"privacy.mode={mode}", "federation.rounds=3", "runtime.backend=inline",
              "federation.server_optimizer=fedadam", "federation.server_learning_rate=0.01",
              "privacy.noise_seed=4"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_experiment(load_config(TINY, common), ref, progress=False, log=lambda m: None)
    with pytest.raises(Exception, match="the run stops after 1 round"):
        run_experiment(load_config(TINY, [*common, "runtime.on_client_failure=fail",
                                          "runtime.kill_worker_at_round=2"]),
                       out, progress=False, log=lambda m: None)
    ck = load_checkpoint(out)
    assert ck["aggregator"]["server_optimizer"]["name"] == "fedadam"
    assert set(ck["aggregator"]["server_optimizer"]["m"]) == set(ck["aggregator"]["global_state"])

    # Execute
    assert main(["train", "--resume", str(out), "--no-progress",
                 "--set", "runtime.kill_worker_at_round=null",
                 "--set", "runtime.on_client_failure=retry"]) == 0

    # Assert: the same adapter bytes; and the server optimizer moved the adapter
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (ref, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_client_sgd_with_momentum_trains_and_differs_from_plain_sgd(tmp_path: Path) -> None:
    common = ["privacy.mode=dpsgd", "runtime.backend=inline", "federation.rounds=1",
              "privacy.noise_seed=2", "federation.learning_rate=0.05"]
    out = {}
    for opt in ("sgd", "sgdm"):
        run_experiment(load_config(TINY, [*common, f"federation.optimizer={opt}"]),
                       tmp_path / opt, progress=False, log=lambda m: None)
        out[opt] = load_file(tmp_path / opt / "adapter" / "adapter_model.safetensors")
    assert not all(torch.equal(out["sgd"][k], out["sgdm"][k]) for k in out["sgd"])
    with pytest.raises(ConfigError, match="federation.client_momentum"):
        load_config(TINY, ["federation.client_momentum=1.5"])
