"""The sweep layers: :mod:`dplora_ray.sweeps` (no Ray) under :mod:`dplora_ray.tune` (the
Ray Tune adapter), and one Ray start-up helper (:mod:`dplora_ray.ray_runtime`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dplora_ray import ray_runtime
from dplora_ray import tune as S
from dplora_ray.sweeps import spec, table


def _imports_ray(module: str) -> bool:
    code = f"import sys, {module}; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.strip() == "True"


@pytest.mark.parametrize("module", ["dplora_ray.sweeps", "dplora_ray.ray_runtime"])
def test_importing_the_ray_free_layers_leaves_ray_out(module: str) -> None:
    assert not _imports_ray(module)


# what ``dplora_ray.tune`` exported before the sweep layers moved to dplora_ray.sweeps
_TUNE_NAMES = (
    "BYTES_DOWN BYTES_UP CONTEXT_KEYS DELTA EPSILON ERROR EVAL_ACCURACY EVAL_ACCURACY_BEFORE "
    "EVAL_F1_MACRO EVAL_F1_WEIGHTED NOISE_MULTIPLIER Param ROUNDS_COMPLETED ROUNDS_PLANNED "
    "STATUS STATUS_ERROR STATUS_OK STATUS_PENDING STOP_REASON SUMMARY_COLUMNS SWEEP_COLUMNS "
    "SWEEP_FILE SWEEP_SCHEMA SweepSpec SweepTrialError TRAINABLE_PARAMETERS TRIAL TRIAL_DIR "
    "TrialSpec WALL_SECONDS add_parser config_value expand_trials load_sweep read_sweep "
    "row_from_summary run_sweep sweep_table trial_resources with_cli_overrides "
    "EPSILON_KEY trial_overrides _finished_summary _row_from_result"
).split()


def test_tune_re_exports_the_sweep_names() -> None:
    for name in _TUNE_NAMES:
        assert hasattr(S, name), name
    assert (S.TRIAL_OK, S.TRIAL_ERROR, S.TRIAL_PENDING) == ("ok", "error", "pending")
    assert (S.STATUS_OK, S.STATUS_ERROR, S.STATUS_PENDING) == ("ok", "error", "pending")
    assert S.load_sweep is spec.load_sweep and S.SWEEP_SCHEMA is table.SWEEP_SCHEMA


def test_forwarded_env_is_the_set_variables_plus_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k in ray_runtime.FORWARDED_ENV:
        monkeypatch.delenv(k, raising=False)
    assert ray_runtime.forwarded_env() == {}
    assert ray_runtime.worker_runtime_env() is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENBLAS_L2_SIZE", "1048576")
    monkeypatch.setenv("NOT_FORWARDED", "x")
    env = ray_runtime.forwarded_env(ray_runtime.WORKER_ENV_DEFAULTS)
    assert env == {"HF_HUB_OFFLINE": "1", "OPENBLAS_L2_SIZE": "1048576",
                   "TRANSFORMERS_VERBOSITY": "error"}
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    assert ray_runtime.worker_runtime_env({"TRANSFORMERS_VERBOSITY": "error"}) == {
        "env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "info",
                     "OPENBLAS_L2_SIZE": "1048576"}}
