"""Configs from and to plain data: YAML files, ``dotted.key=value`` overrides.

:func:`load_config` (YAML file + overrides), :func:`save_config`, :func:`config_from_dict`
(type-checked against the dataclass annotations: lists become tuples, ints floats where
asked), :func:`config_to_dict`, :func:`parse_override`, :func:`apply_overrides` and
:func:`all_keys`; an unknown key suggests the closest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from dplora_ray.config.sections import SECTIONS, ExperimentConfig
from dplora_ray.config.yamlfile import DuplicateKeyError, load_yaml_text, read_yaml_file
from dplora_ray.errors import ConfigError

__all__ = [
    "all_keys",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
    "save_config",
]


def all_keys() -> list[str]:
    """Every dotted key a config accepts."""
    keys = ["seed"]
    for name, cls in SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _unknown(key: str, value: object) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(key, value, f"unknown key{hint}")


# PyYAML (YAML 1.1) reads "1e-5" (no dot) as a string; accept it where a number is due
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (YAML types), converting lists to
    tuples and ints to floats where the annotation asks for them."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(key, value, a)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(key, value, f"must be one of {choices}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "must be an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "must be a number")
        value = float(value)
        if math.isnan(value):
            raise ConfigError(key, value, "must be a number, not NaN")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be a string")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "must be a list")
        return tuple(_coerce(key, v, args[0]) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, "must be a mapping")
        return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # programming error


def _section_from_dict(name: str, cls: type, values: Any) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(name, values, "must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{name}.{k}"
        if k not in names:
            raise _unknown(key, v)
        kwargs[k] = _coerce(key, v, hints[k])
    return cls(**kwargs)


def config_from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from plain data (YAML)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("<config>", raw, "must be a mapping of sections")
    kwargs: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "seed":
            kwargs["seed"] = _coerce("seed", v, int)
        elif k in SECTIONS:
            kwargs[k] = _section_from_dict(k, SECTIONS[k], v)
        else:
            raise _unknown(str(k), v)
    return ExperimentConfig(**kwargs)


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain-data form of a config (lists instead of tuples), YAML/JSON-safe."""
    out: dict[str, Any] = {}
    for name in SECTIONS:
        section = dataclasses.asdict(getattr(cfg, name))
        out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
    out["seed"] = cfg.seed
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """``dotted.key=value`` -> (key, YAML-typed value); ConfigError when there is no ``=``."""
    if "=" not in item:
        raise ConfigError("--set", item, "must look like dotted.key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = load_yaml_text(text) if text.strip() else None
    except DuplicateKeyError as exc:
        raise ConfigError(key, text, f"key {exc.path!r} is given twice") from None
    except yaml.YAMLError:
        value = text
    return key, value


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any]
                    ) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``dotted.key=value`` overrides applied.

    ``overrides`` is either a list of ``key=value`` strings (values parsed as YAML) or a
    mapping of dotted keys to already-typed values (sweeps).
    """
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v)
                           for k, v in raw.items()}
    items = (list(overrides.items()) if isinstance(overrides, Mapping)
             else [parse_override(o) for o in overrides])
    valid = set(all_keys())
    for key, value in items:
        if key not in valid:
            raise _unknown(key, value)
        if key == "seed":
            out["seed"] = value
            continue
        section, name = key.split(".", 1)
        sub = out.get(section)
        sub = dict(sub) if isinstance(sub, Mapping) else {}
        sub[name] = value
        out[section] = sub
    return out


def load_config(path: str | Path | None, overrides: Sequence[str] | Mapping[str, Any] = ()
                ) -> ExperimentConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides.

    A file that is missing, unreadable, not UTF-8, empty, not valid YAML, or repeats a
    key in one mapping is a ConfigError ``config=PATH: ...``."""
    raw: Any = {}
    if path is not None:
        raw = read_yaml_file(path, "config")  # missing, binary, empty, duplicate keys...
        if not isinstance(raw, Mapping):
            raise ConfigError("config", str(path), "must be a YAML mapping of sections")
    return config_from_dict(apply_overrides(raw, overrides))


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
