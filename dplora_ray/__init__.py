"""dplora_ray: federated, differentially private LoRA fine-tuning on Ray.

The public API is small: configs (:mod:`dplora_ray.config`), the experiment entry point
:func:`run_experiment`, and the result schema (:mod:`dplora_ray.results`). Heavy imports
(torch, transformers, ray) are lazy.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExperimentConfig", "__version__", "load_config", "run_experiment"]

__version__ = "0.1.0"

from dplora_ray.config import ExperimentConfig, load_config  # noqa: E402


def run_experiment(*args: Any, **kwargs: Any) -> Any:
    """Run one federated experiment; see :func:`dplora_ray.federated.runner.run_experiment`."""
    from dplora_ray.federated.runner import run_experiment as _run

    return _run(*args, **kwargs)
