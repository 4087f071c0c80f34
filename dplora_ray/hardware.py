"""The frozen base model shaped for the hardware: dtype, quantisation, gradient
checkpointing, and Opacus' per-sample hooks that survive the checkpointing.

* ``model.dtype`` (``float32`` / ``bfloat16`` / ``float16``): the dtype the base weights
  are loaded in (:func:`load_kwargs`). peft creates the LoRA factors in float32 over a
  half-precision base (``autocast_adapter_dtype``), casts the LoRA input to float32 and
  the LoRA output back to the base's dtype, so the LoRA parameters, their gradients and
  per-sample gradients, the clipping and the noise are float32 whatever the base
  (:func:`check_lora_float32` asserts it on every worker).
* ``model.quantization`` (``8bit`` / ``4bit``): bitsandbytes via transformers'
  ``BitsAndBytesConfig`` (4-bit: NF4, double quantisation, bfloat16 compute), on the
  worker's CUDA device. :func:`check_worker_support` refuses it, in one line naming the
  key, where the worker has no CUDA device or bitsandbytes is not importable. This code
  path has not run here (no GPU): see docs/cluster.md.
* ``model.gradient_checkpointing``: transformers' non-reentrant activation
  checkpointing of every decoder layer (:func:`enable_gradient_checkpointing`). The
  backward pass re-runs each layer's forward, and with it every forward hook: Opacus'
  ``GradSampleModule`` would then capture each LoRA module's activations twice and count
  two forwards per backward, so its per-sample gradients never get promoted
  (``grad_sample`` stays None, ``tests/test_gradient_checkpointing.py``) and one stale
  activation per LoRA module and step piles up (and would feed its batch-size guess).
  The checkpoint's ``context_fn`` marks the recomputation (:func:`recomputing`) and the
  ``GradSampleModule`` of :func:`grad_sample_module` skips its activation hook there:
  the activations captured in the first forward are the ones the backward uses (the
  recomputation is the same forward: checkpointing restores the RNG state for dropout),
  so the per-sample gradients equal those without checkpointing (bitwise, measured).

Imports torch; transformers, peft and Opacus only inside functions.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import threading
from collections.abc import Iterator
from typing import Any

import torch

from dplora_ray.config import ModelConfig
from dplora_ray.errors import ModelError

__all__ = [
    "TORCH_DTYPES",
    "check_lora_float32",
    "check_worker_support",
    "checkpoint_safe_gsm_class",
    "enable_gradient_checkpointing",
    "grad_sample_module",
    "is_recomputing",
    "load_kwargs",
    "quantization_config",
    "recomputing",
]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}

_state = threading.local()


def is_recomputing() -> bool:
    """True inside a checkpointed layer's recomputation (the backward re-running its
    forward), in this thread."""
    return bool(getattr(_state, "recomputing", False))


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Marks the recomputation of a checkpointed region (see the module doc)."""
    before = is_recomputing()
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = before


def _checkpoint_contexts() -> tuple[Any, Any]:
    """``context_fn`` of ``torch.utils.checkpoint.checkpoint``: nothing around the first
    forward, :func:`recomputing` around the recomputation."""
    return contextlib.nullcontext(), recomputing()


def enable_gradient_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing of every decoder layer of the HF model
    ``model`` (the base, not the PeftModel), with the recomputation marked for
    :func:`grad_sample_module`. transformers' hook that makes the input embeddings
    require grad is removed again: non-reentrant checkpointing passes gradients to the
    LoRA parameters inside a layer whether or not the layer's input requires grad. (The
    KV cache is left to transformers, which turns it off in checkpointed training
    forwards only, so generation keeps it.)"""
    kwargs = {"use_reentrant": False, "context_fn": _checkpoint_contexts}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "disable_input_require_grads"):
        with contextlib.suppress(AttributeError):  # no hook was registered
            model.disable_input_require_grads()


def grad_sample_module(model: Any) -> Any:
    """Opacus' ``GradSampleModule`` over ``model`` (batch first, mean loss), safe under
    gradient checkpointing (:func:`checkpoint_safe_gsm_class`)."""
    return checkpoint_safe_gsm_class()(model, batch_first=True, loss_reduction="mean")


@functools.cache
def checkpoint_safe_gsm_class() -> type:
    """``CheckpointSafeGradSampleModule``: Opacus' ``GradSampleModule`` whose activation
    hook ignores the recomputation of a checkpointed layer (see the module doc). Built on
    first use, so that importing this module does not import Opacus."""
    from opacus import GradSampleModule

    class CheckpointSafeGradSampleModule(GradSampleModule):
        def capture_activations_hook(self, module: Any, forward_input: Any,
                                     _forward_output: Any) -> None:
            if is_recomputing():
                return
            super().capture_activations_hook(module, forward_input, _forward_output)

    return CheckpointSafeGradSampleModule


# ----------------------------------------------------------------------- loading
def check_worker_support(cfg: ModelConfig, device: torch.device) -> None:
    """Refuse, before any weight is read, what the worker's hardware cannot run:
    ``model.quantization`` without a CUDA device or without bitsandbytes."""
    if cfg.quantization == "none":
        return
    if device.type != "cuda":
        raise ModelError("model.quantization", cfg.quantization,
                         "needs a CUDA GPU on the worker (bitsandbytes' 8-bit and 4-bit "
                         "kernels); this worker has none (torch.cuda.is_available() is "
                         f"{torch.cuda.is_available()}): use model.quantization=none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("model.quantization", cfg.quantization,
                         "needs the bitsandbytes package on the worker "
                         "(pip install bitsandbytes), which is not installed")


def quantization_config(cfg: ModelConfig) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``model.quantization`` (None: none).

    4-bit is QLoRA's (Dettmers et al. 2023): NF4 weights, double quantisation of the
    block scales, bfloat16 compute. 8-bit is LLM.int8(). The LM head stays unquantised
    (transformers' default), as do embeddings and norms (in ``model.dtype``)."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_kwargs(cfg: ModelConfig, device: torch.device | None = None) -> dict[str, Any]:
    """Keyword arguments of ``AutoModelForCausalLM.from_pretrained`` for the base:
    its dtype and, when quantised, the bitsandbytes config and the worker's CUDA device
    (quantised weights are placed at load time; they cannot be moved later)."""
    kwargs: dict[str, Any] = {"dtype": TORCH_DTYPES[cfg.dtype]}
    qc = quantization_config(cfg)
    if qc is not None:
        dev = device if device is not None else torch.device("cuda")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        kwargs["quantization_config"] = qc
        kwargs["device_map"] = {"": index}
    return kwargs


def check_lora_float32(model: Any) -> None:
    """Every LoRA parameter of ``model`` is float32 (RuntimeError otherwise: clipping and
    noise would not be exact)."""
    bad = [n for n, p in model.named_parameters()
           if "lora_" in n and p.dtype != torch.float32]
    if bad:
        raise RuntimeError(f"LoRA parameter {bad[0]} is not float32; the per-sample "
                           "clipping and the noise need float32 LoRA tensors")
