"""Sweeps: a search space over config keys, run as Ray Tune trials.

A sweep file (YAML) names a base config and a search space over dotted config keys::

    name: smoke
    base: ../configs/tiny.yaml          # relative to the sweep file, or to the cwd
    overrides:                          # fixed for every trial
      privacy.mode: dpsgd
      runtime.backend: inline
    cases:                              # optional: settings that go together, each
      - {data.recipe: synthetic}        # case crossed with the space's grid
      - {data.recipe: vader, data.test_size: 150}
    space:                              # dotted config key -> distribution
      privacy.target_epsilon: {grid: [2, inf]}
      lora.r: {grid: [2, 4]}
      federation.learning_rate: {loguniform: [1.0e-3, 1.0e-1]}
    num_samples: 1                      # every grid point is repeated this many times
    seed: 0                             # seeds the sampling of random distributions
    max_concurrent_trials: 2
    resources: {cpu: 1, gpu: 0}         # the trial's own process

``dplora-ray sweep FILE --set key=value`` adds fixed overrides from the command line
(they win over the file's overrides and cases; a key swept in ``space`` is refused), e.g.
to run a cluster sweep's trials shorter on a laptop.

Distributions: ``grid`` (every value, crossed with the other grid keys), ``choice`` (one
value drawn per trial), ``uniform`` / ``loguniform`` ``[low, high]`` (floats),
``randint`` ``[low, high]`` (integers, ``high`` exclusive). A bare list is a grid.

Special value: ``inf`` (or ``.inf``) for ``privacy.target_epsilon`` means *no privacy*:
that trial runs with ``privacy.mode=none`` (and no target epsilon); its
``privacy.target_epsilon`` column still reads ``inf``.

Each trial is one experiment (:func:`dplora_ray.run_experiment`) writing the same files as
``dplora-ray train`` into ``DIR/trials/<trial name>/``. ``DIR/sweep.parquet`` holds one row
per trial (columns: :data:`SWEEP_COLUMNS` plus the swept keys); it is rewritten after every
finished trial, so an interrupted sweep keeps what it finished.

Trials with ``runtime.backend: actors`` reserve their client-worker actors with a
``tune.PlacementGroupFactory``: one bundle for the trial itself (``resources``) and one
per worker (``runtime.cpus_per_worker`` / ``runtime.gpus_per_worker``, fractions allowed).
Inline trials reserve only their own bundle.

Invariants:
    * Every trial's config is built and validated before anything is written or Ray is
      started (bad sweep files fail with one :class:`~dplora_ray.errors.ConfigError`).
    * Trials, their names and their sampled values are a function of the sweep file only
      (``seed``), so ``--resume`` can match finished trial folders to trials.
    * Ray's temp dir (when this module starts Ray) is a fresh temp dir, and Tune's storage
      is ``DIR/tune``; nothing goes to ``~/ray_results`` or ``/tmp/ray``.
    * Ray is imported lazily (building the CLI parser stays light).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from dplora_ray import results as R
from dplora_ray.config import ExperimentConfig, config_from_dict, config_to_dict, load_config
from dplora_ray.errors import ConfigError, DpLoraError, OutputError

__all__ = [
    "BYTES_DOWN",
    "BYTES_UP",
    "CONTEXT_KEYS",
    "DELTA",
    "EPSILON",
    "ERROR",
    "EVAL_ACCURACY",
    "EVAL_ACCURACY_BEFORE",
    "EVAL_F1_MACRO",
    "EVAL_F1_WEIGHTED",
    "NOISE_MULTIPLIER",
    "Param",
    "ROUNDS_COMPLETED",
    "ROUNDS_PLANNED",
    "STATUS",
    "STATUS_ERROR",
    "STATUS_OK",
    "STATUS_PENDING",
    "STOP_REASON",
    "SUMMARY_COLUMNS",
    "SWEEP_COLUMNS",
    "SWEEP_FILE",
    "SWEEP_SCHEMA",
    "SweepSpec",
    "SweepTrialError",
    "TRAINABLE_PARAMETERS",
    "TRIAL",
    "TRIAL_DIR",
    "TrialSpec",
    "WALL_SECONDS",
    "add_parser",
    "config_value",
    "expand_trials",
    "load_sweep",
    "read_sweep",
    "row_from_summary",
    "run_sweep",
    "sweep_table",
    "trial_resources",
    "with_cli_overrides",
]

# ---------------------------------------------------------------- sweep.parquet schema
SWEEP_FILE = "sweep.parquet"
TRIAL = "trial"
STATUS = R.STATUS
ERROR = "error"
EVAL_ACCURACY = R.EVAL_ACCURACY
EVAL_F1_MACRO = R.EVAL_F1_MACRO
EVAL_F1_WEIGHTED = R.EVAL_F1_WEIGHTED
EVAL_ACCURACY_BEFORE = "eval_accuracy_before"
EPSILON = R.EPSILON
DELTA = "delta"
NOISE_MULTIPLIER = R.NOISE_MULTIPLIER
BYTES_UP = R.BYTES_UP  # total over the run (summary.json: bytes_up_total)
BYTES_DOWN = R.BYTES_DOWN  # total over the run (summary.json: bytes_down_total)
ROUNDS_COMPLETED = "rounds_completed"
ROUNDS_PLANNED = "rounds_planned"
STOP_REASON = "stop_reason"
TRAINABLE_PARAMETERS = "trainable_parameters"
WALL_SECONDS = "wall_seconds"
TRIAL_DIR = "trial_dir"

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_PENDING = "pending"  # not run (yet): the sweep was interrupted

SWEEP_SCHEMA = pa.schema(
    [
        (TRIAL, pa.string()),
        (STATUS, pa.string()),
        (ERROR, pa.string()),
        (EVAL_ACCURACY, pa.float64()),
        (EVAL_F1_MACRO, pa.float64()),
        (EVAL_F1_WEIGHTED, pa.float64()),
        (EVAL_ACCURACY_BEFORE, pa.float64()),
        # generation tasks (null otherwise)
        (R.EVAL_PERPLEXITY, pa.float64()),
        (R.EVAL_ROUGE_L, pa.float64()),
        ("eval_perplexity_before", pa.float64()),
        ("eval_rouge_l_before", pa.float64()),
        ("eval_loss", pa.float64()),
        (EPSILON, pa.float64()),
        (DELTA, pa.float64()),
        (NOISE_MULTIPLIER, pa.float64()),
        # true: the trial's noise came from privacy.noise_seed (public, not private)
        ("noise_reproducible", pa.bool_()),
        (BYTES_UP, pa.int64()),
        (BYTES_DOWN, pa.int64()),
        (ROUNDS_COMPLETED, pa.int64()),
        (ROUNDS_PLANNED, pa.int64()),
        (STOP_REASON, pa.string()),
        (TRAINABLE_PARAMETERS, pa.int64()),
        (WALL_SECONDS, pa.float64()),
        (TRIAL_DIR, pa.string()),
        # the empirical privacy audit (null when audit.enabled is false)
        (R.AUDIT_PASSED, pa.bool_()),
        *((k, pa.float64()) for k in R.AUDIT_SUMMARY_KEYS if k != R.AUDIT_PASSED),
    ]
)
SWEEP_COLUMNS: tuple[str, ...] = tuple(SWEEP_SCHEMA.names)

# Config keys recorded for every trial (swept or not), so analysis can group by them.
CONTEXT_KEYS: tuple[str, ...] = (
    "privacy.mode",
    "privacy.target_epsilon",
    "lora.r",
    "federation.num_clients",
    "model.name",
)
_CONTEXT_TYPES = {
    "privacy.mode": pa.string(),
    "privacy.target_epsilon": pa.float64(),
    "lora.r": pa.int64(),
    "federation.num_clients": pa.int64(),
    "model.name": pa.string(),
}

# summary.json key -> sweep column (every metric column of SWEEP_SCHEMA comes from one)
SUMMARY_COLUMNS: dict[str, str] = {
    "eval_accuracy": EVAL_ACCURACY,
    "eval_f1_macro": EVAL_F1_MACRO,
    "eval_f1_weighted": EVAL_F1_WEIGHTED,
    "eval_accuracy_before": EVAL_ACCURACY_BEFORE,
    "eval_perplexity": R.EVAL_PERPLEXITY,
    "eval_rouge_l": R.EVAL_ROUGE_L,
    "eval_perplexity_before": "eval_perplexity_before",
    "eval_rouge_l_before": "eval_rouge_l_before",
    "eval_loss": "eval_loss",
    "epsilon": EPSILON,
    "delta": DELTA,
    "noise_multiplier": NOISE_MULTIPLIER,
    "noise_reproducible": "noise_reproducible",
    "bytes_up_total": BYTES_UP,
    "bytes_down_total": BYTES_DOWN,
    "rounds_completed": ROUNDS_COMPLETED,
    "rounds_planned": ROUNDS_PLANNED,
    "stop_reason": STOP_REASON,
    "trainable_parameters": TRAINABLE_PARAMETERS,
    "wall_seconds": WALL_SECONDS,
    **{k: k for k in R.AUDIT_SUMMARY_KEYS},
}

EPSILON_KEY = "privacy.target_epsilon"
_SWEEP_KEYS = (
    "name",
    "description",
    "base",
    "overrides",
    "cases",
    "space",
    "num_samples",
    "seed",
    "max_concurrent_trials",
    "resources",
)
_DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
_RESOURCE_KEYS = ("cpu", "gpu")
# environment forwarded from the sweep driver into every trial process
_FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HOME",
    "DPLORA_RAY_CACHE",
    "DPLORA_DATA_DIR",
    "TOKENIZERS_PARALLELISM",
    "TRANSFORMERS_VERBOSITY",
    "OPENBLAS_CORETYPE",
)


# ---------------------------------------------------------------- the sweep file
def _is_inf(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("inf", "+inf", ".inf", "infinity")
    return isinstance(value, float) and math.isinf(value) and value > 0


def _normalise_value(value: Any) -> Any:
    """``inf`` spelled as a string becomes ``float('inf')``; YAML floats stay floats."""
    return math.inf if _is_inf(value) else value


@dataclass(frozen=True)
class Param:
    """One swept key and its distribution.

    Attributes:
        key: dotted config key (``lora.r``).
        kind: ``grid``, ``choice``, ``uniform``, ``loguniform`` or ``randint``.
        values: the values (``grid``, ``choice``) or ``(low, high)`` (the others).
    """

    key: str
    kind: str
    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        where = f"space.{self.key}"
        if self.kind not in _DISTRIBUTIONS:
            raise ConfigError(
                where, self.kind, f"unknown distribution; use one of {', '.join(_DISTRIBUTIONS)}"
            )
        if self.kind in ("grid", "choice"):
            if len(self.values) == 0:
                raise ConfigError(where, list(self.values), f"{self.kind} needs >= 1 value")
            return
        if len(self.values) != 2:
            raise ConfigError(where, list(self.values), f"{self.kind} needs [low, high]")
        low, high = self.values
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
        if not numeric or not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise ConfigError(
                where, list(self.values), f"{self.kind} needs finite numbers low < high"
            )
        if self.kind == "loguniform" and low <= 0:
            raise ConfigError(where, list(self.values), "loguniform needs low > 0")
        if self.kind == "randint" and not all(isinstance(v, int) for v in (low, high)):
            raise ConfigError(where, list(self.values), "randint needs integers")

    def sample(self, rng: np.random.Generator) -> Any:
        """One draw (not for ``grid``)."""
        if self.kind == "choice":
            return self.values[int(rng.integers(len(self.values)))]
        low, high = self.values
        if self.kind == "uniform":
            return float(rng.uniform(low, high))
        if self.kind == "loguniform":
            return float(math.exp(rng.uniform(math.log(low), math.log(high))))
        if self.kind == "randint":
            return int(rng.integers(low, high))
        raise ValueError(f"grid parameter {self.key} is not sampled")  # programming error


@dataclass(frozen=True)
class TrialSpec:
    """One trial: its name, the swept values and the resolved, validated config."""

    index: int
    name: str
    params: dict[str, Any]
    config: ExperimentConfig


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file.

    Attributes:
        name: sweep name (default: the file name without extension).
        path: the sweep file.
        base: the base config file (resolved).
        overrides: fixed ``dotted.key -> value`` overrides for every trial.
        cases: settings that go together (each a ``dotted.key -> value`` mapping, e.g. a
            data set with its task and test size); every case is crossed with the grid.
            Empty: one implicit case with no settings.
        space: the swept keys, in file order.
        num_samples: repetitions of each grid point (random keys drawn anew each time).
        seed: seed of the random draws.
        max_concurrent_trials: Tune's ``max_concurrent_trials`` (None: as many as fit).
        cpu / gpu: resources of the trial's own process (fractions allowed).
        description: free text.
    """

    name: str
    path: Path
    base: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    cases: tuple[dict[str, Any], ...] = ()
    space: tuple[Param, ...] = ()
    num_samples: int = 1
    seed: int = 0
    max_concurrent_trials: int | None = None
    cpu: float = 1.0
    gpu: float = 0.0
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``inf`` as the string ``"inf"``), for ``DIR/sweep.yaml``."""

        def plain(v: Any) -> Any:
            return "inf" if isinstance(v, float) and math.isinf(v) else v

        return {
            "name": self.name,
            "description": self.description,
            "sweep_file": str(self.path),
            "base": str(self.base),
            "overrides": {k: plain(v) for k, v in self.overrides.items()},
            "cases": [{k: plain(v) for k, v in c.items()} for c in self.cases],
            "space": {p.key: {p.kind: [plain(v) for v in p.values]} for p in self.space},
            "num_samples": self.num_samples,
            "seed": self.seed,
            "max_concurrent_trials": self.max_concurrent_trials,
            "resources": {"cpu": self.cpu, "gpu": self.gpu},
        }

    @property
    def swept(self) -> list[str]:
        """Keys that vary between trials: the cases' keys (first seen first), then the
        space's (sweep.parquet has a column for each)."""
        keys: dict[str, None] = {}
        for case in self.cases:
            keys.update(dict.fromkeys(case))
        keys.update(dict.fromkeys(p.key for p in self.space))
        return list(keys)


def _resolve_base(base: Any, sweep_path: Path) -> Path:
    if not isinstance(base, str) or not base.strip():
        raise ConfigError("base", base, f"must name the base config file (in {sweep_path})")
    for cand in (sweep_path.parent / base, Path(base)):
        if cand.expanduser().is_file():
            return cand.expanduser().resolve()
    raise ConfigError(
        "base", base, f"no such file, relative to {sweep_path.parent} or to the current folder"
    )


def _parse_cases(raw: Any, overrides: Mapping[str, Any],
                 space: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise ConfigError("cases", raw, "must be a non-empty list of mappings of dotted keys")
    out = []
    for i, case in enumerate(raw):
        if not isinstance(case, Mapping) or not case:
            raise ConfigError(f"cases[{i}]", case, "must be a non-empty mapping of dotted keys")
        for k in case:
            if not isinstance(k, str):
                raise ConfigError(f"cases[{i}]", k, "keys must be dotted config keys")
            if k in overrides or k in space:
                where = "a fixed override" if k in overrides else "swept in space"
                raise ConfigError(f"cases[{i}].{k}", case[k], f"is also {where}; set it in "
                                  "one place")
        out.append({str(k): _normalise_value(v) for k, v in case.items()})
    return tuple(out)


def with_cli_overrides(spec: SweepSpec, pairs: Sequence[str]) -> SweepSpec:
    """``spec`` with ``--set key=value`` pairs (YAML-typed values) added to its fixed
    overrides; they win over the sweep file's overrides and cases, and may not name a
    key swept in ``space``.

    Raises:
        ConfigError: a pair is not ``key=value`` or names a swept key.
    """
    import dataclasses

    from dplora_ray.config import parse_override

    extra: dict[str, Any] = {}
    for pair in pairs:
        key, value = parse_override(pair)
        if any(p.key == key for p in spec.space):
            raise ConfigError(f"--set {key}", value, "is swept in the sweep's space")
        extra[key] = _normalise_value(value)
    if not extra:
        return spec
    # the cases stay (so do the trials and their names' indices), minus the keys set here
    cases = tuple({k: v for k, v in c.items() if k not in extra} for c in spec.cases)
    return dataclasses.replace(spec, overrides={**spec.overrides, **extra}, cases=cases)


def _parse_param(key: Any, spec: Any) -> Param:
    if not isinstance(key, str):
        raise ConfigError("space", key, "keys must be dotted config keys")
    if isinstance(spec, (list, tuple)):
        return Param(key, "grid", tuple(_normalise_value(v) for v in spec))
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(
            f"space.{key}",
            spec,
            "must be a list (grid) or one of "
            "{grid: [...]}, {choice: [...]}, {uniform: [low, high]}, "
            "{loguniform: [low, high]}, {randint: [low, high]}",
        )
    ((kind, values),) = spec.items()
    if not isinstance(values, (list, tuple)):
        raise ConfigError(f"space.{key}.{kind}", values, "must be a list")
    return Param(key, str(kind), tuple(_normalise_value(v) for v in values))


def _number(key: str, value: Any, *, minimum: float, integer: bool) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer:
        ok = ok and isinstance(value, int)
    if not ok or not math.isfinite(value) or value < minimum:
        kind = "an integer" if integer else "a number"
        raise ConfigError(key, value, f"must be {kind} >= {minimum:g}")
    return value


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file (not yet the trial configs: see :func:`expand_trials`).

    Raises:
        ConfigError: naming the bad key (``space.lora.rr``, ``resources.tpu``...).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError("sweep", str(path), "no such file")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise ConfigError("sweep", str(path), f"is not valid YAML ({first})") from None
    if not isinstance(raw, Mapping):
        raise ConfigError("sweep", str(path), "must be a YAML mapping")
    for k in raw:
        if k not in _SWEEP_KEYS:
            import difflib

            close = difflib.get_close_matches(str(k), _SWEEP_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                str(k), raw[k], f"unknown sweep key in {p}; {hint}expected {', '.join(_SWEEP_KEYS)}"
            )
    base = _resolve_base(raw.get("base"), p)
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ConfigError("overrides", overrides, "must be a mapping of dotted keys to values")
    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, Mapping):
        raise ConfigError("space", space_raw, "must be a mapping of dotted keys to values")
    space = tuple(_parse_param(k, v) for k, v in space_raw.items())
    both = sorted(set(overrides) & set(space_raw))
    if both:
        raise ConfigError(
            f"space.{both[0]}", space_raw[both[0]], "is also a fixed override; set it in one place"
        )
    cases = _parse_cases(raw.get("cases"), overrides, space_raw)
    resources = raw.get("resources") or {}
    if not isinstance(resources, Mapping):
        raise ConfigError("resources", resources, "must be a mapping like {cpu: 1, gpu: 0}")
    for k in resources:
        if k not in _RESOURCE_KEYS:
            raise ConfigError(
                f"resources.{k}",
                resources[k],
                f"unknown resource; expected {', '.join(_RESOURCE_KEYS)}",
            )
    cpu = _number("resources.cpu", resources.get("cpu", 1.0), minimum=0.0, integer=False)
    if cpu <= 0:
        raise ConfigError("resources.cpu", cpu, "must be > 0 (fractions allowed)")
    gpu = _number("resources.gpu", resources.get("gpu", 0.0), minimum=0.0, integer=False)
    mct = raw.get("max_concurrent_trials")
    if mct is not None:
        mct = _number("max_concurrent_trials", mct, minimum=1, integer=True)
    name = raw.get("name") or p.stem
    if not isinstance(name, str):
        raise ConfigError("name", name, "must be a string")
    return SweepSpec(
        name=name,
        path=p.resolve(),
        base=base,
        overrides={str(k): _normalise_value(v) for k, v in overrides.items()},
        cases=cases,
        space=space,
        num_samples=_number("num_samples", raw.get("num_samples", 1), minimum=1, integer=True),
        seed=_number("seed", raw.get("seed", 0), minimum=0, integer=True),
        max_concurrent_trials=mct,
        cpu=float(cpu),
        gpu=float(gpu),
        description=str(raw.get("description") or ""),
    )


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "+".join(_fmt_value(x) for x in v)
    return str(v)


def _trial_name(index: int, params: Mapping[str, Any]) -> str:
    short = [k.rsplit(".", 1)[-1] for k in params]
    keys = [s if short.count(s) == 1 else k for s, k in zip(short, params)]
    body = "_".join(f"{k}={_fmt_value(v)}" for k, v in zip(keys, params.values()))
    body = re.sub(r"[^A-Za-z0-9._=+-]", "-", body)[:100]
    return f"t{index:03d}_{body}" if body else f"t{index:03d}"


def trial_overrides(spec: SweepSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """The overrides one trial applies to the base config.

    ``privacy.target_epsilon: inf`` becomes ``privacy.mode: none`` (no target epsilon).
    """
    out = dict(spec.overrides)
    out.update(params)
    if EPSILON_KEY in out and _is_inf(out[EPSILON_KEY]):
        out[EPSILON_KEY] = None
        out["privacy.mode"] = "none"
    return out


def expand_trials(spec: SweepSpec) -> list[TrialSpec]:
    """Every trial of the sweep, each with its config built and validated.

    Cases (in file order) are crossed with the grid keys (the last key varies fastest);
    each point is repeated ``num_samples`` times, random keys drawn in trial order from
    ``seed``.

    Raises:
        ConfigError: the first trial config that is invalid, naming the key.
    """
    grid = [p for p in spec.space if p.kind == "grid"]
    rng = np.random.default_rng(spec.seed)
    trials: list[TrialSpec] = []
    points = list(itertools.product(*[p.values for p in grid])) if grid else [()]
    for case, point in itertools.product(spec.cases or ({},), points):
        for _ in range(spec.num_samples):
            chosen = dict(zip((p.key for p in grid), point))
            params = {
                **case,
                **{p.key: chosen[p.key] if p.kind == "grid" else p.sample(rng)
                   for p in spec.space},
            }
            index = len(trials)
            name = _trial_name(index, params)
            try:
                cfg = load_config(spec.base, trial_overrides(spec, params))
            except ConfigError as exc:
                raise ConfigError(
                    exc.key, exc.value, f"{exc.reason} (sweep {spec.path.name}, trial {name})"
                ) from None
            trials.append(TrialSpec(index, name, params, cfg))
    return trials


def trial_resources(spec: SweepSpec, cfg: ExperimentConfig) -> list[dict[str, float]]:
    """Placement-group bundles of one trial: its own process, then one per worker actor
    (``runtime.backend: actors``). Zero-valued resources are left out."""

    def bundle(cpu: float, gpu: float) -> dict[str, float]:
        b = {"CPU": float(cpu)}
        if gpu > 0:
            b["GPU"] = float(gpu)
        return b

    bundles = [bundle(spec.cpu, spec.gpu)]
    if cfg.runtime.backend == "actors":
        rt = cfg.runtime
        bundles += [bundle(rt.cpus_per_worker, rt.gpus_per_worker) for _ in range(rt.num_workers)]
    return bundles


# ---------------------------------------------------------------- rows and sweep.parquet
def config_value(cfg: ExperimentConfig, key: str) -> Any:
    """The value of a dotted key in a config, as a sweep column records it:
    ``privacy.target_epsilon`` reads ``inf`` when the run is not private."""
    if key == EPSILON_KEY and not cfg.privacy.enabled:
        return math.inf
    if key == "seed":
        return cfg.seed
    section, name = key.split(".", 1)
    value = getattr(getattr(cfg, section), name)
    return list(value) if isinstance(value, tuple) else value


def _base_row(trial: TrialSpec, trial_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in SWEEP_COLUMNS}
    row[TRIAL] = trial.name
    row[STATUS] = STATUS_PENDING
    row[TRIAL_DIR] = str(trial_dir)
    for key in list(trial.params) + [k for k in CONTEXT_KEYS if k not in trial.params]:
        row[key] = config_value(trial.config, key)  # the config's type (2 -> 2.0 for floats)
    return row


def row_from_summary(base: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """A finished trial's row: ``base`` (trial, keys, trial_dir) plus the metrics of its
    ``summary.json``."""
    row = dict(base)
    for k, col in SUMMARY_COLUMNS.items():
        v = summary.get(k)
        row[col] = None if isinstance(v, str) and col != STOP_REASON else v
    row[STATUS] = STATUS_OK
    row[ERROR] = None
    return row


def _column_type(values: Sequence[Any]) -> pa.DataType:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.int64()
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.float64()
    return pa.string()


def sweep_table(rows: Sequence[Mapping[str, Any]], swept: Sequence[str]) -> pa.Table:
    """The sweep table: :data:`SWEEP_COLUMNS`, then the swept keys and :data:`CONTEXT_KEYS`
    (dotted names; each swept key in file order)."""
    fields = list(SWEEP_SCHEMA)
    extra = list(swept) + [k for k in CONTEXT_KEYS if k not in swept]
    cols: dict[str, list[Any]] = {}
    for f in SWEEP_SCHEMA:
        vals = [row.get(f.name) for row in rows]
        if pa.types.is_floating(f.type):
            vals = [None if v is None else float(v) for v in vals]
        elif pa.types.is_integer(f.type):
            vals = [None if v is None else int(v) for v in vals]
        cols[f.name] = vals
    for key in extra:
        vals = [row.get(key) for row in rows]
        tp = _CONTEXT_TYPES.get(key) or _column_type(vals)
        if pa.types.is_string(tp):
            vals = [
                None if v is None else (v if isinstance(v, str) else _fmt_value(v)) for v in vals
            ]
        elif pa.types.is_floating(tp):
            vals = [None if v is None else float(v) for v in vals]
        fields.append(pa.field(key, tp))
        cols[key] = vals
    # order: trial, swept + context keys, then the rest of the schema
    order = [TRIAL] + extra + [c for c in SWEEP_COLUMNS if c != TRIAL]
    schema = pa.schema([next(f for f in fields if f.name == n) for n in order])
    return pa.table({n: cols[n] for n in order}, schema=schema)


def _write_sweep(rows: Sequence[Mapping[str, Any]], swept: Sequence[str], out: Path) -> None:
    tmp = out / (SWEEP_FILE + ".tmp")
    pq.write_table(sweep_table(rows, swept), tmp)
    tmp.replace(out / SWEEP_FILE)


def read_sweep(out_dir: str | Path) -> pd.DataFrame:
    """``DIR/sweep.parquet`` as a DataFrame (one row per trial)."""
    return pd.read_parquet(Path(out_dir) / SWEEP_FILE)


# ---------------------------------------------------------------- the Tune trainable
class SweepTrialError(RuntimeError):
    """A trial's experiment failed; the message is one line (``Type: message``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):
        return (type(self), (self.message,))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(exc, DpLoraError):
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run folder that finished (not one that ended in an error)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if str(summary.get("stop_reason") or "error").startswith("error"):
        return None
    return summary


def _trainable(config: dict[str, Any], *, payload: Mapping[str, Any]) -> None:
    """One Tune trial = one experiment. ``config["trial"]`` names the trial; the config
    dicts travel in ``payload`` (``tune.with_parameters``)."""
    from ray import tune

    from dplora_ray import run_experiment

    name = config["trial"]["name"]
    job = payload["trials"][name]
    for k, v in payload["env"].items():
        os.environ.setdefault(k, v)
    if os.path.isdir(payload["cwd"]):  # relative paths in configs mean the driver's cwd
        os.chdir(payload["cwd"])
    out = Path(job["trial_dir"])
    summary = _finished_summary(out)  # finished before the sweep was interrupted?
    if summary is None:
        cfg = config_from_dict(job["config"])
        log_path = Path(tune.get_context().get_trial_dir() or ".") / "experiment.log"
        with open(log_path, "a") as log:

            def say(msg: str) -> None:
                log.write(msg + "\n")
                log.flush()

            try:
                # continue a trial killed mid-run from its last round checkpoint
                summary = run_experiment(cfg, out, resume=True, progress=False, log=say)
            except Exception as exc:  # recorded as this trial's error; the sweep goes on
                say(f"FAILED: {exc!r}")
                raise SweepTrialError(_one_line(exc)) from None
    metrics = {k: summary.get(k) for k in SUMMARY_COLUMNS}
    metrics = {k: v for k, v in metrics.items() if v is not None}
    metrics[TRIAL_DIR] = str(out)
    metrics["summary_json"] = json.dumps({k: summary.get(k) for k in SUMMARY_COLUMNS})
    tune.report(metrics)


def _error_text(err: BaseException | None) -> str:
    if err is None:
        return "unknown error"
    seen = set()
    e: Any = err
    while e is not None and id(e) not in seen:  # unwrap RayTaskError / TuneError
        seen.add(id(e))
        if isinstance(e, SweepTrialError):
            return e.message
        e = getattr(e, "cause", None) or e.__cause__
    text = str(err)
    for line in reversed(text.strip().splitlines()):
        m = re.search(r"SweepTrialError: (.*)$", line)
        if m:
            return m.group(1).strip()
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def _row_from_result(
    base: Mapping[str, Any], metrics: Mapping[str, Any] | None, error: BaseException | None
) -> dict[str, Any]:
    """ok (the trial reported its summary), error (it raised), else still pending (it was
    running or waiting when the sweep was interrupted)."""
    if error is None and metrics and "summary_json" in metrics:
        return row_from_summary(base, json.loads(metrics["summary_json"]))
    row = dict(base)
    if error is not None:
        row[STATUS] = STATUS_ERROR
        row[ERROR] = _error_text(error)
    return row


# ---------------------------------------------------------------- running a sweep
def _check_out(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError("--out", str(out), "exists and is not a folder")
    busy = out.is_dir() and any(out.iterdir())
    if resume:
        if not (out / "sweep.yaml").is_file():
            raise OutputError(
                "--out",
                str(out),
                "has no sweep.yaml; nothing to resume (run without --resume first)",
            )
        return
    if busy and not overwrite:
        raise OutputError(
            "--out",
            str(out),
            "exists and is not empty; pass --resume to "
            "continue that sweep, --overwrite to replace it, or a new folder",
        )


def _plan_doc(spec: SweepSpec, trials: Sequence[TrialSpec]) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        return "inf" if isinstance(v, float) and math.isinf(v) else v

    return {
        "sweep": spec.to_dict(),
        "trials": [
            {"name": t.name, "params": {k: plain(v) for k, v in t.params.items()}} for t in trials
        ],
    }


def _finished_rows(
    out: Path, trials: Sequence[TrialSpec], base_rows: Mapping[str, dict]
) -> dict[str, dict[str, Any]]:
    """Rows of trials an earlier (interrupted) run of this sweep finished."""
    done: dict[str, dict[str, Any]] = {}
    if (out / SWEEP_FILE).is_file():
        old = read_sweep(out)
        for rec in old.to_dict("records"):
            name = rec.get(TRIAL)
            if name in base_rows and rec.get(STATUS) == STATUS_OK:
                done[name] = {
                    k: (None if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in rec.items()
                }
                done[name].update(
                    {k: v for k, v in base_rows[name].items() if k not in SWEEP_COLUMNS}
                )  # keep exact swept values
    for t in trials:
        summary = _finished_summary(out / "trials" / t.name)
        if t.name not in done and summary is not None:
            done[t.name] = row_from_summary(base_rows[t.name], summary)
    return done


def _init_ray(address: str | None, num_cpus: int | None) -> tuple[bool, str | None]:
    """Connect to ``address`` / the job's cluster, or start a local Ray in a temp dir.
    Returns (whether we started or connected, the temp dir we made)."""
    import ray

    if ray.is_initialized():
        return False, None
    kwargs: dict[str, Any] = {"logging_level": "WARNING", "configure_logging": True}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or "auto", **kwargs)
        return True, None
    # an embedded single-user instance needs no token (Ray 2.60 would otherwise write
    # ~/.ray/auth_token); short temp dir: Ray's socket paths are limited in length
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = tempfile.mkdtemp(prefix="dplora-ray-")
    ray.init(
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        object_store_memory=512 * 1024 * 1024,
        _temp_dir=tmp,
        **kwargs,
    )
    return True, tmp


def run_sweep(
    spec: SweepSpec,
    out_dir: str | Path,
    *,
    address: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    num_cpus: int | None = None,
    verbose: int = 1,
) -> pd.DataFrame:
    """Run every trial of ``spec`` with ``ray.tune.Tuner`` and write ``DIR/sweep.parquet``.

    Args:
        spec: a loaded sweep (:func:`load_sweep`).
        out_dir: the sweep folder (``trials/``, ``tune/``, ``sweep.yaml``,
            ``sweep.parquet``).
        address: Ray cluster to use (default: the current Ray, the job's cluster when run
            by ``ray job submit``, else a local Ray started in a temp dir).
        resume: continue a sweep in ``out_dir``: trials that finished are kept, the others
            (not run, interrupted, failed) run again.
        overwrite: replace a non-empty ``out_dir``.
        num_cpus: CPUs of a locally started Ray (default: all).
        verbose: 0 silent, 1 Tune's status table (every 30 s and at the end).

    Returns:
        The sweep table (also in ``DIR/sweep.parquet``).
    """
    out = Path(out_dir).expanduser().resolve()
    trials = expand_trials(spec)  # validates every trial config before anything is written
    _check_out(out, resume, overwrite)
    plan = _plan_doc(spec, trials)
    if resume:
        old = yaml.safe_load((out / "sweep.yaml").read_text()) or {}
        if [t["name"] for t in old.get("trials", [])] != [t.name for t in trials]:
            raise OutputError(
                "--out",
                str(out),
                "holds a different sweep (its trials do not "
                "match this sweep file); use a new folder",
            )
    elif out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))

    swept = spec.swept
    trial_dirs = {t.name: out / "trials" / t.name for t in trials}
    base_rows = {t.name: _base_row(t, trial_dirs[t.name]) for t in trials}
    rows: dict[str, dict[str, Any]] = dict(base_rows)
    done = _finished_rows(out, trials, base_rows) if resume else {}
    rows.update(done)
    todo = [t for t in trials if t.name not in done]
    _write_sweep([rows[t.name] for t in trials], swept, out)
    if resume:
        print(
            f"resume: {len(done)} of {len(trials)} trials already finished, {len(todo)} to run",
            file=sys.stderr,
        )
    if not todo:
        return read_sweep(out)

    started, tmp = _init_ray(address, num_cpus)
    try:
        results = _fit(spec, todo, trial_dirs, rows, swept, trials, out, verbose)
    finally:
        if started:
            import ray

            ray.shutdown()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    for name, metrics, error in results:
        rows[name] = _row_from_result(base_rows[name], metrics, error)
    _write_sweep([rows[t.name] for t in trials], swept, out)
    return read_sweep(out)


def _fit(
    spec: SweepSpec,
    todo: Sequence[TrialSpec],
    trial_dirs: Mapping[str, Path],
    rows: dict[str, dict[str, Any]],
    swept: Sequence[str],
    trials: Sequence[TrialSpec],
    out: Path,
    verbose: int,
) -> list[tuple[str, Any, Any]]:
    from ray import tune

    payload = {
        "trials": {
            t.name: {"config": config_to_dict(t.config), "trial_dir": str(trial_dirs[t.name])}
            for t in todo
        },
        "env": {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        | {"TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error")},
        "cwd": os.getcwd(),
    }
    bundles = {t.name: trial_resources(spec, t.config) for t in todo}

    def resources(config: dict[str, Any]) -> Any:
        return tune.PlacementGroupFactory(bundles[config["trial"]["name"]])

    trainable = tune.with_resources(tune.with_parameters(_trainable, payload=payload), resources)
    grid = [{"name": t.name, **{k: _fmt_value(v) for k, v in t.params.items()}} for t in todo]
    base_rows = {t.name: _base_row(t, trial_dirs[t.name]) for t in todo}
    all_trials = trials

    class _RowWriter(tune.Callback):
        """Rewrites sweep.parquet after every finished or failed trial."""

        def _update(self, trial: Any, error: BaseException | None) -> None:
            try:
                name = trial.config["trial"]["name"]
                rows[name] = _row_from_result(base_rows[name], trial.last_result, error)
                _write_sweep([rows[t.name] for t in all_trials], swept, out)
            except Exception as exc:  # noqa: BLE001 - never let bookkeeping sink the sweep
                print(
                    f"sweep: could not update {SWEEP_FILE} ({exc!r}); it is written "
                    "again at the end",
                    file=sys.stderr,
                )

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._update(trial, None)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            err: BaseException | None = None
            try:
                err = trial.get_pickled_error() or trial.get_error()
            except Exception:  # noqa: BLE001 - storage hiccup: keep the generic message
                err = None
            self._update(trial, err or RuntimeError("trial failed"))

    attempt = 1 + len([d for d in (out / "tune").glob("run-*")]) if (out / "tune").is_dir() else 1
    # Tune's classic status table (CLIReporter): one compact table every 30 s and at the
    # end, one row per trial with the swept values and the final metrics. Ray's newer
    # output engine ignores a ProgressReporter, so it is switched off for this driver
    # unless the user chose otherwise.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    short = [k.rsplit(".", 1)[-1] for k in swept]
    reporter = tune.CLIReporter(
        parameter_columns={
            f"trial/{k}": (s if short.count(s) == 1 else k) for k, s in zip(swept, short)
        },
        metric_columns={
            EVAL_ACCURACY: "accuracy",
            EPSILON: "epsilon",
            ROUNDS_COMPLETED: "rounds",
            WALL_SECONDS: "seconds",
        },
        max_report_frequency=30,
        max_progress_rows=50,
        max_column_length=30,
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(grid)},
        tune_config=tune.TuneConfig(
            num_samples=1,
            max_concurrent_trials=spec.max_concurrent_trials,
            trial_name_creator=lambda t: t.config["trial"]["name"],
            trial_dirname_creator=lambda t: t.config["trial"]["name"],
            # a trial process imports torch/transformers once and runs several trials
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"run-{attempt}",
            storage_path=str(out / "tune"),
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            callbacks=[_RowWriter()],
            verbose=min(verbose, 1),
            progress_reporter=reporter,
        ),
    )
    t0 = time.perf_counter()
    grid_results = tuner.fit()
    results = []
    for res in grid_results:
        name = (res.config or {}).get("trial", {}).get("name")
        if name is None:
            continue
        results.append((name, res.metrics, res.error))
    if verbose:
        print(
            f"sweep: {len(results)} trial(s) in {time.perf_counter() - t0:.1f} s", file=sys.stderr
        )
    return results


# ---------------------------------------------------------------- command line
def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``dplora-ray sweep`` on the CLI's subparsers."""
    p = sub.add_parser(
        "sweep",
        help="run a sweep (search space over config keys) with Ray Tune; writes DIR/sweep.parquet",
    )
    p.add_argument("sweep", help="sweep file (YAML), e.g. sweeps/smoke.yaml")
    p.add_argument("--out", default=None, help="output folder (default: runs/sweep-<name>-<time>)")
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: RAY_ADDRESS / the job's cluster, else a local Ray)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep in --out (finished trials are kept)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty output folder"
    )
    p.add_argument(
        "--validate",
        action="store_true",
        help="only build and validate every trial config, then exit",
    )
    p.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs of a locally started Ray (default: all)"
    )
    p.add_argument("--quiet", action="store_true", help="no Tune progress table")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config key for every trial (repeatable; wins over the file's "
                        "overrides and cases), e.g. --set federation.rounds=20")
    p.set_defaults(func=_cmd_sweep)
    return p


def _cmd_sweep(args: argparse.Namespace) -> int:
    spec = with_cli_overrides(load_sweep(args.sweep), args.set)
    if args.validate:
        trials = expand_trials(spec)
        print(f"sweep {spec.name!r}: {len(trials)} trial(s), base {spec.base}; all valid")
        for t in trials:
            print(f"  {t.name}")
        return 0
    out = args.out or str(Path("runs") / f"sweep-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.perf_counter()
    df = run_sweep(
        spec,
        out,
        address=args.address,
        resume=args.resume,
        overwrite=args.overwrite,
        num_cpus=args.num_cpus,
        verbose=0 if args.quiet else 1,
    )
    counts = df[STATUS].value_counts().to_dict()
    text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"sweep {spec.name!r}: {len(df)} trial(s) ({text}) in {time.perf_counter() - t0:.1f} s")
    print(f"results: {Path(out).resolve() / SWEEP_FILE}")
    if counts.get(STATUS_PENDING):
        print("some trials did not run; continue with --resume", file=sys.stderr)
        return 1
    return 0
