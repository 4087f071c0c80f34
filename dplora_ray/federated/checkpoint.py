"""Checkpoint and resume.

After every round (and once before round 1) ``checkpoint.pt`` holds all a run needs to
go on exactly: the global LoRA state and the server optimizer's state, the privacy ledger,
the RNG position (the round), the run's secret noise key (the ONLY copy: this file must
not be shared, docs/privacy.md), the cohort history, the result rows so far and the
evaluations. It is written whole or not at all (:func:`dplora_ray.fileio.write_atomic`).

:func:`resume_point` validates a folder to resume; :func:`compare_configs` refuses any
config key that would change what the resumed rounds compute
(:data:`RESUMABLE_RUNTIME_KEYS` and ``tracking.*`` may change); :func:`check_data`
refuses data that changed underneath the run (the checkpoint holds content hashes of the
encoded training data, the test split and the client partition,
:func:`~dplora_ray.federated.planning.data_fingerprint`).
A v2 checkpoint (no data fingerprint) cannot be continued: the data it was trained on
cannot be checked; a finished v2 run with all its result files still resumes (to nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dplora_ray.config import ExperimentConfig, config_from_dict, config_to_dict
from dplora_ray.errors import ConfigError, DataError, OutputError, PrivacyError
from dplora_ray.fileio import one_line, write_atomic
from dplora_ray.privacy.streams import NoiseKey

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "RESUMABLE_RUNTIME_KEYS",
    "check_data",
    "compare_configs",
    "load_checkpoint",
    "noise_key_of",
    "plain",
    "resume_point",
    "write_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "dplora_ray.checkpoint/v3"  # v2: the secret noise key; v3: data hashes
#: readable, not continuable (no data fingerprint): see :func:`check_data`
CHECKPOINT_FORMAT_V2 = "dplora_ray.checkpoint/v2"
#: the parts of a data fingerprint, in the order a message names them
_DATA_PARTS = {"train": "the training data", "test": "the test split",
               "partition": "the client partition"}
#: keys a resumed run may change: where and how clients run, never what they compute
#: (docs/privacy.md); every other key, runtime.bf16_autocast, runtime.gpus_per_worker,
#: model.dtype, model.quantization and the torch thread count included, must stay as it
#: was. model.gradient_checkpointing only trades memory for time: the recomputed forward
#: is the same, and the updates were measured bitwise equal with and without it
#: (tests/test_gradient_checkpointing.py)
RESUMABLE_RUNTIME_KEYS = ("runtime.backend", "runtime.num_workers", "runtime.address",
                          "runtime.connect_timeout_s",
                          "runtime.cpus_per_worker", "runtime.on_client_failure",
                          "runtime.round_timeout_s", "runtime.max_worker_restarts",
                          "runtime.kill_worker_at_round", "model.gradient_checkpointing")
#: every ``tracking.*`` key may change too: tracking only records what was computed
RESUMABLE_PREFIX = "tracking."


def plain(obj: Any) -> Any:
    """Python scalars instead of numpy ones (checkpoints load with weights_only=True)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def write_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` with ``torch.save``, whole or not at all."""
    write_atomic(path, lambda fh: torch.save(payload, fh))


def noise_key_of(ck: dict[str, Any], out: Path) -> NoiseKey:
    """The noise key stored in a checkpoint (OutputError when missing or damaged)."""
    stored = ck.get("noise_key")
    if not isinstance(stored, dict) or not isinstance(stored.get("secret"), str):
        raise OutputError("--resume", str(out), f"{CHECKPOINT_FILE} holds no noise key")
    try:
        return NoiseKey.from_hex(stored["secret"], bool(stored.get("reproducible")))
    except PrivacyError:
        raise OutputError("--resume", str(out),
                          f"{CHECKPOINT_FILE} holds a damaged noise key") from None


def load_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The checkpoint of a run folder (None when it has none).

    Raises:
        OutputError: the file exists but is not a readable checkpoint.
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, unsafe pickle ...
        raise OutputError("--resume", str(run_dir),
                          f"{CHECKPOINT_FILE} cannot be read ({one_line(exc, limit=160)})") from None
    if isinstance(ck, dict) and ck.get("format") == "dplora_ray.checkpoint/v1":
        raise OutputError("--resume", str(run_dir),
                          f"{CHECKPOINT_FILE} was written by an older dplora_ray whose noise "
                          "was derived from the public seed; it cannot be continued "
                          "privately: start a new run")
    if not isinstance(ck, dict) or ck.get("format") not in (CHECKPOINT_FORMAT,
                                                             CHECKPOINT_FORMAT_V2):
        raise OutputError("--resume", str(run_dir),
                          f"{CHECKPOINT_FILE} is not a {CHECKPOINT_FORMAT} checkpoint")
    return ck


def check_data(ck: dict[str, Any], current: dict[str, str] | None, cfg: ExperimentConfig,
               run_dir: Path) -> None:
    """Refuse to continue the run of ``ck`` on data other than it started with.

    Args:
        ck: the checkpoint (``data_fingerprint``: part -> hash; absent in v2).
        current: :func:`~dplora_ray.federated.planning.data_fingerprint` of the data as
            loaded now (None: only check that ``ck`` has a fingerprint).

    Raises:
        OutputError: a v2 checkpoint (no fingerprint to check against).
        DataError: naming the data key (``data.path`` or ``data.recipe``; for the
            partition alone ``federation.partition``) and what changed.
    """
    stored = ck.get("data_fingerprint")
    if not isinstance(stored, dict):
        raise OutputError("--resume", str(run_dir),
                          f"{CHECKPOINT_FILE} is a {ck.get('format')} checkpoint, written "
                          "before data fingerprints: this version cannot check that the data "
                          "are the ones the run started with, so it will not continue it; "
                          "start a new run")
    if current is None:
        return
    changed = [p for p in _DATA_PARTS if stored.get(p) != current.get(p)]
    if not changed:
        return
    d = cfg.data
    key, value = (("federation.partition", cfg.federation.partition) if changed == ["partition"]
                  else ("data.path", d.path) if d.path is not None else ("data.recipe", d.recipe))
    what = " and ".join(_DATA_PARTS[p] for p in changed)
    prints = ", ".join(f"{p} {str(stored.get(p))[:12]} -> {current[p][:12]}" for p in changed)
    raise DataError(key, value, f"{what} changed since the run started (fingerprint "
                                f"{prints}); resume needs the same data")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix:
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = v
    return out


def compare_configs(saved: ExperimentConfig, given: ExperimentConfig, run_dir: Path
                     ) -> list[str]:
    """Refuse a config that would not continue the saved run exactly; return the
    :data:`RESUMABLE_RUNTIME_KEYS` that differ (where and how clients run: they never
    change what is computed). A change of ``runtime.cpus_per_worker`` that changes the
    torch thread count (``runtime.torch_threads`` unset) is refused too."""
    old, new = _flat(config_to_dict(saved)), _flat(config_to_dict(given))
    changed_runtime = []
    if saved.runtime.threads != given.runtime.threads:
        key = ("runtime.torch_threads" if old.get("runtime.torch_threads")
               != new.get("runtime.torch_threads") else "runtime.cpus_per_worker")
        raise ConfigError(key, new.get(key),
                          f"changes the torch thread count of the run being resumed in "
                          f"{str(run_dir)!r} ({saved.runtime.threads} -> "
                          f"{given.runtime.threads}), and with it the floating-point "
                          "results; resume with the same thread count or start a new run")
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key in RESUMABLE_RUNTIME_KEYS or key.startswith(RESUMABLE_PREFIX):
            changed_runtime.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
            continue
        why = " (it changes what is computed)" if key.startswith("runtime.") else ""
        raise ConfigError(key, new.get(key),
                          f"differs from the run being resumed in {str(run_dir)!r} "
                          f"({old.get(key)!r}){why}; resume with that run's config "
                          "(omit CONFIG) or start a new run")
    return changed_runtime


def resume_point(cfg: ExperimentConfig, out: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """Validate ``out`` as a run to resume with ``cfg``; its checkpoint (None: start at
    round 1, in ``out`` if it holds a run that never finished a round)."""
    if out.exists() and not out.is_dir():
        raise OutputError("--resume", str(out), "exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return None, []
    ck = load_checkpoint(out)
    if ck is not None:
        try:
            saved = config_from_dict(ck["config"])
        except ConfigError as exc:
            raise OutputError("--resume", str(out),
                              f"the checkpoint's config is invalid ({exc})") from None
    elif (out / "config.yaml").is_file():
        from dplora_ray.config import load_config

        saved = load_config(out / "config.yaml")
    else:
        raise OutputError("--resume", str(out),
                          "holds no dplora-ray run (no config.yaml); nothing to resume")
    return ck, compare_configs(saved, cfg, out)
