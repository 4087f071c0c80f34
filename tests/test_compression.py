"""Communication-efficient baselines (issue 7, non-private): T-FedAvg ternary updates
(quantisation arithmetic, 2-bit packing, wire bytes, server-side dequantisation) and CMFL
(sign relevance, the skip decision, the aggregator's last update), each checked by hand
and in an end-to-end tiny run.

tiny-llama with LoRA r=4 on q_proj/v_proj has, per layer, tensors of 128 (q A), 128
(q B), 128 (v A) and 64 (v B) entries: 896 in all, 3584 bytes as float32. Ternary:
ceil(n/4) + 4 bytes each = 36 + 36 + 36 + 20 = 128 per layer, 256 per client-round.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from dplora_ray.cli import main
from dplora_ray.config import load_config
from dplora_ray.errors import ConfigError
from dplora_ray.federated.aggregator import Aggregator
from dplora_ray.federated.client import PackedUpdate, tensor_bytes
from dplora_ray.federated.compression import (
    cmfl_relevance,
    cmfl_should_upload,
    pack_codes,
    ternary_bytes,
    ternary_decode,
    ternary_encode,
    ternary_quantize,
    unpack_codes,
)
from dplora_ray.privacy.streams import NoiseKey

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
FLOAT32_BYTES = 3584
TERNARY_BYTES = 256

# mean|u| = 2.25 / 7, Delta = 0.7 * 2.25 / 7 = 0.225: entries 0.5, -0.9, 0.3, -0.4 are
# above it, so a = 2.1 / 4 = 0.525 and t = [1, 0, 0, -1, 1, 0, -1]
U = torch.tensor([0.5, -0.1, 0.0, -0.9, 0.3, 0.05, -0.4])
T = [1, 0, 0, -1, 1, 0, -1]
A = 0.525


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ------------------------------------------------------------------------- ternary
def test_ternary_quantize_by_hand() -> None:
    # Execute
    t, scale = ternary_quantize(U)
    # Assert
    assert t.tolist() == T and t.dtype == torch.int8
    assert scale == pytest.approx(A)


def test_ternary_all_zero_tensor_has_zero_scale() -> None:
    t, scale = ternary_quantize(torch.zeros(5))
    assert t.tolist() == [0] * 5 and scale == 0.0


def test_pack_codes_by_hand_and_round_trip() -> None:
    # Prepare: codes 0 -> 0, +1 -> 1, -1 -> 2; entry i in bits 2*(i%4)
    t = torch.tensor(T, dtype=torch.int8)
    # Execute
    packed = pack_codes(t)
    # Assert: [1,0,0,2] -> 1 + 2*64 = 129; [1,0,2,pad 0] -> 1 + 2*16 = 33
    assert packed.dtype == torch.uint8 and packed.tolist() == [129, 33]
    assert unpack_codes(packed, 7).tolist() == T
    rand = torch.randint(-1, 2, (4, 9), generator=torch.Generator().manual_seed(0))
    back = unpack_codes(pack_codes(rand.to(torch.int8)), rand.numel()).reshape(4, 9)
    assert torch.equal(back.long(), rand)


def test_encode_decode_and_real_payload_bytes() -> None:
    # Prepare
    update = {"x": U, "y": torch.tensor([[2.0, -2.0], [0.0, 1.0]])}
    template = {"x": torch.zeros(7), "y": torch.zeros(2, 2)}
    # Execute
    payload = PackedUpdate(ternary_encode(update))
    decoded = ternary_decode(payload, template)
    # Assert: y: mean|y| = 1.25, Delta = 0.875, a = (2 + 2 + 1) / 3
    assert torch.allclose(decoded["x"], torch.tensor(T, dtype=torch.float32) * A)
    assert torch.allclose(decoded["y"], torch.tensor([[1.0, -1.0], [0.0, 1.0]]) * 5 / 3)
    assert tensor_bytes(payload) == ternary_bytes(7) + ternary_bytes(4) == (2 + 4) + (1 + 4)


def test_aggregator_dequantises_ternary_payloads() -> None:
    # Prepare: two clients, weights 1 and 3 (FedAvg)
    agg = Aggregator({"x": torch.zeros(7)}, mode="none", server_learning_rate=1.0,
                     clipping_norm=1.0, noise_key=NoiseKey.from_seed(0))
    u1, u2 = ternary_encode({"x": U}), ternary_encode({"x": -2 * U})
    # Execute
    agg.step(1, 0.0, 2.0, [1, 3], u1, u2)
    # Assert: (1 * A t + 3 * (-2A) t) / 4 = -1.25 A t
    expected = torch.tensor(T, dtype=torch.float32) * (-1.25 * A)
    assert torch.allclose(agg.get_state()["x"], expected)


# ------------------------------------------------------------------------- CMFL
def test_cmfl_relevance_and_skip_by_hand() -> None:
    # Prepare: signs agree on a[0], a[2] (both 0), b[0], b[1]: 4 of 6
    update = {"a": _t(1, -2, 0, 3), "b": _t(-1, 1)}
    last = {"a": _t(2, 2, 0, -1), "b": _t(-3, 4)}
    # Execute / Assert
    assert cmfl_relevance(update, last) == pytest.approx(4 / 6)
    assert cmfl_should_upload(update, last, 0.6) == (True, pytest.approx(4 / 6))
    assert cmfl_should_upload(update, last, 0.7)[0] is False
    assert cmfl_should_upload(update, None, 1.0) == (True, None)  # first round


def test_aggregator_keeps_last_update_and_state_on_empty_round() -> None:
    # Prepare
    agg = Aggregator({"x": _t(1, 1)}, mode="none", server_learning_rate=0.5,
                     clipping_norm=1.0, noise_key=NoiseKey.from_seed(0), keep_last_update=True)
    assert agg.get_last_update() is None
    # Execute
    agg.step(1, 0.0, 2.0, [1, 1], {"x": _t(2, -4)}, {"x": _t(0, 0)})
    agg.step(2, 0.0, 2.0, [])  # nobody uploaded
    # Assert: mean (1, -2), times 0.5
    assert torch.allclose(agg.get_last_update()["x"], _t(0.5, -1))
    assert torch.allclose(agg.get_state()["x"], _t(1.5, 0))
    restored = Aggregator({"x": _t(0, 0)}, mode="none", server_learning_rate=0.5,
                          clipping_norm=1.0, noise_key=NoiseKey.from_seed(0), keep_last_update=True)
    restored.restore(agg.checkpoint())
    assert torch.allclose(restored.get_last_update()["x"], _t(0.5, -1))
    plain = Aggregator({"x": _t(1, 1)}, mode="none", server_learning_rate=1.0,
                       clipping_norm=1.0, noise_key=NoiseKey.from_seed(0))
    plain.step(1, 0.0, 1.0, [1], {"x": _t(1, 1)})
    assert plain.get_last_update() is None and "last_update" not in plain.checkpoint()


# ------------------------------------------------------------------------- config
def test_config_compression_needs_no_privacy_and_threshold_in_range() -> None:
    assert load_config(TINY).federation.compression == "none"
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["federation.compression=ternary", "privacy.mode=dpsgd"])
    assert err.value.key == "federation.compression"
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["federation.cmfl_threshold=1.5"])
    assert err.value.key == "federation.cmfl_threshold"


# ------------------------------------------------------------------------- end to end
def _train(out: Path, *sets: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    args = ["train", str(TINY), "--set", "runtime.backend=inline"]
    for s in sets:
        args += ["--set", s]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    return pd.read_parquet(out / "rounds.parquet"), pd.read_parquet(out / "clients.parquet")


def test_ternary_run_bytes_up(tmp_path: Path) -> None:
    # Execute
    rounds, clients = _train(tmp_path / "t", "federation.compression=ternary")
    # Assert
    assert (clients["status"] == "ok").all()
    assert (clients["bytes_up"] == TERNARY_BYTES).all()
    assert (rounds["bytes_up"] == TERNARY_BYTES * rounds["num_clients_completed"]).all()
    assert rounds["eval_loss"].notna().all()


def test_cmfl_run_skips_irrelevant_clients(tmp_path: Path) -> None:
    # Execute
    rounds, clients = _train(tmp_path / "c", "federation.compression=cmfl")
    # Assert: round 1 has no previous global update, so everyone uploads
    first = clients[clients["server_round"] == 1]
    assert (first["status"] == "ok").all()
    assert set(clients["status"]) <= {"ok", "skipped_irrelevant"}
    skipped = clients[clients["status"] == "skipped_irrelevant"]
    assert len(skipped) > 0 and (skipped["bytes_up"] == 0).all()
    assert (clients.loc[clients["status"] == "ok", "bytes_up"] == FLOAT32_BYTES).all()
    ok = clients[clients["status"] == "ok"].groupby("server_round").size()
    completed = rounds.set_index("server_round")["num_clients_completed"]
    assert (completed == ok.reindex(completed.index, fill_value=0)).all()
    assert (rounds["bytes_up"] == FLOAT32_BYTES * rounds["num_clients_completed"]).all()
    # threshold 0: every update is relevant
    _, everyone = _train(tmp_path / "c0", "federation.compression=cmfl",
                         "federation.cmfl_threshold=0")
    assert (everyone["status"] == "ok").all()
