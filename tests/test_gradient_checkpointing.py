"""``model.gradient_checkpointing`` with Opacus' per-sample hooks, and ``model.dtype``
(issue 18), on tiny-llama (inline, no Ray).

Non-reentrant checkpointing re-runs each decoder layer's forward in the backward pass,
and with it Opacus' activation hooks. Plain ``GradSampleModule`` then counts two
forwards per backward: the per-sample gradients are never promoted to ``grad_sample``
(None) and stale activations pile up. :func:`dplora_ray.hardware.grad_sample_module`
skips the hook in the recomputation; these tests check that the per-sample gradients
then equal those without checkpointing, batch after batch of different sizes, and that a
whole private client run gives the same update.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dplora_ray.config import ExperimentConfig, load_config
from dplora_ray.federated.client import ClientJob, ClientWorker
from dplora_ray.federated.runner import RunPlan, plan_run
from dplora_ray.privacy.streams import NoiseKey

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
DPSGD = ["runtime.backend=inline", "privacy.mode=dpsgd", "privacy.noise_multiplier=0.8",
         "privacy.target_epsilon=null", "lora.dropout=0.1"]
BATCHES = (5, 3, 8, 2)  # several backward passes of different sizes in a row


def _cfg(*overrides: str) -> ExperimentConfig:
    return load_config(TINY, [*DPSGD, *overrides])


@pytest.fixture(scope="module")
def plan() -> RunPlan:
    return plan_run(_cfg())


def _per_sample_grads(worker: ClientWorker, plan: RunPlan) -> list[dict[str, torch.Tensor]]:
    """The per-sample gradients of each batch of :data:`BATCHES` (client 0's first
    examples), from the same nonzero LoRA state."""
    gen = torch.Generator().manual_seed(5)
    state = {k: torch.randn(v.shape, generator=gen) * 0.1
             for k, v in worker.initial_state().items()}
    worker.load_global({k: state[k] for k in worker.trainable_keys()})
    worker.model.train()
    out, start = [], 0
    idx_all = plan.parts[0]
    torch.manual_seed(0)  # the same dropout masks in both workers
    for size in BATCHES:
        idx = idx_all[start:start + size]
        start += size
        for p in worker.trainable_params.values():
            p.grad_sample, p.grad = None, None
        worker.loss(idx).backward()
        got = {}
        for k, p in worker.trainable_params.items():
            assert p.grad_sample is not None, f"no per-sample gradient for {k}"
            got[k] = p.grad_sample.detach().clone()
        out.append(got)
    worker.model.eval()
    return out


@pytest.mark.parametrize("overrides", [(), ("lora.train_a=false",), ("model.dtype=bfloat16",)],
                         ids=["lora", "ffa", "bf16-base"])
def test_per_sample_gradients_equal_with_checkpointing(plan: RunPlan,
                                                       overrides: tuple[str, ...]) -> None:
    # Prepare
    plain = ClientWorker(_cfg(*overrides), plan.data)
    ckpt = ClientWorker(_cfg(*overrides, "model.gradient_checkpointing=true"), plan.data)
    assert ckpt._base().is_gradient_checkpointing

    # Execute
    want, got = _per_sample_grads(plain, plan), _per_sample_grads(ckpt, plan)

    # Assert: same shapes (the batch of each pass), same values, nothing left over
    for size, w, g in zip(BATCHES, want, got):
        assert list(w) == list(g)
        for k in w:
            assert g[k].shape[0] == size and g[k].dtype == torch.float32
            assert torch.allclose(g[k], w[k], atol=1e-6, rtol=0), k
    leftovers = [len(getattr(m, "activations", []) or []) for m in ckpt.model.modules()]
    assert max(leftovers) == 0


def test_plain_opacus_loses_the_per_sample_gradients_under_checkpointing(plan: RunPlan) -> None:
    # Prepare: the same worker with Opacus' own GradSampleModule
    from opacus import GradSampleModule

    worker = ClientWorker(_cfg("model.gradient_checkpointing=true"), plan.data)
    worker.gsm.remove_hooks()
    worker.gsm = GradSampleModule(worker.model, batch_first=True, loss_reduction="mean")
    worker.model.train()

    # Execute
    worker.loss(plan.parts[0][:4]).backward()

    # Assert: what the checkpoint-safe module exists for
    assert all(p.grad_sample is None for p in worker.trainable_params.values())


def _client_update(cfg: ExperimentConfig, plan: RunPlan) -> dict[str, torch.Tensor]:
    worker = ClientWorker(cfg, plan.data)
    init = worker.initial_state()
    result = worker.train_client(
        {k: init[k] for k in worker.trainable_keys()},
        ClientJob(client_id=0, indices=plan.parts[0], seed=3, noise_multiplier=0.8,
                  noise_key=NoiseKey.from_seed(9)))
    assert result.status == "ok" and result.update is not None
    return {k: v.float() for k, v in result.update.items()}


@pytest.mark.parametrize("physical", [None, 3], ids=["one-pass", "micro-batches"])
def test_a_private_client_run_gives_the_same_update_with_checkpointing(
        plan: RunPlan, physical: int | None) -> None:
    # Prepare
    extra = [] if physical is None else [f"runtime.max_physical_batch_size={physical}"]

    # Execute
    want = _client_update(_cfg(*extra), plan)
    got = _client_update(_cfg(*extra, "model.gradient_checkpointing=true"), plan)

    # Assert: bitwise (what lets --resume switch checkpointing on or off)
    assert list(want) == list(got)
    for k in want:
        assert torch.equal(got[k], want[k]), k


# --------------------------------------------------------------------------- model.dtype
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_base_keeps_lora_and_clipping_float32(plan: RunPlan, dtype: str) -> None:
    # Prepare
    from dplora_ray.privacy.dpsgd import Float32ClipDPOptimizer

    worker = ClientWorker(_cfg(f"model.dtype={dtype}", "privacy.clipping_norm=0.01"),
                          plan.data)
    base = worker._base()
    seen: dict[str, object] = {"max": 0.0}
    real = Float32ClipDPOptimizer.clip_and_accumulate

    def recording_clip(self: Float32ClipDPOptimizer) -> None:
        real(self)
        f = self.last_clip_factors
        if f is None or f.numel() == 0:
            return
        sq = torch.zeros(f.shape[0], dtype=torch.float64)
        for p in self.params:
            assert p.grad_sample.dtype == torch.float32
            sq += (p.grad_sample.double() * f.double().view(-1, *[1] * (p.grad_sample.dim() - 1))
                   ).flatten(1).square().sum(1)
        seen["max"] = max(float(seen["max"]), float(sq.sqrt().max()))

    # Execute
    Float32ClipDPOptimizer.clip_and_accumulate = recording_clip  # type: ignore[method-assign]
    try:
        init = worker.initial_state()
        result = worker.train_client(
            {k: init[k] for k in worker.trainable_keys()},
            ClientJob(client_id=0, indices=plan.parts[0], seed=3, noise_multiplier=0.5,
                      noise_key=NoiseKey.from_seed(1)))
    finally:
        Float32ClipDPOptimizer.clip_and_accumulate = real  # type: ignore[method-assign]

    # Assert: a half-precision base, float32 LoRA, clipped norms at most C
    assert base.get_input_embeddings().weight.dtype == getattr(torch, dtype)
    assert all(p.dtype == torch.float32 for p in worker.trainable_params.values())
    assert result.status == "ok"
    assert 0 < float(seen["max"]) <= 0.01 * (1 + 1e-6)


def test_half_precision_base_scores_like_float32(plan: RunPlan) -> None:
    # Prepare
    idx = plan.parts[0][:16]
    losses = {}

    # Execute
    for dtype in ("float32", "bfloat16"):
        worker = ClientWorker(_cfg(f"model.dtype={dtype}"), plan.data)
        with torch.no_grad():
            losses[dtype] = worker.loss(idx).item()

    # Assert: bfloat16 keeps about 3 significant digits
    assert np.isclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
