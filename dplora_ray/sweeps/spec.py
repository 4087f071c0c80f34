"""The sweep file: parsing and validating it, and expanding it into trials.

:func:`load_sweep` reads and checks a sweep file (the language is described in
:mod:`dplora_ray.sweeps`), :func:`with_cli_overrides` adds ``--set`` pairs,
:func:`expand_trials` builds and validates every trial's config, names it and draws its
random values, and :func:`trial_resources` gives a trial's placement-group bundles.

Invariants:
    * Trials, their names and their sampled values are a function of the sweep file only
      (``seed``), so ``--resume`` can match finished trial folders to trials.
    * Every trial's config is built and validated here; a bad sweep file fails with one
      :class:`~dplora_ray.errors.ConfigError` naming the key.
    * No Ray, no torch.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dplora_ray.config import ExperimentConfig, load_config
from dplora_ray.config.yamlfile import read_yaml_file
from dplora_ray.errors import ConfigError

__all__ = [
    "EPSILON_KEY",
    "Param",
    "SweepSpec",
    "TrialSpec",
    "config_value",
    "expand_trials",
    "format_value",
    "load_sweep",
    "trial_name",
    "trial_overrides",
    "trial_resources",
    "with_cli_overrides",
]

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
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
#: the most trials one sweep may expand to (``num_samples`` included): beyond it,
#: expanding and validating the trials alone would take hours
MAX_TRIALS = 100_000


def _finite(value: float) -> bool:
    """``math.isfinite`` that also takes integers too large for a float (False)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


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
        if self.kind == "randint" and numeric and all(isinstance(v, int) for v in (low, high)):
            if not (_INT64_MIN <= low and high <= _INT64_MAX):  # numpy draws int64
                raise ConfigError(where, list(self.values),
                                  "randint bounds must lie in [-2**63, 2**63 - 1]")
        if not numeric or not (_finite(low) and _finite(high)) or low >= high:
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


def _number(key: str, value: Any, *, minimum: float, integer: bool,
            maximum: float | None = None) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer:
        ok = ok and isinstance(value, int)
    if not ok or not _finite(value) or value < minimum:
        kind = "an integer" if integer else "a number"
        raise ConfigError(key, value, f"must be {kind} >= {minimum:g}")
    if maximum is not None and value > maximum:
        raise ConfigError(key, value, f"must be <= {maximum:,}")
    return value


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file (not yet the trial configs: see :func:`expand_trials`).

    Raises:
        ConfigError: naming the bad key (``space.lora.rr``, ``resources.tpu``...).
    """
    p = Path(path)
    raw = read_yaml_file(p, "sweep")  # missing, binary, empty, duplicate keys...
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
        num_samples=_number("num_samples", raw.get("num_samples", 1), minimum=1, integer=True,
                            maximum=MAX_TRIALS),
        seed=_number("seed", raw.get("seed", 0), minimum=0, integer=True, maximum=_INT64_MAX),
        max_concurrent_trials=mct,
        cpu=float(cpu),
        gpu=float(gpu),
        description=str(raw.get("description") or ""),
    )


def format_value(v: Any) -> str:
    """A value as trial names and string columns spell it (``inf``, 4 digits, ``a+b``)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "+".join(format_value(x) for x in v)
    return str(v)


def trial_name(index: int, params: Mapping[str, Any]) -> str:
    """``t<index>_<key>=<value>_...``: short keys unless two end alike, file-name safe."""
    short = [k.rsplit(".", 1)[-1] for k in params]
    keys = [s if short.count(s) == 1 else k for s, k in zip(short, params)]
    body = "_".join(f"{k}={format_value(v)}" for k, v in zip(keys, params.values()))
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
    count = max(1, len(spec.cases)) * math.prod(len(p.values) for p in grid) * spec.num_samples
    if count > MAX_TRIALS:
        raise ConfigError("num_samples", spec.num_samples,
                          f"the sweep would have {count:,} trials (cases x grid x "
                          f"num_samples); at most {MAX_TRIALS:,} are allowed")
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
            name = trial_name(index, params)
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

