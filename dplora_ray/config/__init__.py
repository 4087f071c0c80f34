"""Typed, validated experiment configuration.

One frozen dataclass per concern (model, lora, data, federation, privacy, runtime, audit,
tracking) plus ``seed``. Every value is checked when the dataclass is constructed; a bad
value raises :class:`~dplora_ray.errors.ConfigError` naming the dotted key and the value.
Configs are loaded from YAML with ``key=value`` overrides (``--set`` on the command line),
and the resolved config is written next to the results (:func:`config_to_dict`).

Invariants:
    * A constructed :class:`ExperimentConfig` is valid on its own (cross-field checks
      included); checks that need the data (e.g. delta below 1/n) happen at run start,
      before anything is written.
    * ``config_from_dict(config_to_dict(c)) == c``.
"""

from __future__ import annotations

from dplora_ray.config.loading import (
    all_keys,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    save_config,
)
from dplora_ray.config.sections import (
    AuditConfig,
    DataConfig,
    ExperimentConfig,
    FederationConfig,
    LoraSection,
    ModelConfig,
    PrivacyConfig,
    PrivacyMode,
    RuntimeConfig,
    TrackingConfig,
)

__all__ = [
    "AuditConfig",
    "DataConfig",
    "ExperimentConfig",
    "FederationConfig",
    "LoraSection",
    "ModelConfig",
    "PrivacyConfig",
    "PrivacyMode",
    "RuntimeConfig",
    "TrackingConfig",
    "all_keys",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
    "save_config",
]
