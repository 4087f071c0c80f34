"""Sweeps on Ray Tune: every trial of a sweep file is one Tune trial (one experiment).

The sweep file language, its trials and the ``sweep.parquet`` table need no Ray and live in
:mod:`dplora_ray.sweeps` (this module re-exports their names, e.g. ``tune.load_sweep``,
``tune.SWEEP_COLUMNS``, ``tune.STATUS_OK``). Here: :func:`run_sweep` (the
``ray.tune.Tuner``), the trainable that runs one trial, and ``dplora-ray sweep``.

Invariants:
    * Every trial's config is built and validated before anything is written or Ray is
      started (bad sweep files fail with one :class:`~dplora_ray.errors.ConfigError`).
    * Trials, their names and their sampled values are a function of the sweep file only
      (``seed``), so ``--resume`` can match finished trial folders to trials.
    * Ray's temp dir (when this module starts Ray) is a fresh temp dir, and Tune's storage
      is ``DIR/tune``; nothing goes to ``~/ray_results`` or ``/tmp/ray``.
    * Ray is imported lazily (building the CLI parser stays light).
    * Before anything is written, Ray is started (an ``--address`` where nothing answers
      fails within 30 s) and every trial's placement group is checked against the
      cluster's nodes: one no node set can hold is refused (ConfigError, exit 2) instead
      of Tune waiting for it forever.
    * Tracking (the ``tracking`` section, :mod:`dplora_ray.tracking`): every trial reports
      each round to Tune (``result["round"]``, step ``timesteps_total`` = the round), so
      Tune's own loggers (its TensorBoard logger in ``DIR/tune``) see the rounds; a
      trial's runner writes its own TensorBoard folder; MLflow is Tune's
      ``MLflowLoggerCallback`` on the driver, one run per trial
      (:mod:`dplora_ray.tracking.tune_mlflow`). All trials share one MLflow store.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from dplora_ray.config import config_from_dict, config_to_dict
from dplora_ray.errors import ConfigError
from dplora_ray.fileio import one_line
from dplora_ray.ray_runtime import WORKER_ENV_DEFAULTS, RaySession, forwarded_env, start_ray
from dplora_ray.sweeps.folder import SweepRun, prepare_sweep
from dplora_ray.sweeps.spec import (
    EPSILON_KEY,
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
from dplora_ray.sweeps.spec import format_value as _fmt_value
from dplora_ray.sweeps.table import (
    BYTES_DOWN,
    BYTES_UP,
    CONTEXT_KEYS,
    DELTA,
    EPSILON,
    ERROR,
    EVAL_ACCURACY,
    EVAL_ACCURACY_BEFORE,
    EVAL_F1_MACRO,
    EVAL_F1_WEIGHTED,
    NOISE_MULTIPLIER,
    ROUNDS_COMPLETED,
    ROUNDS_PLANNED,
    STATUS,
    STOP_REASON,
    SUMMARY_COLUMNS,
    SWEEP_COLUMNS,
    SWEEP_FILE,
    SWEEP_SCHEMA,
    TRAINABLE_PARAMETERS,
    TRIAL,
    TRIAL_DIR,
    TRIAL_ERROR,
    TRIAL_OK,
    TRIAL_PENDING,
    WALL_SECONDS,
    SweepTrialError,
    read_sweep,
    row_from_summary,
    sweep_table,
)
from dplora_ray.sweeps.table import finished_summary as _finished_summary
from dplora_ray.sweeps.table import row_from_result as _row_from_result

__all__ = [
    "BYTES_DOWN",
    "BYTES_UP",
    "CONTEXT_KEYS",
    "DELTA",
    "EPSILON",
    "EPSILON_KEY",
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
    "TRIAL_ERROR",
    "TRIAL_OK",
    "TRIAL_PENDING",
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
    "trial_overrides",
    "trial_resources",
    "with_cli_overrides",
]

# the trial statuses under their old names (analysis/ and the tests read ``S.STATUS_OK``)
STATUS_OK = TRIAL_OK
STATUS_ERROR = TRIAL_ERROR
STATUS_PENDING = TRIAL_PENDING


# ---------------------------------------------------------------- the Tune trainable
def _trainable(config: dict[str, Any], *, payload: Mapping[str, Any]) -> None:
    """One Tune trial = one experiment. ``config["trial"]`` names the trial; the config
    dicts travel in ``payload`` (``tune.with_parameters``)."""
    from ray import tune

    from dplora_ray import run_experiment
    from dplora_ray.tracking import Tracker, round_report

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
                # every round to Tune (the checkpoint's first): Tune's loggers and the
                # driver's MLflow callback take them; MLflow is the driver's alone
                tracker = Tracker(cfg, out, say, mlflow=False,
                                  on_round=lambda row: tune.report(round_report(row)))
                # continue a trial killed mid-run from its last round checkpoint
                summary = run_experiment(cfg, out, resume=True, progress=False, log=say,
                                         tracker=tracker)
            except Exception as exc:  # recorded as this trial's error; the sweep goes on
                say(f"FAILED: {exc!r}")
                raise SweepTrialError(one_line(exc)) from None
    elif (out / "rounds.parquet").is_file():  # its rounds again, for what missed them
        for row in pd.read_parquet(out / "rounds.parquet").to_dict("records"):
            tune.report(round_report(row))
    metrics = {k: summary.get(k) for k in SUMMARY_COLUMNS}
    metrics = {k: v for k, v in metrics.items() if v is not None}
    metrics[TRIAL_DIR] = str(out)
    metrics["summary_json"] = json.dumps({k: summary.get(k) for k in SUMMARY_COLUMNS})
    metrics["timesteps_total"] = summary.get(ROUNDS_COMPLETED)  # the step of the last round
    tune.report(metrics)


# ---------------------------------------------------------------- running a sweep
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
    session: RaySession | None = None

    def connect(trials: list[TrialSpec]) -> None:  # a new sweep: before anything is written
        nonlocal session
        _check_tracking(trials)
        if not resume:
            session = _start_checked(spec, trials, address, num_cpus)

    try:
        run = prepare_sweep(spec, out_dir, resume=resume, overwrite=overwrite,
                            before_write=connect)
        if not run.todo:
            callback = _mlflow_callback(run)
            if callback is not None:  # finished trials missing from MLflow, if any
                from dplora_ray.tracking.tune_mlflow import sync_finished

                callback._guard(lambda: sync_finished(callback, list(run.trial_dirs)))
            return read_sweep(run.out)
        if session is None:
            session = _start_checked(spec, run.todo, address, num_cpus)
        results = _fit(spec, run, verbose)
    finally:
        if session is not None:
            session.shutdown()
    for name, metrics, error in results:
        run.rows[name] = _row_from_result(run.base_rows[name], metrics, error)
    run.write()
    return read_sweep(run.out)


def _check_tracking(trials: list[TrialSpec]) -> None:
    """Before anything is written: the trials share one MLflow store and experiment (the
    driver logs them), and the tracking packages are here (ConfigError otherwise)."""
    from dplora_ray.tracking import check_tracking

    first = trials[0].config.tracking
    for t in trials[1:]:
        tr = t.config.tracking
        for key in ("mlflow_uri", "mlflow_experiment"):
            if getattr(tr, key) != getattr(first, key):
                raise ConfigError(f"tracking.{key}", getattr(tr, key),
                                  f"differs between trials {trials[0].name!r} "
                                  f"({getattr(first, key)!r}) and {t.name!r}: a sweep logs "
                                  "to one MLflow experiment")
    check_tracking(first)
    for t in trials:
        check_tracking(t.config.tracking, mlflow=False)


def _mlflow_callback(run: SweepRun) -> Any:
    """Tune's MLflow callback for ``run``'s trials (None without tracking.mlflow_uri)."""
    tracking = run.trials[0].config.tracking
    if tracking.mlflow_uri is None:
        return None
    from dplora_ray.tracking.tune_mlflow import SweepMLflowCallback

    todo = {t.name for t in run.todo}
    return SweepMLflowCallback(
        tracking, run.out,
        {t.name: (config_to_dict(t.config), run.trial_dirs[t.name]) for t in run.trials},
        done=[t.name for t in run.trials if t.name not in todo])


def _start_checked(spec: SweepSpec, trials: list[TrialSpec], address: str | None,
                   num_cpus: int | None) -> RaySession:
    """Start (or join) Ray, then refuse trials whose placement group no node set can
    ever hold (Tune would wait for them forever): a ConfigError naming the key."""
    from dplora_ray.ray_runtime import worker_placement

    session = start_ray(address, env_address=True, num_cpus=num_cpus,
                        temp_prefix="dplora-ray-", address_key="--address")
    try:
        seen: set[tuple[float, ...]] = set()
        for t in trials:
            rt = t.config.runtime
            n = rt.num_workers if rt.backend == "actors" else 0
            sig = (spec.cpu, spec.gpu, n, rt.cpus_per_worker, rt.gpus_per_worker)
            if sig in seen:
                continue
            seen.add(sig)
            head = trial_resources(spec, t.config)[:1]
            found = worker_placement(session.ray, n, rt.cpus_per_worker,
                                     rt.gpus_per_worker, head=head)
            if found is not None:
                key, problem = found
                value = (getattr(spec, key.split(".")[1]) if key.startswith("resources.")
                         else getattr(rt, key.split(".")[1]))
                raise ConfigError(key, value, f"trial {t.name!r} (its process: "
                                  f"{spec.cpu:g} CPU, {spec.gpu:g} GPU; {n} worker(s) of "
                                  f"{rt.cpus_per_worker:g} CPU, {rt.gpus_per_worker:g} GPU) "
                                  f"can never be placed: {problem}")
    except BaseException:
        session.shutdown()
        raise
    return session


def _fit(spec: SweepSpec, run: SweepRun, verbose: int) -> list[tuple[str, Any, Any]]:
    """Run ``run.todo`` with a ``ray.tune.Tuner``; ``(name, metrics, error)`` per trial.
    ``sweep.parquet`` is rewritten after every finished or failed trial."""
    from ray import tune

    todo, out, swept = run.todo, run.out, run.swept
    payload = {
        "trials": {
            t.name: {"config": config_to_dict(t.config), "trial_dir": str(run.trial_dirs[t.name])}
            for t in todo
        },
        "env": forwarded_env(WORKER_ENV_DEFAULTS),
        "cwd": os.getcwd(),
    }
    bundles = {t.name: trial_resources(spec, t.config) for t in todo}

    def resources(config: dict[str, Any]) -> Any:
        return tune.PlacementGroupFactory(bundles[config["trial"]["name"]])

    trainable = tune.with_resources(tune.with_parameters(_trainable, payload=payload), resources)
    grid = [{"name": t.name, **{k: _fmt_value(v) for k, v in t.params.items()}} for t in todo]

    class _RowWriter(tune.Callback):
        """Rewrites sweep.parquet after every finished or failed trial."""

        def _update(self, trial: Any, error: BaseException | None) -> None:
            try:
                name = trial.config["trial"]["name"]
                run.rows[name] = _row_from_result(run.base_rows[name], trial.last_result, error)
                run.write()
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
            # one fresh process per trial: a reused trial process grew by about 2.8 GB
            # per SmolLM2 trial (3.7 -> 11.4 GB after 3 trials of
            # sweeps/private_recipe.yaml, 2026-12-04), so a long sweep ran out of memory;
            # importing torch again costs seconds against minutes per trial
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=f"run-{attempt}",
            storage_path=str(out / "tune"),
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            callbacks=[_RowWriter(), *[c for c in [_mlflow_callback(run)] if c is not None]],
            verbose=min(verbose, 1),
            progress_reporter=reporter,
        ),
    )
    t0 = time.perf_counter()
    grid_results = tuner.fit()
    results = []
    for i in range(len(grid_results)):
        res = grid_results[i]
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
    if counts.get(TRIAL_PENDING):
        print("some trials did not run; continue with --resume", file=sys.stderr)
        return 1
    return 0
