"""The ``model`` section of a config (:class:`ModelConfig`), on its own so that
:mod:`dplora_ray.config.sections` stays short; re-exported there and by
:mod:`dplora_ray.config`. :func:`check_model_placement` holds the checks that need other
sections (the workers' GPUs, the federation strategy, the autocast)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

from dplora_ray.config.checks import check as _check

__all__ = ["BaseDtype", "ModelConfig", "Quantization", "check_model_placement"]

BaseDtype = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["none", "8bit", "4bit"]


@dataclass(frozen=True)
class ModelConfig:
    """The frozen base model.

    Attributes:
        name: a preset (``smollm2-135m``, ``tiny-llama``), a local directory holding a
            Hugging Face checkpoint, or a Hugging Face hub id.
        max_length: prompts are truncated (from the left) to this many tokens.
        revision: hub revision when ``name`` is a hub id.
        dtype: dtype the frozen base weights are loaded in (``float32``, ``bfloat16``,
            ``float16``). The LoRA tensors, their (per-sample) gradients, the clipping
            and the noise stay float32 whatever it is (docs/privacy.md). With
            ``runtime.bf16_autocast`` a float32 base computes in bf16 but keeps a bf16
            copy of each frozen weight for the backward; over a bfloat16 base the
            autocast only moves the LoRA matmuls to bf16 (docs/cluster.md).
        gradient_checkpointing: recompute each decoder layer's activations in the
            backward pass instead of keeping them (less memory, about one more forward
            per step); works with Opacus' per-sample hooks
            (:func:`dplora_ray.hardware.grad_sample_module`).
        quantization: ``none``, ``8bit`` or ``4bit`` (QLoRA: bitsandbytes NF4 with
            bfloat16 compute) for the frozen base; GPU workers only
            (``runtime.gpus_per_worker > 0``, CUDA and bitsandbytes on the worker).
    """

    name: str = "tiny-llama"
    max_length: int = 128
    revision: str | None = None
    dtype: BaseDtype = "float32"
    gradient_checkpointing: bool = False
    quantization: Quantization = "none"

    def __post_init__(self) -> None:
        _check(bool(self.name.strip()), "model.name", self.name, "must not be empty")
        _check(self.max_length >= 8, "model.max_length", self.max_length, "must be >= 8")
        for key, kind in (("dtype", BaseDtype), ("quantization", Quantization)):
            allowed = typing.get_args(kind)
            _check(getattr(self, key) in allowed, f"model.{key}", getattr(self, key),
                   f"must be one of {', '.join(repr(a) for a in allowed)}")


def check_model_placement(model: ModelConfig, runtime: Any, federation: Any) -> None:
    """The ``model`` keys that depend on other sections (ConfigError naming the key).

    * ``model.quantization`` needs GPU workers: bitsandbytes' 8-bit and 4-bit kernels run
      on CUDA devices only.
    * ``federation.strategy=full`` trains the base weights themselves: they must be
      float32 and not quantised (a bf16 weight rounds most small steps away).
    * ``runtime.bf16_autocast`` with a float16 base would mix the two half formats.
    """
    if model.quantization != "none":
        _check(runtime.gpus_per_worker > 0, "model.quantization", model.quantization,
               "needs GPU workers (runtime.gpus_per_worker > 0): bitsandbytes' 8-bit and "
               "4-bit kernels run on CUDA only")
    if federation.strategy == "full":
        _check(model.dtype == "float32", "model.dtype", model.dtype,
               "federation.strategy=full trains the base weights: they must be float32")
        _check(model.quantization == "none", "model.quantization", model.quantization,
               "federation.strategy=full trains the base weights: they cannot be quantised")
    _check(not (model.dtype == "float16" and runtime.bf16_autocast), "model.dtype",
           model.dtype, "with runtime.bf16_autocast=true mixes float16 and bfloat16; use "
           "model.dtype=bfloat16 (or turn the autocast off)")
