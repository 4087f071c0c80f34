"""The benchmark suite: ``python -m benchmarks --quick`` produces every figure and the
figures are sane (not timed: the machine is shared); the pieces it relies on (the
client's packed wire format, the LoRA shape counts, the memory sampler) checked by hand.

Hand-computed LoRA sizes (A is r x d_in, B is d_out x r):

* SmolLM2-135M, q,v, per unit of r and layer: q 576 + 576, v 576 + 192 (3 KV heads of
  64); 30 layers: A 30 x 1152 = 34,560, B 30 x 768 = 23,040; r=8: 460,800 parameters.
* LLaMA-2-7B, q,v, r=8: 32 layers x 2 x (8 x 4096 + 4096 x 8) = 4,194,304; A and B
  equal, so FFA-LoRA sends exactly half.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dplora_ray.federated.client import PackedUpdate

REPO = Path(__file__).resolve().parents[1]
HEADLINE_KEYS = ("round_overhead_ratio", "memory_ratio_10000_vs_10", "dp_step_overhead_ratio",
                 "payload_overhead_fraction", "client_updates_per_second",
                 "tokens_per_second_per_worker", "audit_cost_fraction")


def _positive_finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# --------------------------------------------------------------------------- wire format
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_update_round_trips_with_own_storages(dtype: torch.dtype) -> None:
    # Prepare
    gen = torch.Generator().manual_seed(0)
    update = PackedUpdate({f"layers.{i}.q_proj.lora_{ab}.weight":
                           torch.randn(4, 3, generator=gen).to(dtype)
                           for i in range(3) for ab in "AB"})

    # Execute
    back = pickle.loads(pickle.dumps(update, protocol=5))

    # Assert
    assert type(back) is PackedUpdate and list(back) == list(update)
    for k, v in update.items():
        assert back[k].dtype == dtype and torch.equal(back[k], v)
    assert len({t.untyped_storage().data_ptr() for t in back.values()}) == len(back)


def test_packed_update_mixed_dtypes_and_empty_fall_back_to_a_plain_dict() -> None:
    # Prepare
    mixed = PackedUpdate({"a": torch.ones(2), "b": torch.ones(2, dtype=torch.float64)})

    # Execute
    back, empty = pickle.loads(pickle.dumps(mixed)), pickle.loads(pickle.dumps(PackedUpdate()))

    # Assert
    assert back["b"].dtype == torch.float64 and torch.equal(back["a"], mixed["a"])
    assert empty == {}


def test_smollm2_shapes_and_payload_overhead_below_one_percent() -> None:
    from benchmarks.communication import QV, at_rank, lora_shapes, payload_overhead

    # Execute
    shapes, full = lora_shapes("SmolLM2-135M", QV, 1)
    a = sum(s[0] * s[1] for k, s in shapes.items() if ".lora_A." in k)
    b = sum(s[0] * s[1] for k, s in shapes.items() if ".lora_B." in k)
    payload = payload_overhead(at_rank(shapes, 8), torch.float32)

    # Assert
    assert (a, b) == (34_560, 23_040)
    assert full == 134_515_008  # SmolLM2-135M, tied embeddings counted once
    assert payload["raw_bytes"] == 4 * 460_800
    assert 0 <= payload["overhead_fraction"] < 0.01
    assert payload["plain_dict_overhead_fraction"] > payload["overhead_fraction"]


# --------------------------------------------------------------------------- sampler
def test_memory_sampler_sees_a_child_process() -> None:
    from benchmarks.common import MemorySampler

    # Prepare: a child that holds ~200 MB
    code = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); " \
           "time.sleep(3)"

    # Execute
    with MemorySampler(interval=0.05) as sampler:
        base = sampler.last_bytes
        child = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(2.0)
        child.wait(timeout=30)

    # Assert
    assert sampler.peak_bytes - base > 150 * 2**20
    assert sampler.peak_processes >= 2 and sampler.peak_roles["driver"] > 0


# --------------------------------------------------------------------------- the suite
@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    res["_stdout"] = proc.stdout
    return res


def test_quick_run_produces_every_headline_figure(quick: dict[str, Any]) -> None:
    assert not quick["errors"]
    for key in HEADLINE_KEYS:
        assert key in quick, key
    for key in ("round_overhead_ratio", "memory_ratio_10000_vs_10", "dp_step_overhead_ratio"):
        assert _positive_finite(quick[key]), (key, quick[key])
    assert 0 <= quick["payload_overhead_fraction"] < 0.01
    for key in ("client_updates_per_second", "tokens_per_second_per_worker"):
        assert set(quick[key]) == {"1", "2"}
        assert all(_positive_finite(v) for v in quick[key].values()), quick[key]
    assert "tiny-llama" in quick["labels"]["dp_step_overhead_ratio"]
    assert "tiny-llama" in quick["labels"]["tokens_per_second_per_worker"]
    assert quick["machine"]["cores"] >= 1 and len(quick["machine"]["load_average_1_5_15"]) == 3
    assert "Headline figures" in quick["_stdout"]


def test_quick_round_overhead_breakdown_adds_up(quick: dict[str, Any]) -> None:
    ro = quick["details"]["round_overhead"]
    assert ro["runner"]["ratio"] == quick["round_overhead_ratio"]
    for mode, h in ro["harness"].items():
        gap = h["mean_round_wall_seconds"] - h["mean_round_ideal_seconds"]
        assert math.isclose(sum(h["overhead_seconds"].values()), gap, abs_tol=1e-6), mode
        assert h["ratio"] > 0.5 and h["mean_client_seconds"] > 0
    assert ro["serialization_offline"]["update_type"] == "PackedUpdate"


def test_quick_memory_runs_are_complete(quick: dict[str, Any]) -> None:
    mem = quick["details"]["memory"]
    assert [r["num_clients"] for r in mem["runs"]] == mem["populations"]
    for r in mem["runs"]:
        assert r["peak_rss_bytes"] >= r["baseline_rss_bytes"] > 0
        assert r["rounds"] >= 1 and r["startup_seconds"] > 0
    assert math.isclose(mem["ratio"], mem["runs"][-1]["peak_rss_bytes"]
                        / mem["runs"][0]["peak_rss_bytes"])


def test_quick_dp_modes_agree(quick: dict[str, Any]) -> None:
    dp = quick["details"]["dp_overhead"]
    assert set(dp["step_seconds"]) >= {"none", "hooks"}
    assert dp["train_client_per_step"]["ratio"] > 0
    if dp["ghost_usable"]:
        assert dp["ghost_vs_hooks_relative_gradient_difference"] < 1e-4
    else:
        assert dp["ghost_error"]


def test_quick_communication_table_is_consistent(quick: dict[str, Any]) -> None:
    rows = quick["details"]["communication"]["rows"]
    llama_qv = [r for r in rows if r["model"] == "LLaMA-2-7B" and r["targets"] == "q,v"]
    assert llama_qv
    for r in rows:
        assert r["standard_float32_bytes"] == 4 * r["lora_parameters"]
        assert r["standard_bfloat16_bytes"] * 2 == r["standard_float32_bytes"]
        assert r["ffa_bfloat16_bytes"] * 2 == r["ffa_float32_bytes"]
        assert r["ffa_float32_bytes"] < r["standard_float32_bytes"]
        assert r["standard_float32_bytes"] < r["full_finetune_float32_bytes"]
    for r in llama_qv:  # square q and v: A and B have equal size
        assert r["ffa_float32_bytes"] * 2 == r["standard_float32_bytes"]
        assert r["lora_parameters"] == r["r"] * 32 * 2 * (4096 + 4096)


def test_quick_gpu_is_measured_or_says_why(quick: dict[str, Any]) -> None:
    g = quick["details"]["gpu"]
    if g["measured"]:
        assert all(_positive_finite(v) for v in g["tokens_per_second_per_worker"].values())
    else:
        assert "no GPU" in g["reason"]


def test_quick_audit_cost_is_measured(quick: dict[str, Any]) -> None:
    ac = quick["details"]["audit_cost"]
    assert math.isfinite(quick["audit_cost_fraction"])
    assert quick["audit_cost_fraction"] == ac["audit_cost_fraction"]
    assert _positive_finite(ac["audit_seconds"]) and ac["audit_off_has_no_audit_figures"]
    assert 0 < ac["audit_seconds_fraction_of_run"] < 1
