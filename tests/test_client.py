"""Client worker (inline, no Ray): payload and byte counts, determinism, plain training,
DP-SGD per-sample gradients and empty Poisson batches, the privacy preflight, and the
rejection of non-finite updates.

tiny-llama (2 layers, hidden 32, 2 KV heads) with LoRA r=4 on q_proj and v_proj has per
layer q: A 4x32 + B 32x4 = 256, v: A 4x32 + B 16x4 = 192, so 896 trainable LoRA
parameters in all, 384 of them in the B factors (FFA-LoRA).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dplora_ray.config import ExperimentConfig, load_config
from dplora_ray.errors import PreflightError
from dplora_ray.federated.client import ClientJob, ClientResult, ClientWorker
from dplora_ray.federated.runner import RunPlan, plan_run
from dplora_ray.privacy.streams import NoiseKey

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
TRAINABLE = 896
TRAINABLE_B = 384
LOCAL_STEPS = 3  # configs/tiny.yaml


def _cfg(*overrides: str) -> ExperimentConfig:
    return load_config(TINY, ["runtime.backend=inline", *overrides])


@pytest.fixture(scope="module")
def plan() -> RunPlan:
    return plan_run(_cfg())


@pytest.fixture(scope="module")
def make_worker(plan: RunPlan) -> Callable[..., ClientWorker]:
    cache: dict[tuple[str, ...], ClientWorker] = {}

    def make(*overrides: str) -> ClientWorker:
        if overrides not in cache:
            cache[overrides] = ClientWorker(_cfg(*overrides), plan.data)
        return cache[overrides]

    return make


def _start(worker: ClientWorker) -> dict[str, torch.Tensor]:
    init = worker.initial_state()
    return {k: init[k] for k in worker.trainable_keys()}


def _job(plan: RunPlan, client_id: int = 0, seed: int = 11, sigma: float = 0.0) -> ClientJob:
    return ClientJob(
        client_id=client_id, indices=plan.parts[client_id], seed=seed, noise_multiplier=sigma,
        noise_key=NoiseKey.from_seed(seed),
    )


def _payload_bytes(update: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in update.values())


# --------------------------------------------------------------------------- payload
@pytest.mark.parametrize(
    ("dtype", "element_size"), [("float32", 4), ("bfloat16", 2), ("float16", 2)]
)
def test_bytes_up_counts_the_payload(
    plan: RunPlan, make_worker: Callable[..., ClientWorker], dtype: str, element_size: int
) -> None:
    # Prepare
    worker = make_worker(f"federation.transfer_dtype={dtype}")

    # Execute
    result = worker.train_client(_start(worker), _job(plan))

    # Assert
    assert result.status == "ok" and result.update is not None
    assert all(t.dtype == getattr(torch, dtype) for t in result.update.values())
    assert result.bytes_up == _payload_bytes(result.update) == TRAINABLE * element_size


def test_payload_keys_are_the_trainable_lora_keys(
    plan: RunPlan, make_worker: Callable[..., ClientWorker]
) -> None:
    # Prepare
    worker = make_worker()

    # Execute
    result = worker.train_client(_start(worker), _job(plan))

    # Assert
    assert result.update is not None
    assert list(result.update) == worker.trainable_keys()
    assert len(result.update) == 8
    assert all(".lora_A." in k or ".lora_B." in k for k in result.update)


def test_ffa_payload_holds_only_b(plan: RunPlan, make_worker: Callable[..., ClientWorker]) -> None:
    # Prepare
    worker = make_worker("lora.train_a=false")

    # Execute
    result = worker.train_client(_start(worker), _job(plan))

    # Assert
    assert result.update is not None
    assert len(result.update) == 4
    assert all(".lora_B." in k for k in result.update)
    assert sum(t.numel() for t in result.update.values()) == TRAINABLE_B
    assert result.bytes_up == TRAINABLE_B * 4


def test_result_carries_no_data(plan: RunPlan, make_worker: Callable[..., ClientWorker]) -> None:
    # Prepare
    worker = make_worker()
    job = _job(plan)

    # Execute
    result = worker.train_client(_start(worker), job)

    # Assert: LoRA tensors and scalars only; no token ids, labels or indices
    assert result.update is not None
    for k, v in result.update.items():
        assert "lora_" in k and isinstance(v, torch.Tensor)
    for f in dataclasses.fields(ClientResult):
        value = getattr(result, f.name)
        if f.name == "update":
            continue
        assert isinstance(value, (int, float, str, dict)), f.name
    assert result.extras == {}
    assert result.num_examples == len(job.indices)
    assert result.steps == LOCAL_STEPS


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize(
    "overrides",
    [
        ("lora.dropout=0.1",),
        ("privacy.mode=dpsgd",),
        ("privacy.mode=paper",),
        ("privacy.mode=local",),
    ],
    ids=["none-dropout", "dpsgd", "paper", "local"],
)
def test_same_job_gives_the_same_update(
    plan: RunPlan, make_worker: Callable[..., ClientWorker], overrides: tuple[str, ...]
) -> None:
    # Prepare
    worker = make_worker(*overrides)
    start = _start(worker)

    # Execute
    first = worker.train_client(start, _job(plan, sigma=1.0))
    again = worker.train_client(start, _job(plan, sigma=1.0))
    other = worker.train_client(start, _job(plan, seed=12, sigma=1.0))

    # Assert
    assert first.update is not None and again.update is not None and other.update is not None
    for k in first.update:
        assert torch.equal(first.update[k], again.update[k]), k
    assert any(not torch.equal(first.update[k], other.update[k]) for k in first.update)


def test_training_does_not_touch_the_global_rng(
    plan: RunPlan, make_worker: Callable[..., ClientWorker]
) -> None:
    # Prepare
    worker = make_worker("privacy.mode=dpsgd")
    torch.manual_seed(5)
    before = torch.random.get_rng_state()

    # Execute
    worker.train_client(_start(worker), _job(plan, sigma=1.0))

    # Assert
    assert torch.equal(torch.random.get_rng_state(), before)


def test_initial_state_is_the_seeded_init_after_training(
    plan: RunPlan, make_worker: Callable[..., ClientWorker]
) -> None:
    # Prepare: a fresh model with the same seed holds the seeded init
    from dplora_ray.models import build_lora_model, load_base_model, lora_state

    worker = make_worker()
    cfg = _cfg()
    base, _ = load_base_model(cfg.model)
    expected = lora_state(build_lora_model(base, cfg.lora, seed=cfg.seed), trainable_only=False)

    # Execute
    worker.train_client(_start(worker), _job(plan))
    init = worker.initial_state()

    # Assert
    assert list(init) == list(expected)
    for k in expected:
        assert torch.equal(init[k], expected[k]), k


# --------------------------------------------------------------------------- training
def _client_loss(worker: ClientWorker, state: dict[str, torch.Tensor], idx: np.ndarray) -> float:
    worker._load_global(state)
    with torch.no_grad():
        return float(worker._loss(idx))


def test_plain_training_reduces_the_client_loss(
    plan: RunPlan, make_worker: Callable[..., ClientWorker]
) -> None:
    # Prepare: one client, server step = its update, 8 rounds of 3 local steps
    worker = make_worker()
    state = _start(worker)
    idx = plan.parts[0]
    before = _client_loss(worker, state, idx)

    # Execute
    for r in range(8):
        result = worker.train_client(state, _job(plan, seed=100 + r))
        assert result.update is not None
        state = {k: v + result.update[k].float() for k, v in state.items()}
    after = _client_loss(worker, state, idx)

    # Assert
    assert math.isfinite(result.train_loss)
    assert after < before - 0.02, (before, after)


def test_client_mode_clips_the_update(
    plan: RunPlan, make_worker: Callable[..., ClientWorker]
) -> None:
    # Prepare: configs/tiny.yaml's learning rate moves LoRA by more than C = 0.05
    worker = make_worker("privacy.mode=client", "privacy.clipping_norm=0.05")

    # Execute
    result = worker.train_client(_start(worker), _job(plan))

    # Assert: update_norm is the norm before clipping; the payload is clipped to C
    assert result.update is not None
    norm = float(torch.linalg.vector_norm(torch.cat([t.flatten() for t in result.update.values()])))
    assert result.update_norm > 0.05
    assert math.isclose(norm, 0.05, rel_tol=1e-5)


# --------------------------------------------------------------------------- DP-SGD
def test_opacus_per_sample_gradients_match_a_per_example_loop(
    plan: RunPlan, make_worker: Callable[..., ClientWorker]
) -> None:
    # Prepare: four examples of different lengths (so the batch is padded)
    worker = make_worker("privacy.mode=dpsgd")
    worker._load_global(_start(worker))
    gsm = worker.gsm
    assert gsm is not None
    idx = plan.parts[0][:4]
    params = worker._params

    # Execute: Opacus' per-sample gradients of the mean loss over the batch (its hooks
    # only record in training mode)
    worker.model.train()
    try:
        gsm.zero_grad(set_to_none=True)
        worker._loss(idx).backward()
        per_sample = {k: p.grad_sample.detach().clone() for k, p in params.items()}
        # ... and plain autograd, one example at a time
        looped: dict[str, list[torch.Tensor]] = {k: [] for k in params}
        for i in idx:
            gsm.zero_grad(set_to_none=True)
            worker._loss(np.array([i])).backward()
            for k, p in params.items():
                looped[k].append(p.grad.detach().clone())
    finally:
        gsm.zero_grad(set_to_none=True)
        worker.model.eval()

    # Assert
    assert len(set(plan.data.train.lengths()[idx].tolist())) > 1
    for k in params:
        expected = torch.stack(looped[k])
        assert per_sample[k].shape == (4, *params[k].shape)
        assert torch.allclose(per_sample[k], expected, atol=1e-6, rtol=0), k


@pytest.mark.parametrize("mode", ["dpsgd", "paper"])
def test_empty_poisson_batches_take_noise_only_steps(
    plan: RunPlan,
    make_worker: Callable[..., ClientWorker],
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    # Prepare: every sampled batch is empty
    worker = make_worker(f"privacy.mode={mode}")

    def empty(job: ClientJob, rng: np.random.Generator, rate: float) -> Iterator[np.ndarray]:
        for _ in range(LOCAL_STEPS):
            yield np.array([], dtype=np.int64)

    monkeypatch.setattr(worker, "_poisson_batches", empty)

    # Execute
    result = worker.train_client(_start(worker), _job(plan, sigma=1.0))

    # Assert: completed, noise moved every tensor, no loss was measured
    assert result.status == "ok" and result.update is not None
    assert all(bool((t != 0).any()) for t in result.update.values())
    assert math.isnan(result.train_loss)
    assert result.steps == LOCAL_STEPS
    assert result.sampling_rate == pytest.approx(8 / len(plan.parts[0]))


@pytest.mark.parametrize("mode", ["dpsgd", "paper"])
def test_preflight_passes_and_restores_parameters(
    make_worker: Callable[..., ClientWorker], mode: str
) -> None:
    # Prepare
    worker = make_worker(f"privacy.mode={mode}")
    before = {k: p.detach().clone() for k, p in worker._params.items()}

    # Execute
    info = worker.preflight()

    # Assert
    assert info == {"checked_tensors": 8, "mode": mode}
    for k, p in worker._params.items():
        assert torch.equal(p.detach(), before[k]), k


@pytest.mark.parametrize("mode", ["dpsgd", "paper"])
def test_preflight_fails_when_a_lora_tensor_gets_no_gradient(
    plan: RunPlan, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # Prepare: one trainable tensor stops receiving gradients but is still sent (a fresh
    # worker: a failed Opacus backward leaves its hooks unusable)
    worker = ClientWorker(_cfg(f"privacy.mode={mode}"), plan.data)
    key = worker.trainable_keys()[0]
    monkeypatch.setattr(worker._params[key], "requires_grad", False)

    # Execute
    with pytest.raises(PreflightError) as info:
        worker.preflight()

    # Assert
    assert f"privacy preflight ({mode}) failed" in str(info.value)
    assert f"first: {key}: no " in str(info.value)


@pytest.mark.parametrize(
    ("mode", "what"), [("dpsgd", "no per-sample gradient"), ("paper", "no gradient")]
)
def test_preflight_fails_for_lora_outside_the_classifier_path(
    plan: RunPlan, mode: str, what: str
) -> None:
    # Prepare: the classifier reads lm_head's weight rows directly, so LoRA on lm_head
    # would never be trained (nor protected)
    worker = ClientWorker(
        _cfg(f"privacy.mode={mode}", "lora.target_modules=[q_proj, v_proj, lm_head]"), plan.data
    )

    # Execute
    with pytest.raises(PreflightError) as info:
        worker.preflight()

    # Assert: exactly lm_head's A and B
    assert str(info.value) == (
        f"privacy preflight ({mode}) failed for 2 LoRA tensor(s); "
        f"first: base_model.model.lm_head.lora_A.weight: {what}"
    )


# --------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("mode", ["none", "dpsgd", "local"])
def test_non_finite_update_is_rejected(
    plan: RunPlan,
    make_worker: Callable[..., ClientWorker],
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    # Prepare: the loss turns NaN, so the step poisons the LoRA tensors
    worker = make_worker(f"privacy.mode={mode}")
    loss = worker._loss
    monkeypatch.setattr(worker, "_loss", lambda idx: loss(idx) * float("nan"))

    # Execute
    result = worker.train_client(_start(worker), _job(plan, sigma=1.0))

    # Assert
    assert result.status == "rejected_nonfinite"
    assert result.update is None
    assert result.bytes_up == 0
    assert not math.isfinite(result.update_norm)
