"""Logical and physical batches (issue 14, item 1): ``runtime.max_physical_batch_size``
splits each sampled batch into micro-batches with gradient accumulation; the update, the
noise and the accounting are those of the one logical batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dplora_ray.config import load_config
from dplora_ray.federated.client import ClientJob, ClientWorker
from dplora_ray.federated.runner import plan_run, run_experiment
from dplora_ray.privacy.streams import NoiseKey

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _update(mode: str, physical: int | None, sigma: float) -> tuple[dict[str, torch.Tensor],
                                                                    float, int]:
    over = [f"privacy.mode={mode}", "runtime.backend=inline", "federation.batch_size=16",
            "federation.local_steps=3", "federation.optimizer=sgd"]
    if physical is not None:
        over.append(f"runtime.max_physical_batch_size={physical}")
    cfg = load_config(TINY, over)
    plan = plan_run(cfg)
    worker = ClientWorker(cfg, plan.data)
    start = worker.initial_state()
    start = {k: start[k] for k in worker.trainable_keys()}
    res = worker.train_client(start, ClientJob(
        client_id=0, indices=plan.parts[0], seed=17, noise_multiplier=sigma,
        noise_key=NoiseKey.from_seed(3)))
    assert res.status == "ok" and res.update is not None
    return dict(res.update), res.train_loss, res.steps


@pytest.mark.parametrize(("mode", "sigma"), [("dpsgd", 0.8), ("paper", 0.8), ("none", 0.0)])
def test_micro_batches_give_the_logical_batch(mode: str, sigma: float) -> None:
    # Execute: batches of about 16 examples in one pass, in passes of 5 and of 1
    whole, loss, steps = _update(mode, None, sigma)
    results = [_update(mode, p, sigma) for p in (5, 1)]

    # Assert: the same update to float rounding, the same mean loss
    for split, split_loss, split_steps in results:
        assert split_steps == steps
        assert split_loss == pytest.approx(loss, rel=1e-5)
        for k in whole:
            assert torch.allclose(split[k], whole[k], rtol=1e-5, atol=1e-6), k
    assert any(float(v.abs().max()) > 1e-4 for v in whole.values())  # it did train


def test_a_run_with_micro_batches_charges_the_same(tmp_path: Path) -> None:
    common = ["privacy.mode=dpsgd", "runtime.backend=inline", "federation.rounds=2",
              "privacy.noise_seed=5"]
    a = run_experiment(load_config(TINY, common), tmp_path / "a", progress=False,
                       log=lambda m: None)
    b = run_experiment(load_config(TINY, [*common, "runtime.max_physical_batch_size=3"]),
                       tmp_path / "b", progress=False, log=lambda m: None)
    assert a["epsilon"] == b["epsilon"]
    entries = [json.loads((tmp_path / d / "ledger.json").read_text())["entries"]
               for d in ("a", "b")]
    assert entries[0] == entries[1]
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
