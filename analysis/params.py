"""Parameter count of a base model, for the full-fine-tuning communication baseline.

Full fine-tuning would send every base-model parameter each way, each round, as float32:
``parameters x 4`` bytes per client and direction. The count comes from the model's
config, instantiated on PyTorch's ``meta`` device (shapes only, no weights read, no memory
used). Tied input/output embeddings are counted once, as they are one tensor.
"""

from __future__ import annotations

import functools

__all__ = ["FULL_FT_BYTES_PER_PARAMETER", "base_model_parameters"]

FULL_FT_BYTES_PER_PARAMETER = 4  # float32


@functools.lru_cache(maxsize=16)
def base_model_parameters(model_name: str) -> int | None:
    """Number of parameters of the base model ``model_name`` (a preset, a local checkpoint
    folder or a hub id), or None when its config cannot be found here.

    A preset is prepared as a run would (``dplora_ray.models.prepare_model``: already
    cached after any run on this machine).
    """
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from dplora_ray.config import ModelConfig
        from dplora_ray.models import prepare_model

        source = prepare_model(ModelConfig(name=model_name))
        config = AutoConfig.from_pretrained(source)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:  # noqa: BLE001 - offline hub id, missing package...: no baseline
        return None
