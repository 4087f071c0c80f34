"""Vanilla FL (``federation.strategy=full``, issue 7): FedAvg of the whole model, the
paper's non-private communication reference. Checked: the bytes a client sends are every
parameter once (tied embeddings once) in float32, the server's new model is the
example-weighted mean of the clients' full-model updates recomputed here, the saved model
folder loads and holds that state, ternary compression works on full-model updates
(T-FedAvg as Xu et al. ran it), and the config refuses private or audited full runs.

tiny-llama has 33,472 parameters (the LM head is tied to the embeddings), so a full
update is 133,888 bytes in float32 against 3,584 for LoRA r=4 on q/v.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dplora_ray.config import load_config
from dplora_ray.errors import ConfigError
from dplora_ray.federated.client import ClientJob, ClientWorker
from dplora_ray.federated.compression import ternary_bytes
from dplora_ray.federated.runner import derive_seed, plan_run, run_experiment

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
PARAMS = 33_472


def _cfg(*overrides: str):
    return load_config(TINY, ["runtime.backend=inline", "federation.strategy=full",
                              *overrides])


def test_full_update_bytes_are_every_parameter_once(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from dplora_ray.models import prepare_model

    cfg = _cfg("federation.rounds=2")
    source = prepare_model(cfg.model)
    base = AutoModelForCausalLM.from_pretrained(source)
    assert sum(p.numel() for p in base.parameters()) == PARAMS  # tied: counted once

    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    clients = pd.read_parquet(tmp_path / "run" / "clients.parquet")
    assert (clients["bytes_up"] == 4 * PARAMS).all()
    assert (clients["bytes_down"] == 4 * PARAMS).all()
    assert summary["bytes_up_total"] == 2 * 3 * 4 * PARAMS  # rounds x cohort x bytes
    assert summary["trainable_parameters"] == PARAMS
    assert not (tmp_path / "run" / "adapter").exists()


def test_server_model_is_the_weighted_mean_of_full_updates(tmp_path: Path) -> None:
    # Prepare: one round, recomputing each client's update with its own seed
    cfg = _cfg("federation.rounds=1", "federation.learning_rate=0.01")
    plan = plan_run(cfg)
    worker = ClientWorker(cfg, plan.data)
    start = worker.initial_state()
    updates, weights = [], []
    for cid in plan.cohorts[0]:
        job = ClientJob(client_id=int(cid), indices=plan.parts[int(cid)],
                        seed=derive_seed(cfg.seed, 2, 1, int(cid)))
        res = worker.train_client(start, job)
        assert res.update is not None and len(res.update) == len(start)
        updates.append(res.update)
        weights.append(len(plan.parts[int(cid)]))
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    expected = {k: start[k] + sum(float(wi) * u[k] for wi, u in zip(w, updates))
                for k in start}

    # Execute
    run_experiment(cfg, tmp_path / "run", progress=False)

    # Assert: the saved model holds exactly that state
    from transformers import AutoModelForCausalLM

    saved = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
                 .named_parameters())
    moved = 0
    for k, v in expected.items():
        assert torch.allclose(saved[k].detach(), v, atol=1e-6), k
        moved += int(not torch.equal(v, start[k]))
    assert moved > len(expected) // 2  # most weights changed: the whole model trains


def test_ternary_full_model_updates(tmp_path: Path) -> None:
    # T-FedAvg as published: ternary codes of the whole model's update
    from transformers import AutoModelForCausalLM

    from dplora_ray.models import prepare_model

    cfg = _cfg("federation.rounds=1", "federation.compression=ternary")
    base = AutoModelForCausalLM.from_pretrained(prepare_model(cfg.model))
    per_client = sum(ternary_bytes(p.numel()) for p in base.parameters())
    run_experiment(cfg, tmp_path / "run", progress=False)
    clients = pd.read_parquet(tmp_path / "run" / "clients.parquet")
    assert (clients["bytes_up"] == per_client).all()
    assert per_client < 4 * PARAMS / 15  # 2 bits per weight + a scale per tensor


@pytest.mark.parametrize(("overrides", "key"), [
    (["privacy.mode=dpsgd"], "federation.strategy"),
    (["audit.enabled=true"], "audit.enabled"),
])
def test_config_refuses_private_or_audited_full_runs(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _cfg(*overrides)
    assert info.value.key == key and "\n" not in str(info.value)
