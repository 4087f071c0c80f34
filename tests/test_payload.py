"""What leaves a client.

Only LoRA tensors (to the aggregator) and scalar metrics (to the driver) travel from a
client; in ``dpsgd``, ``paper`` and ``local`` the tensors are already noised when they
leave, in ``client`` they are clipped (the server adds the noise). No text, token ids or
labels appear in anything a client sends, nor in the results folder.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dplora_ray.config import load_config
from dplora_ray.data import load_data
from dplora_ray.federated.aggregator import Aggregator
from dplora_ray.federated.backends import RuntimeWorker
from dplora_ray.federated.client import ClientJob, ClientResult
from dplora_ray.federated.runner import RunPlan, plan_run, run_experiment, sample_cohorts
from dplora_ray.privacy.streams import NoiseKey

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
TRANSFER = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SCALARS = (int, float, str, type(None))


def _cfg(*overrides: str) -> Any:
    return load_config(TINY, ["runtime.backend=inline", "federation.rounds=2", *overrides])


@pytest.fixture(scope="module")
def plan() -> RunPlan:
    return plan_run(_cfg())


def _needles(plan: RunPlan) -> Iterator[tuple[str, bytes]]:
    """Byte patterns that would betray private data: raw texts, token-id runs (as
    int32 / int64 / text), a client's label sequence (as int64 / text)."""
    cfg = _cfg()
    texts = load_data(cfg.data, cfg.seed).train["text"].tolist()
    for t in texts[:8]:
        yield f"text {t!r}", t.encode()
    split = plan.data.train
    for cid, part in enumerate(plan.parts):
        i = int(part[0])
        ids = split.ids[split.offsets[i]:split.offsets[i + 1]].astype(np.int64)
        mid = len(ids) // 2
        window = ids[max(0, mid - 3):mid + 3]
        yield f"token ids of example {i} (int64)", window.tobytes()
        yield f"token ids of example {i} (int32)", window.astype(np.int32).tobytes()
        yield f"token ids of example {i} (text)", ", ".join(map(str, window)).encode()
        labels = split.labels[part[:16]].astype(np.int64)
        yield f"labels of client {cid} (int64)", labels.tobytes()
        yield f"labels of client {cid} (text)", ", ".join(map(str, labels)).encode()


def _assert_no_private_data(blob: bytes, plan: RunPlan, where: str) -> None:
    for what, needle in _needles(plan):
        assert needle not in blob, f"{what} found in {where}"


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize(("mode", "dtype"), [("none", "float32"), ("dpsgd", "float32"),
                                             ("paper", "float32"), ("client", "float32"),
                                             ("local", "bfloat16")])
def test_clients_send_only_lora_tensors_and_scalars(
        tmp_path: Path, plan: RunPlan, monkeypatch: pytest.MonkeyPatch, mode: str,
        dtype: str) -> None:
    # Prepare: record everything a client returns and everything the aggregator gets
    sent: list[tuple[ClientResult, Any]] = []
    received: list[tuple[list[int], tuple[Any, ...]]] = []
    run_client, step = RuntimeWorker.run_client, Aggregator.step

    def spy_client(self: RuntimeWorker, *args: Any) -> Any:
        out = run_client(self, *args)
        sent.append(out)
        return out

    def spy_step(self: Aggregator, r: int, z: float, k: float, num_examples: list[int],
                 *updates: Any) -> int:
        received.append((list(num_examples), updates))
        return step(self, r, z, k, num_examples, *updates)

    monkeypatch.setattr(RuntimeWorker, "run_client", spy_client)
    monkeypatch.setattr(Aggregator, "step", spy_step)
    out = tmp_path / mode
    cfg = _cfg(f"privacy.mode={mode}", f"federation.transfer_dtype={dtype}")
    worker = RuntimeWorker(cfg, plan.data, 0, in_process=True)
    shapes = {k: tuple(worker.initial_state()[k].shape) for k in worker.trainable_keys()}

    # Execute
    summary = run_experiment(cfg, out, progress=False)

    # Assert: the metrics carry no tensor, array or text field
    assert summary["stop_reason"] == "completed"
    cohort_sizes = [len(c) for c in sample_cohorts(cfg)]  # Poisson in `client` mode
    assert len(sent) == sum(cohort_sizes) > 0
    for meta, update in sent:
        assert isinstance(meta, ClientResult) and meta.update is None
        for f in dataclasses.fields(meta):
            value = getattr(meta, f.name)
            assert isinstance(value, SCALARS) or value == {}, (f.name, type(value))
        # the update: exactly the trainable LoRA tensors, transfer dtype, model shapes
        assert update is not None and sorted(update) == sorted(shapes)
        assert all(".lora_A." in k or ".lora_B." in k for k in update)
        for k, t in update.items():
            assert t.dtype == TRANSFER[dtype] and tuple(t.shape) == shapes[k], k
        if mode == "client":  # clipped on the client, noised on the server
            norm = math.sqrt(sum(float(t.float().pow(2).sum()) for t in update.values()))
            assert norm <= cfg.privacy.clipping_norm * (1 + 1e-5)
    # the aggregator got those updates and nothing else
    assert [len(u) for _, u in received] == cohort_sizes
    got = [u for _, us in received for u in us]
    assert all(any(u is s for _, s in sent) for u in got)
    assert all(isinstance(n, int) for ns, _ in received for n in ns)
    # no private data in what crossed, nor in any file of the results folder
    _assert_no_private_data(pickle.dumps(sent), plan, "what clients sent")
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"rounds.parquet", "clients.parquet", "ledger.json",
                                       "summary.json", "config.yaml", "checkpoint.pt",
                                       "adapter_model.safetensors"}
    for p in files:
        _assert_no_private_data(p.read_bytes(), plan, str(p.relative_to(out)))


def test_the_needles_would_be_found(plan: RunPlan) -> None:
    """The search is not vacuous: each needle is found in a leak of what it stands for."""
    cfg = _cfg()
    split = plan.data.train
    leak = [load_data(cfg.data, cfg.seed).train["text"].tolist(), split.ids,
            split.ids.astype(np.int64), str(split.ids.tolist())]
    leak += [split.labels[p] for p in plan.parts] + [str(split.labels[p].tolist())
                                                     for p in plan.parts]
    blob = pickle.dumps(leak)
    missed = [what for what, needle in _needles(plan) if needle not in blob]
    assert missed == []


# --------------------------------------------------------------------------- noised
@pytest.mark.parametrize("mode", ["dpsgd", "paper", "local"])
def test_updates_are_noised_before_they_leave(plan: RunPlan, mode: str) -> None:
    # Prepare
    cfg = _cfg(f"privacy.mode={mode}")
    worker = RuntimeWorker(cfg, plan.data, 0, in_process=True)
    start = {k: v for k, v in worker.initial_state().items() if k in worker.trainable_keys()}

    def upload(sigma: float) -> dict[str, torch.Tensor]:
        job = ClientJob(client_id=1, indices=plan.parts[1], seed=11, noise_multiplier=sigma,
                        noise_key=NoiseKey.from_seed(11))
        _, update = worker.run_client(start, job, 1, 0)
        return update

    # Execute
    quiet, quiet_again, noisy = upload(0.0), upload(0.0), upload(1.0)

    # Assert: same seed, no noise -> the same upload; with noise it moves
    for k in quiet:
        assert torch.equal(quiet[k], quiet_again[k]), k
    diff = torch.cat([(noisy[k] - quiet[k]).flatten() for k in quiet])
    assert float(diff.abs().max()) > 0
    if mode == "local":  # the upload is clip(update) + N(0, (sigma C)^2), C = 1
        assert float(diff.std()) == pytest.approx(1.0, rel=0.15)
