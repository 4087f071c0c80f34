"""Sweeps without Ray: the sweep file, its trials, the sweep folder and ``sweep.parquet``.

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

Modules: :mod:`~dplora_ray.sweeps.spec` (the sweep file and its trials),
:mod:`~dplora_ray.sweeps.table` (the ``sweep.parquet`` schema and rows),
:mod:`~dplora_ray.sweeps.folder` (the sweep folder, ``--resume``). Running the trials is
:mod:`dplora_ray.tune` (Ray Tune); importing this package imports no Ray.
"""

from __future__ import annotations

from dplora_ray.sweeps.folder import SweepRun, prepare_sweep
from dplora_ray.sweeps.spec import (
    Param,
    SweepSpec,
    TrialSpec,
    config_value,
    expand_trials,
    load_sweep,
    trial_overrides,
    trial_resources,
    with_cli_overrides,
)
from dplora_ray.sweeps.table import (
    CONTEXT_KEYS,
    SUMMARY_COLUMNS,
    SWEEP_COLUMNS,
    SWEEP_FILE,
    SWEEP_SCHEMA,
    TRIAL_ERROR,
    TRIAL_OK,
    TRIAL_PENDING,
    SweepTrialError,
    read_sweep,
    row_from_summary,
    sweep_table,
)

__all__ = [
    "CONTEXT_KEYS",
    "SUMMARY_COLUMNS",
    "SWEEP_COLUMNS",
    "SWEEP_FILE",
    "SWEEP_SCHEMA",
    "TRIAL_ERROR",
    "TRIAL_OK",
    "TRIAL_PENDING",
    "Param",
    "SweepRun",
    "SweepSpec",
    "SweepTrialError",
    "TrialSpec",
    "config_value",
    "expand_trials",
    "load_sweep",
    "prepare_sweep",
    "read_sweep",
    "row_from_summary",
    "sweep_table",
    "trial_overrides",
    "trial_resources",
    "with_cli_overrides",
]
