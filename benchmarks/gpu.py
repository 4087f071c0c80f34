"""GPU: client workers sharing a GPU through fractional ``runtime.gpus_per_worker``.

With ``gpus_per_worker=0.5`` Ray places two worker actors on one GPU; each
:class:`~dplora_ray.federated.client.ClientWorker` then moves its LoRA model to
``cuda`` (it does so when ``gpus_per_worker > 0`` and CUDA is available). The benchmark
is the token-throughput benchmark of :mod:`benchmarks.throughput` with that setting.
Where no GPU is visible (torch sees no CUDA device or Ray counts no GPU) it reports
``measured: false`` and why, and measures nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["measure"]


def measure(ray: Any, quick: bool, workdir: Path, gpus_per_worker: float = 0.5
            ) -> dict[str, Any]:
    import torch

    from benchmarks.throughput import tokens_per_second

    ray_gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if not torch.cuda.is_available() or ray_gpus <= 0:
        return {"measured": False, "gpus_per_worker": gpus_per_worker,
                "reason": f"no GPU on this machine (torch.cuda.is_available() = "
                          f"{torch.cuda.is_available()}, Ray GPUs = {ray_gpus:g})"}
    result = tokens_per_second(ray, quick, workdir / "gpu", gpus_per_worker=gpus_per_worker)
    return {"measured": True, "device": torch.cuda.get_device_name(0), **result}
