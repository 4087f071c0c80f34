"""Checks of ``model.*`` and ``lora.*`` against the model itself, run by the driver before
any worker starts (a worker's failure is slower and, on Ray, harder to read).

* :func:`check_model_folder`: a local checkpoint folder holds a ``config.json`` that is a
  JSON object and weights (``model.safetensors``, ``pytorch_model.bin`` or a sharded
  index of them), none of them truncated (a safetensors file's header is read and its
  tensors' extent compared with the file size: no tensor is loaded).
* :func:`check_model_fits`: ``model.max_length`` within the model's context
  (``max_position_embeddings``), and every ``lora.target_modules`` name present in the
  model (its skeleton is built on the ``meta`` device: no memory, no weights read).

Every failure is a :class:`~dplora_ray.errors.ModelError` (or ``ConfigError``) naming
the key, the value and the file.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from dplora_ray.config import LoraSection, ModelConfig
from dplora_ray.errors import ConfigError, ModelError
from dplora_ray.fileio import one_line

__all__ = ["check_model_fits", "check_model_folder", "model_context"]

_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length",
                 "seq_length")


def _bad(name: str, reason: str) -> ModelError:
    return ModelError("model.name", name, reason)


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise _bad(name, f"{path.name} cannot be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(name, f"{path.name} is not valid JSON ({one_line(exc, 120)})") from None


def _check_safetensors(path: Path, name: str) -> None:
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or length > min(_MAX_HEADER, size - 8):
                raise _bad(name, f"{path.name} is truncated or not a safetensors file "
                                 f"({size:,} bytes)")
            header = json.loads(fh.read(length).decode("utf-8"))
    except OSError as exc:
        raise _bad(name, f"{path.name} cannot be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError):
        raise _bad(name, f"{path.name} is truncated or not a safetensors file (its header "
                         "is not JSON)") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items()
                   if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        raise _bad(name, f"{path.name} is not a safetensors file (bad header)") from None
    if 8 + length + end > size:
        raise _bad(name, f"{path.name} is truncated ({size:,} bytes; its header "
                         f"promises {8 + length + end:,})")


def _check_weights_file(path: Path, name: str) -> None:
    if not path.is_file():
        raise _bad(name, f"weights file {path.name} is missing")
    if path.suffix == ".safetensors":
        _check_safetensors(path, name)
        return
    with open(path, "rb") as fh:  # torch.save's zip format: its directory is at the end
        zipped = fh.read(2) == b"PK"
    if zipped and not zipfile.is_zipfile(path):
        raise _bad(name, f"{path.name} is truncated (not a complete zip archive)")


def check_model_folder(path: Path, name: str) -> None:
    """``path`` (from ``model.name`` = ``name``) holds a usable checkpoint; see the module
    doc. Raises ModelError naming the file that is wrong."""
    config = _read_json(path / "config.json", name)
    if not isinstance(config, dict):
        raise _bad(name, f"config.json holds a JSON {type(config).__name__}, not an object")
    for weights in _WEIGHTS:
        if (path / weights).is_file():
            _check_weights_file(path / weights, name)
            return
    for index in _INDEXES:
        if (path / index).is_file():
            doc = _read_json(path / index, name)
            shards = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(shards, dict) or not shards:
                raise _bad(name, f"{index} has no weight_map")
            for shard in sorted(set(map(str, shards.values()))):
                _check_weights_file(path / shard, name)
            return
    raise _bad(name, "folder holds no weights (model.safetensors, pytorch_model.bin or a "
                     "sharded index of them)")


def model_context(config: Any) -> int | None:
    """The longest sequence the model's positions cover (None: not stated)."""
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_model_fits(source: str, model: ModelConfig, lora: LoraSection | None) -> None:
    """``model.max_length`` within the model's context and ``lora.target_modules`` (unless
    None: no adapter) present in the model; ``source`` is :func:`prepare_model`'s."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, revision=model.revision)
    except Exception as exc:  # noqa: BLE001 - an unreadable or unknown config
        raise _bad(model.name, f"config.json could not be read ({one_line(exc, 200)})"
                   ) from None
    context = model_context(config)
    if context is not None and model.max_length > context:
        raise ConfigError("model.max_length", model.max_length,
                          f"exceeds the model's context of {context} tokens "
                          "(max_position_embeddings)")
    if lora is None:
        return
    try:
        with torch.device("meta"):  # the skeleton only: no memory, no weights read
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001, S110 - the worker's load reports what is wrong
        return
    present = {n.rsplit(".", 1)[-1] for n, _ in skeleton.named_modules()}
    unknown = [m for m in lora.target_modules if m not in present]
    if unknown:
        raise ModelError("lora.target_modules", list(lora.target_modules),
                         f"module {unknown[0]!r} not found in the model")
