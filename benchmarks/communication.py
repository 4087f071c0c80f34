"""Communication: bytes a client uploads per round, LoRA vs full fine-tuning.

Shapes come from models built on the ``meta`` device (no weights are downloaded or
allocated) from hand-written ``LlamaConfig``s, with PEFT's own LoRA wrapping, so the
counted tensors are exactly the ones a client would send:

* SmolLM2-135M: hidden 576, 30 layers, 9 heads (3 KV heads), MLP 1536, vocab 49152, tied
  embeddings (the model this project runs).
* LLaMA-2-7B: hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000.
* Mistral-7B: as LLaMA-2-7B but 8 KV heads (grouped-query attention) and MLP 14336.
* ChatGLM-6B-like: hidden 4096, 28 layers, 32 heads, MLP 16384, vocab 130528, *as a
  LLaMA-shaped approximation*: ChatGLM-6B has a fused QKV projection and a 2-matrix GeLU
  MLP, so its real parameter count (6.2B) is lower than this stand-in's (3 MLP matrices),
  and LoRA on its fused ``query_key_value`` (A r x 4096, B 12288 x r) sends 2x what
  q,v LoRA sends here.

LoRA on a ``d_in -> d_out`` linear layer sends A (r x d_in) and B (d_out x r): the bytes
are linear in r. Standard LoRA sends A and B; FFA-LoRA (``lora.train_a: false``) only B,
which is half when every targeted layer is square (q,v without grouped-query attention);
``federation.transfer_dtype`` bfloat16/float16 halves it again (noise is added in float32
before the cast). The download (the global trainable state) has the same size as the
upload.

The serialisation overhead is measured on real CPU tensors of these shapes in the client's
wire format (:class:`~dplora_ray.federated.client.PackedUpdate`, pickle protocol 5 as Ray
uses), against parameter count x dtype size.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch

__all__ = ["ALL_LINEAR", "MODELS", "QV", "RANKS", "at_rank", "lora_shapes", "measure",
           "payload_overhead"]

MODELS: dict[str, dict[str, Any]] = {
    "SmolLM2-135M": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                         tie_word_embeddings=True),
    "LLaMA-2-7B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                       tie_word_embeddings=False),
    "Mistral-7B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=32000,
                       tie_word_embeddings=False),
    "ChatGLM-6B-like": dict(hidden_size=4096, num_hidden_layers=28, num_attention_heads=32,
                            num_key_value_heads=32, intermediate_size=16384,
                            vocab_size=130528, tie_word_embeddings=False),
}
QV = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = {"q,v": QV, "all linear": ALL_LINEAR}
RANKS = (4, 8, 16, 32, 64)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _meta_model(name: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**MODELS[name]))


def lora_shapes(name: str, targets: tuple[str, ...], r: int
                ) -> tuple[dict[str, tuple[int, ...]], int]:
    """PEFT file keys -> shapes of the LoRA tensors of ``name`` (meta device), and the
    base model's parameter count (tied embeddings counted once)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_meta_model(name), LoraConfig(r=r, lora_alpha=2 * r,
                                                         target_modules=list(targets)))
    shapes = {n.replace(".default.", "."): tuple(p.shape)
              for n, p in model.named_parameters() if "lora_" in n}
    full = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return shapes, int(full)


def at_rank(shapes: dict[str, tuple[int, ...]], r: int) -> dict[str, tuple[int, ...]]:
    """Rank-1 LoRA shapes rescaled to rank r (A: r x d_in, B: d_out x r)."""
    return {k: ((r, s[1]) if ".lora_A." in k else (s[0], r)) for k, s in shapes.items()}


def _counts(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    a = sum(torch.Size(s).numel() for k, s in shapes.items() if ".lora_A." in k)
    b = sum(torch.Size(s).numel() for k, s in shapes.items() if ".lora_B." in k)
    return a, b


def payload_overhead(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                     only_b: bool = False) -> dict[str, Any]:
    """Serialised size of an update of these shapes: the client's wire format
    (``PackedUpdate``) and, for comparison, a plain dict of tensors."""
    from dplora_ray.federated.client import PackedUpdate

    update = {k: torch.zeros(s, dtype=dtype) for k, s in sorted(shapes.items())
              if not only_b or ".lora_B." in k}
    raw = sum(t.numel() * t.element_size() for t in update.values())
    packed = len(pickle.dumps(PackedUpdate(update), protocol=5))
    plain = len(pickle.dumps(update, protocol=5))
    return {"tensors": len(update), "raw_bytes": raw, "serialized_bytes": packed,
            "overhead_fraction": (packed - raw) / raw,
            "plain_dict_serialized_bytes": plain,
            "plain_dict_overhead_fraction": (plain - raw) / raw}


def measure(quick: bool) -> dict[str, Any]:
    """The bytes table, the FFA/transfer-dtype factors and the serialisation overhead."""
    models = ["SmolLM2-135M", "LLaMA-2-7B"] if quick else list(MODELS)
    ranks = (8,) if quick else RANKS
    rows: list[dict[str, Any]] = []
    checks: dict[str, bool] = {}
    rank1: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}
    for name in models:
        for tname, targets in TARGETS.items():
            shapes, full = lora_shapes(name, targets, 1)  # bytes are linear in r
            rank1[(name, tname)] = shapes
            one_a, one_b = _counts(shapes)
            if not quick:  # PEFT at r=8 agrees with the rescaled rank-1 shapes
                checks[f"{name} {tname}: r=8"] = lora_shapes(name, targets, 8)[0] == at_rank(
                    shapes, 8)
            for r in ranks:
                a, b = r * one_a, r * one_b
                rows.append({
                    "model": name, "targets": tname, "r": r,
                    "lora_parameters": a + b, "full_parameters": full,
                    "standard_float32_bytes": 4 * (a + b),
                    "standard_bfloat16_bytes": 2 * (a + b),
                    "ffa_float32_bytes": 4 * b,
                    "ffa_bfloat16_bytes": 2 * b,
                    "full_finetune_float32_bytes": 4 * full,
                    "standard_float32_fraction_of_full": (a + b) / full,
                    "ffa_over_standard": b / (a + b),
                })
    smol_qv = at_rank(rank1[("SmolLM2-135M", "q,v")], 8)
    llama_qv = at_rank(rank1[("LLaMA-2-7B", "q,v")], 8)
    overhead = {
        "SmolLM2-135M q,v r=8 float32": payload_overhead(smol_qv, torch.float32),
        "SmolLM2-135M q,v r=8 FFA bfloat16": payload_overhead(smol_qv, torch.bfloat16,
                                                              only_b=True),
        "LLaMA-2-7B q,v r=8 float32": payload_overhead(llama_qv, torch.float32),
    }
    if not quick:
        overhead["SmolLM2-135M all linear r=8 float32"] = payload_overhead(
            at_rank(rank1[("SmolLM2-135M", "all linear")], 8), torch.float32)
    return {
        "rows": rows,
        "payload_overhead": overhead,
        "payload_overhead_fraction": overhead["SmolLM2-135M q,v r=8 float32"]
        ["overhead_fraction"],
        "payload_overhead_max": max(v["overhead_fraction"] for v in overhead.values()),
        "shape_checks": checks,
        "note": "ChatGLM-6B-like is a LlamaConfig-shaped approximation (see module doc); "
                "per client and round; the download is the same size as the upload",
    }
