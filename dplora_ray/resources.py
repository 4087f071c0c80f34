"""Memory of one client worker, estimated from the model's shape (``dplora-ray resources``),
and the refusal of a GPU share that cannot hold it.

The base model is instantiated on the meta device from its ``config.json`` (no weights
are read: a folder holding only ``config.json`` is enough, e.g.
``configs/model_shapes/llama-2-7b``). One worker holds:

* **weights**: every base parameter in ``model.dtype`` (4 or 2 bytes); quantised
  (``model.quantization``), the decoder's linear weights take 1 byte (8-bit LLM.int8) or
  0.516 byte (4-bit NF4: 0.5 + one 8-bit block scale per 64 weights + one float32 per
  256 blocks, double quantisation) and the rest (embeddings, norms, LM head) stays in
  ``model.dtype``.
* **LoRA state** (float32): every LoRA parameter, plus per trainable one its gradient,
  the optimizer state (AdamW / DP-AdamBC 2, SGD with momentum 1, SGD 0 tensors) and, in
  ``dpsgd``, Opacus' summed clipped gradient.
* **per-sample gradients** (``dpsgd`` only): physical batch x trainable LoRA parameters
  x 4 bytes (x 1.5 under ``runtime.bf16_autocast``: the bf16 ones and their float32 copy).
* **activations** for the physical batch at ``model.max_length`` (:func:`layer_bytes`).
* **runtime overhead**: :data:`RUNTIME_OVERHEAD_BYTES`, a worker process after its
  imports.

Activations (Llama-style decoder, frozen base: a frozen linear layer saves nothing for
the backward, so the usual ``34 s b h`` of Korthikanti et al. 2022 does not apply).
Per token and decoder layer, with ``E`` the bytes of the compute dtype (2 with a
half-precision or quantised base or under ``runtime.bf16_autocast``, else 4), ``H`` the
hidden size, ``H_kv = H x kv_heads / heads``, ``I`` the MLP width and ``r`` the LoRA rank:

    E x (2 H + 2 H_kv + 3 I)        attention q, k, v, output (SDPA) and SwiGLU (gate,
                                    up, their product)
  + 4 x 2 H                         the two RMSNorm inputs (upcast to float32)
  + 4 x r per LoRA module           the input of B
  + 4 x in_features                 the input of A, when A trains (per module over a
                                    half-precision base, where peft casts it to float32;
                                    once per distinct input over a float32 base; under
                                    the autocast also a bfloat16 copy per module, 2 x)

times ``layers x batch x max_length``, plus one more layer for the backward's
transients and the final RMSNorm's input (``4 x H`` per token). With
``model.gradient_checkpointing`` each layer keeps only its input (``H`` in
``model.dtype``) and what Opacus captured for the LoRA modules (the last two lines; in
``dpsgd``, an overestimate in the other modes), and the backward recomputes one layer
at a time (two layers' worth at the peak). A float32 base
under ``runtime.bf16_autocast`` also keeps a bfloat16 copy of every frozen decoder weight
that a gradient flows through (2 bytes per layer parameter; measured: 202 MiB on
SmolLM2-135M), unless checkpointed. Generation and multiple-choice tasks add the LM head's
log-probabilities (2 x batch x max_length x vocab x 4 bytes, every position counted).
Measured against this on SmolLM2 (``python -m benchmarks.resources_check``,
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dplora_ray.config import ExperimentConfig, ModelConfig
from dplora_ray.errors import ConfigError, ModelError

__all__ = [
    "GIB",
    "RUNTIME_OVERHEAD_BYTES",
    "MemoryEstimate",
    "ModelShape",
    "add_parser",
    "check_worker_fits",
    "estimate",
    "layer_bytes",
    "model_shape",
    "physical_batch",
    "placement",
]

GIB = 2**30
#: RSS of a client-worker process after importing torch, transformers, peft, Opacus,
#: dplora_ray's client and Ray: 515 MiB measured on the 2-core CPU machine (torch
#: 2.13, transformers 5.24); on a GPU add the CUDA context (not measured here)
RUNTIME_OVERHEAD_BYTES = 512 * 2**20
#: bytes per quantised linear weight
QUANT_BYTES = {"8bit": 1.0, "4bit": 0.5 + 1 / 64 + 4 / (64 * 256)}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: optimizer state tensors per trainable parameter
OPTIMIZER_STATES = {"adamw": 2, "dpadambc": 2, "sgdm": 1, "sgd": 0}
#: rows per example of a multiple-choice task (PIQA: two solutions)
CHOICE_ROWS = 2
#: Llama modules that read the same input tensor
_SHARED_INPUT = {"gate_proj": "post_norm", "up_proj": "post_norm", "q_proj": "pre_norm",
                 "k_proj": "pre_norm", "v_proj": "pre_norm"}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model (from its config on the meta device)."""

    parameters: int
    linear_parameters: int  # weights of the decoder's linear layers (quantisable)
    layer_parameters: int  # every parameter inside the decoder layers
    layers: int
    hidden: int
    kv_hidden: int
    intermediate: int
    vocab: int
    lora_modules: tuple[tuple[str, int, int], ...]  # per layer: (name, in, out)


def _config_source(model: ModelConfig) -> str:
    """Where to read ``config.json``: a folder holding one (weights not needed), a
    ``config.json`` file, a preset (prepared), or a hub id."""
    from dplora_ray.models import PRESETS, prepare_model

    path = Path(model.name).expanduser()
    if model.name not in PRESETS and path.is_file():
        return str(path)
    if model.name not in PRESETS and (path / "config.json").is_file():
        return str(path)
    return prepare_model(model)


def model_shape(model: ModelConfig, target_modules: tuple[str, ...]) -> ModelShape:
    """Count parameters and LoRA modules of ``model`` on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = _config_source(model)
    try:
        config = AutoConfig.from_pretrained(source, revision=model.revision)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - an unreadable or unknown config
        from dplora_ray.fileio import one_line

        raise ModelError("model.name", model.name,
                         f"config.json could not be read ({one_line(exc, 200)})") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers_list = max((m for m in skeleton.modules() if isinstance(m, torch.nn.ModuleList)),
                      key=len)
    layer_params = sum(p.numel() for p in layers_list.parameters())
    linear = sum(m.weight.numel() for m in layers_list.modules()
                 if isinstance(m, torch.nn.Linear))
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    inter = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)
                or 4 * hidden)
    lora = tuple((name.rsplit(".", 1)[-1], m.in_features, m.out_features)
                 for name, m in layers_list[0].named_modules()
                 if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules)
    return ModelShape(parameters=sum(p.numel() for p in skeleton.parameters()),
                      linear_parameters=linear, layer_parameters=layer_params,
                      layers=len(layers_list), hidden=hidden, kv_hidden=hidden * kv // heads,
                      intermediate=inter, vocab=int(text.vocab_size), lora_modules=lora)


def physical_batch(cfg: ExperimentConfig) -> tuple[int, str]:
    """Examples in one forward/backward pass, and where the number comes from: the
    ``runtime.max_physical_batch_size``, else the batch (Poisson batches: its expected
    size plus three standard deviations, exceeded in about 0.1% of steps)."""
    from dplora_ray.privacy.mechanisms import get_mechanism

    b = cfg.federation.batch_size
    poisson = get_mechanism(cfg.privacy.mode).local_training in ("dpsgd", "paper")
    big = math.ceil(b + 3 * math.sqrt(b)) if poisson else b
    cap = cfg.runtime.max_physical_batch_size
    if cap is not None and cap < big:
        return cap, "runtime.max_physical_batch_size"
    return big, ("Poisson batch: federation.batch_size + 3 sd" if poisson
                 else "federation.batch_size")


def compute_bytes(cfg: ExperimentConfig) -> int:
    """Bytes per activation element (see the module doc)."""
    half = cfg.model.dtype != "float32" or cfg.model.quantization != "none"
    return 2 if half or cfg.runtime.bf16_autocast else 4


def layer_bytes(cfg: ExperimentConfig, shape: ModelShape) -> tuple[float, float]:
    """Activation bytes per token and decoder layer: (kept without checkpointing,
    kept with checkpointing); see the module doc."""
    E = compute_bytes(cfg)
    H, Hkv, inter = shape.hidden, shape.kv_hidden, shape.intermediate
    lora_b = 4 * cfg.lora.r * len(shape.lora_modules)
    lora_a = 0
    if cfg.lora.train_a and cfg.federation.strategy == "lora":
        each = sum(i for _, i, _ in shape.lora_modules)
        if cfg.model.dtype == "float32" and cfg.model.quantization == "none":
            inputs = {_SHARED_INPUT.get(n, n): i for n, i, _ in shape.lora_modules}
            lora_a = 4 * sum(inputs.values())  # modules reading one tensor share it
        else:
            lora_a = 4 * each  # peft casts the input to float32, a copy per module
        if cfg.runtime.bf16_autocast:
            lora_a += 2 * each  # and the autocast a bfloat16 copy of that per module
    full = E * (2 * H + 2 * Hkv + 3 * inter) + 4 * 2 * H + lora_b + lora_a
    stream = DTYPE_BYTES[cfg.model.dtype]  # the residual stream: a layer's input
    return float(full), float(stream * H + lora_b + lora_a)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one worker, by component (see the module doc)."""

    weights: float
    lora_state: float
    per_sample_grads: float
    activations: float
    activations_checkpointed: float
    overhead: float
    batch: int
    batch_source: str
    tokens: int

    def total(self, checkpointing: bool) -> float:
        act = self.activations_checkpointed if checkpointing else self.activations
        return self.weights + self.lora_state + self.per_sample_grads + act + self.overhead


def estimate(cfg: ExperimentConfig, shape: ModelShape) -> MemoryEstimate:
    """One worker's memory under ``cfg`` (both with and without checkpointing)."""
    from dplora_ray.privacy.mechanisms import get_mechanism

    m = cfg.model
    dtype_b = DTYPE_BYTES[m.dtype]
    if m.quantization == "none":
        weights: float = float(shape.parameters * dtype_b)
    else:
        weights = (shape.linear_parameters * QUANT_BYTES[m.quantization]
                   + (shape.parameters - shape.linear_parameters) * dtype_b)
    per_layer = [(i * cfg.lora.r, cfg.lora.r * o) for _, i, o in shape.lora_modules]
    lora_all = shape.layers * sum(a + b for a, b in per_layer)
    trainable = shape.layers * sum((a if cfg.lora.train_a else 0) + b for a, b in per_layer)
    dpsgd = get_mechanism(cfg.privacy.mode).local_training == "dpsgd"
    if cfg.federation.strategy == "full":
        lora_all = trainable = shape.parameters
        weights = 0.0  # the weights are the trained tensors, counted below
    states = 1 + OPTIMIZER_STATES[cfg.federation.optimizer] + (1 if dpsgd else 0)
    lora_state = 4.0 * (lora_all + trainable * states)
    batch, source = physical_batch(cfg)
    rows = batch * (CHOICE_ROWS if cfg.data.task == "multiple_choice" else 1)
    tokens = rows * m.max_length
    per_sample = 4.0 * rows * trainable * (1.5 if cfg.runtime.bf16_autocast else 1.0) \
        if dpsgd else 0.0
    full, kept = layer_bytes(cfg, shape)
    head = (2.0 * tokens * shape.vocab * 4
            if cfg.data.task in ("qa_generation", "multiple_choice") else 0.0)
    copies = (2.0 * shape.layer_parameters
              if cfg.runtime.bf16_autocast and m.dtype == "float32"
              and m.quantization == "none" else 0.0)
    final_norm = 4.0 * shape.hidden * tokens  # the last RMSNorm's input
    activations = (shape.layers + 1) * tokens * full + final_norm + head + copies
    checkpointed = (shape.layers * tokens * kept + 2 * tokens * full + final_norm + head
                    + copies / max(1, shape.layers))
    return MemoryEstimate(weights=weights, lora_state=lora_state,
                          per_sample_grads=per_sample, activations=activations,
                          activations_checkpointed=checkpointed,
                          overhead=float(RUNTIME_OVERHEAD_BYTES), batch=batch,
                          batch_source=source, tokens=tokens)


def placement(total: float, gpu_bytes: float) -> tuple[int, float]:
    """(workers that fit on one GPU of ``gpu_bytes``, the ``runtime.gpus_per_worker``
    to use): a fraction rounded down to Ray's 4 decimals when several fit, else the
    number of GPUs one worker spans."""
    fit = int(gpu_bytes // total) if total > 0 else 0
    if fit >= 1:
        return fit, math.floor(10_000 / fit) / 10_000
    return 0, float(math.ceil(total / gpu_bytes))


def check_worker_fits(cfg: ExperimentConfig, device: Any) -> None:
    """Refuse, before the base is loaded, a worker whose GPU share
    (``runtime.gpus_per_worker`` x the device's memory; one device at most: a worker does
    not shard the base yet) is smaller than its estimated memory."""
    import torch

    total = float(torch.cuda.get_device_properties(device).total_memory)
    check_fits(cfg, total)


def check_fits(cfg: ExperimentConfig, device_bytes: float) -> None:
    """:func:`check_worker_fits` with the device's memory given (testable without a GPU)."""
    need = estimate(cfg, model_shape(cfg.model, cfg.lora.target_modules)).total(
        cfg.model.gradient_checkpointing)
    share = min(cfg.runtime.gpus_per_worker, 1.0) * device_bytes
    if need <= share:
        return
    fit, gpw = placement(need, device_bytes)
    hint = (f"use runtime.gpus_per_worker={gpw:g} or less workers per GPU" if fit else
            "one GPU cannot hold it and sharding a worker over several GPUs is not "
            "implemented yet; lower model.dtype, model.quantization, the batch "
            "(runtime.max_physical_batch_size) or turn on model.gradient_checkpointing")
    raise ConfigError("runtime.gpus_per_worker", cfg.runtime.gpus_per_worker,
                      f"one worker needs about {need / GIB:.1f} GiB (dplora-ray resources) "
                      f"but its share of this {device_bytes / GIB:.1f} GiB GPU is "
                      f"{share / GIB:.1f} GiB; {hint}")


# ----------------------------------------------------------------------- command line
def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``dplora-ray resources`` on the CLI's subparsers."""
    p = sub.add_parser("resources", help="estimate one worker's memory and the GPU packing",
                       description="Estimate one client worker's memory (weights, LoRA "
                       "state, per-sample gradients, activations with and without "
                       "gradient checkpointing, runtime overhead) and how many workers "
                       "fit on one GPU.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0,
                   help="memory of one GPU in GiB (default 80)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.set_defaults(func=_cmd_resources)
    return p


def table(cfg: ExperimentConfig, shape: ModelShape, est: MemoryEstimate,
          gpu_gib: float) -> str:
    """The report ``dplora-ray resources`` prints."""
    m, lo = cfg.model, cfg.lora
    base = m.dtype if m.quantization == "none" else f"{m.quantization} ({m.dtype} rest)"
    used = m.gradient_checkpointing
    rows = [("weights", est.weights, est.weights),
            ("LoRA state (params, grads, optimizer)", est.lora_state, est.lora_state),
            ("per-sample gradients", est.per_sample_grads, est.per_sample_grads),
            ("activations", est.activations, est.activations_checkpointed),
            ("runtime overhead", est.overhead, est.overhead),
            ("total", est.total(False), est.total(True))]
    mark = {False: " *" if not used else "", True: " *" if used else ""}
    lines = [
        f"model {m.name}: {shape.parameters / 1e6:,.1f}M parameters, {shape.layers} layers, "
        f"hidden {shape.hidden}; base {base}",
        f"LoRA r={lo.r} on {', '.join(lo.target_modules)}"
        + ("" if lo.train_a else " (B only)") + f"; physical batch {est.batch} "
        f"({est.batch_source}) x {m.max_length} tokens; privacy.mode={cfg.privacy.mode}, "
        f"optimizer {cfg.federation.optimizer}"
        + ("; bf16 autocast" if cfg.runtime.bf16_autocast else ""),
        "",
        f"| {'GiB':38s} | {'no checkpointing' + mark[False]:>18s} | "
        f"{'checkpointing' + mark[True]:>18s} |",
        f"|{'-' * 40}|{'-' * 19}:|{'-' * 19}:|",
    ]
    for name, a, b in rows:
        lines.append(f"| {name:38s} | {a / GIB:18.3f} | {b / GIB:18.3f} |")
    lines.append(f"(* model.gradient_checkpointing={str(used).lower()} in this config)")
    gpu = gpu_gib * GIB
    for ck in (False, True):
        fit, gpw = placement(est.total(ck), gpu)
        what = "with" if ck else "without"
        lines.append(
            f"GPU of {gpu_gib:g} GiB, {what} checkpointing: "
            + (f"{fit} worker(s) fit; runtime.gpus_per_worker={gpw:g}" if fit else
               f"one worker does not fit; it needs runtime.gpus_per_worker={gpw:g} "
               "(sharding over GPUs: not implemented yet)"))
    return "\n".join(lines)


def _cmd_resources(args: argparse.Namespace) -> int:
    from dplora_ray.config import load_config

    if not (math.isfinite(args.gpu_memory_gb) and args.gpu_memory_gb > 0):
        raise ConfigError("--gpu-memory-gb", args.gpu_memory_gb, "must be a number > 0")
    cfg = load_config(args.config, args.overrides)
    shape = model_shape(cfg.model, cfg.lora.target_modules)
    print(table(cfg, shape, estimate(cfg, shape), args.gpu_memory_gb))
    return 0
