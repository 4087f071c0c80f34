"""Experiment tracking with the ecosystem's own tools (issue 21; README "Experiment
tracking"): TensorBoard event files and MLflow runs, set by the ``tracking`` config section
(:class:`~dplora_ray.config.TrackingConfig`).

* :func:`check_tracking`, before any work: the packages a key needs are importable, and
  the MLflow URI is usable where that is cheap to tell (a sqlite file's folder exists, a
  server answers a TCP connect); else a one-line ConfigError naming the key, its value
  and the extra to install (exit 2 on the command line).
* :class:`Tracker`, one per run (``train``, or a sweep trial's runner): the runner calls
  :meth:`Tracker.log_rounds` once the folder is ready and after every round, once its
  checkpoint and result files are written; :meth:`Tracker.finish` after everything the
  run writes at its end (``summary.json``, the model card); :meth:`Tracker.close` in any
  case (an unfinished MLflow run ends ``FAILED``, ``KILLED`` on Ctrl-C).
* Resume: ``OUT/tracking.json`` holds the MLflow run id and the last round TensorBoard
  has on disk. A resumed run reopens that MLflow run and logs only the rounds whose step
  is not in its metric history; TensorBoard reopens with ``purge_step`` = the first round
  not confirmed. A killed and resumed run has one point per round in each. A finished
  run resumed with tracking keys set logs what its trackers miss.
* Failures: a tracker that fails (a server gone) warns once and is off for the rest of
  the run, which goes on; ``--resume`` later logs what is missing.
* Sweeps: the trials' runners write TensorBoard and report every round to Ray Tune;
  MLflow is logged on the driver by Tune's ``MLflowLoggerCallback``
  (:mod:`dplora_ray.tracking.tune_mlflow`), one MLflow run per trial.

``mlflow`` and ``tensorboardX`` are imported only when a key asks for them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from dplora_ray import results as R
from dplora_ray.config import ExperimentConfig, TrackingConfig, config_to_dict
from dplora_ray.errors import ConfigError
from dplora_ray.fileio import one_line, write_json_atomic
from dplora_ray.tracking.sinks import (
    ROUND_METRICS,
    MlflowRun,
    TensorBoardLog,
    flat_config,
    round_metrics,
)

__all__ = [
    "EXTRA",
    "ROUND_METRICS",
    "TENSORBOARD_DIR",
    "TRACKING_FILE",
    "Tracker",
    "check_tracking",
    "read_state",
    "round_metrics",
    "round_report",
    "summary_tags",
    "write_run_report",
]

TRACKING_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"
EXTRA = "pip install 'dplora-ray[tracking]'"
#: seconds an MLflow server has to answer a TCP connect before the run starts
PROBE_TIMEOUT_S = 5.0
#: the summary keys set as MLflow tags at the end
TAG_KEYS = ("privacy_mode", "privacy_unit", "epsilon", "delta", "stop_reason",
            "rounds_completed")
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def check_tracking(tracking: TrackingConfig, *, mlflow: bool = True) -> None:
    """Refuse, before any work, tracking keys that cannot work here (``mlflow=False``:
    the MLflow keys are someone else's, e.g. the sweep driver's).

    Raises:
        ConfigError: a package is missing (naming the extra), the sqlite file's folder
            does not exist, or no MLflow server answers at an ``http(s)`` URI.
    """
    if tracking.tensorboard and _missing("tensorboardX"):
        raise ConfigError("tracking.tensorboard", True,
                          f"needs the tensorboardX package: {EXTRA}")
    uri = tracking.mlflow_uri
    if not mlflow or uri is None:
        return
    key = "tracking.mlflow_uri"
    if _missing("mlflow"):
        raise ConfigError(key, uri, f"needs the mlflow package (mlflow-skinny is enough): "
                                    f"{EXTRA}")
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme.split("+")[0] in _DB_SCHEMES and _missing("sqlalchemy", "alembic"):
        raise ConfigError(key, uri, f"MLflow's database store needs sqlalchemy and alembic "
                                    f"(missing: {', '.join(_missing('sqlalchemy', 'alembic'))})"
                                    f": {EXTRA}")
    if scheme == "sqlite":
        folder = Path(uri[len("sqlite:///"):]).expanduser().parent
        if not folder.is_dir():
            raise ConfigError(key, uri, f"the database's folder {str(folder)!r} does not "
                                        "exist")
    elif scheme in ("http", "https"):
        host, port = parsed.hostname or "", parsed.port or (443 if scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
        except OSError as exc:
            raise ConfigError(key, uri, f"no MLflow server answers at {host}:{port} within "
                                        f"{PROBE_TIMEOUT_S:g} s ({one_line(exc)})") from None
        # a server that goes away mid-run costs seconds per call, not MLflow's minutes of
        # retries (the run warns once and goes on); the user's own settings win
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def read_state(folder: Path) -> dict[str, Any]:
    """``folder/tracking.json`` ({} when missing or unreadable)."""
    try:
        state = json.loads((folder / TRACKING_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def round_report(row: Mapping[str, Any]) -> dict[str, Any]:
    """What a sweep trial reports to Ray Tune for one round: the row's metrics under
    ``round`` (apart from the summary's names, which the trial reports at its end), its
    ``server_round``, and ``timesteps_total`` = the round (the step of Tune's loggers)."""
    r = int(row[R.SERVER_ROUND])
    return {"round": round_metrics(row), "server_round": r, "timesteps_total": r}


def summary_tags(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The MLflow tags of a finished run: :data:`TAG_KEYS` of its summary."""
    return {k: summary.get(k) for k in TAG_KEYS}


def write_run_report(folder: Path) -> None:
    """``dplora-ray analyze``'s ``report.md`` and ``plots/`` for a run folder."""
    from analysis.report import write_report

    write_report(folder)


class Tracker:
    """The trackers of one run (see the module doc).

    Args:
        cfg: the run's config (its ``tracking`` section says what is on).
        out: the run folder.
        say: where messages go.
        mlflow: log to MLflow here (False in a sweep trial: the driver does).
        on_round: also called with every round's row, the rows of the checkpoint first
            (a sweep trial reports them to Ray Tune).
    """

    def __init__(self, cfg: ExperimentConfig, out: str | Path,
                 say: Callable[[str], None] | None = None, *, mlflow: bool = True,
                 on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg, self.out = cfg, Path(out)
        self.say = say or (lambda m: print(m, file=sys.stderr))
        self.tracking = cfg.tracking
        self.use_mlflow = mlflow and self.tracking.mlflow_uri is not None
        self.use_tensorboard = self.tracking.tensorboard
        self.on_round = on_round
        check_tracking(self.tracking, mlflow=self.use_mlflow)
        self.mlflow: MlflowRun | None = None
        self.tensorboard: TensorBoardLog | None = None
        self.state: dict[str, Any] = {}
        self.reported = 0  # the last round given to on_round
        self.seen = 0  # rows of the runner's list already looked at
        self.opened = self.finished = False
        self.off: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self.use_mlflow or self.use_tensorboard or self.on_round is not None

    # ------------------------------------------------------------------ guard
    def _guard(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; the first failure of ``what`` warns and turns it off."""
        if what in self.off:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - tracking must not sink the run
            self.off.add(what)
            self.say(f"warning: tracking: {what} failed ({one_line(exc, limit=200)}); no "
                     f"more {what} logging in this run, which goes on (its results are in "
                     f"{self.out}; --resume {self.out} logs what {what} misses)")
            return None

    def _save(self) -> None:
        self._guard("tracking.json", lambda: write_json_atomic(self.state,
                                                               self.out / TRACKING_FILE))

    # ------------------------------------------------------------------ open
    def _open(self) -> None:
        if self.opened:
            return
        self.opened = True
        self.state = read_state(self.out)
        cfg_dict = config_to_dict(self.cfg)
        if self.use_mlflow:
            self.mlflow = self._guard("MLflow", lambda: self._open_mlflow(cfg_dict))
        if self.use_tensorboard:
            self.tensorboard = self._guard("TensorBoard",
                                           lambda: self._open_tensorboard(cfg_dict))
        self._save()

    def _open_mlflow(self, cfg_dict: dict[str, Any]) -> MlflowRun:
        uri, experiment = self.tracking.mlflow_uri or "", self.tracking.mlflow_experiment
        old = self.state.get("mlflow") or {}
        same = old.get("uri") == uri and old.get("experiment") == experiment
        run = MlflowRun(uri, experiment, old.get("run_id") if same else None,
                        name=self.out.name,
                        tags={"dplora_ray.output_dir": str(self.out.resolve()),
                              "privacy_mode": self.cfg.privacy.mode})
        run.log_params(flat_config(cfg_dict))
        self.state["mlflow"] = {"uri": uri, "experiment": experiment, "run_id": run.run_id,
                                "finished": bool(same and old.get("finished")
                                                 and run.reopened)}
        self.say(f"tracking: MLflow run {run.run_id} "
                 f"({'reopened' if run.reopened else 'new'}, {len(run.steps)} round(s) "
                 f"logged) in experiment {experiment!r} at {uri}")
        return run

    def _open_tensorboard(self, cfg_dict: dict[str, Any]) -> TensorBoardLog:
        logdir = self.out / TENSORBOARD_DIR
        old = self.state.get("tensorboard") or {}
        confirmed = int(old.get("rounds", 0))
        log = TensorBoardLog(logdir, confirmed, flat_config(cfg_dict),
                             "    " + yaml.safe_dump(cfg_dict, sort_keys=False)
                             .replace("\n", "\n    "),
                             [R.TRAIN_LOSS, R.EVAL_LOSS, R.EVAL_ACCURACY, R.EPSILON])
        self.state["tensorboard"] = {"rounds": confirmed,
                                     "finished": bool(old.get("finished"))}
        self.say(f"tracking: TensorBoard event files in {logdir} "
                 f"(tensorboard --logdir {logdir})")
        return log

    # ------------------------------------------------------------------ rounds
    def log_rounds(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Log every row (``rounds.parquet`` rows, in order) a tracker does not have yet."""
        if not self.enabled:
            return
        self._open()
        changed = False
        first = self.seen if self.seen <= len(rows) else 0  # the runner's rows only grow
        self.seen = len(rows)
        mlflow_run, tb = self.mlflow, self.tensorboard
        for row in rows[first:]:
            r = int(row[R.SERVER_ROUND])
            if self.on_round is not None and r > self.reported:
                self.on_round(dict(row))
                self.reported = r
            if mlflow_run is not None:
                self._guard("MLflow", mlflow_run.log_round, row)
            if tb is not None:
                if self._guard("TensorBoard", tb.log_round, row):
                    self.state["tensorboard"]["rounds"] = tb.confirmed
                    changed = True
        if changed:
            self._save()

    # ------------------------------------------------------------------ the end
    def finish(self, summary: dict[str, Any],
               rows: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """After everything the run writes: the rows still missing (``rows``: e.g. a
        finished run resumed with tracking on), TensorBoard's summary text, MLflow's
        report, artifacts and tags; both closed. Returns ``summary``."""
        if not self.enabled or self.finished:
            return summary
        if rows is not None:
            if self._complete():  # a finished run resumed again: nothing to log
                return summary
            self.log_rounds(rows)
        self._open()
        self.finished = True
        step = int(summary.get("rounds_completed") or 0)
        tb, mlflow_run = self.tensorboard, self.mlflow
        if tb is not None and "TensorBoard" not in self.off:
            if not self.state["tensorboard"].get("finished"):
                self._guard("TensorBoard", lambda: tb.log_summary(summary, step))
                self.state["tensorboard"]["finished"] = "TensorBoard" not in self.off
            self._guard("TensorBoard", tb.close)
        if mlflow_run is not None and "MLflow" not in self.off:
            if not self.state["mlflow"].get("finished"):
                self._guard("report", lambda: write_run_report(self.out))
                self._guard("MLflow", lambda: self._finish_mlflow(mlflow_run, summary))
                self.state["mlflow"]["finished"] = "MLflow" not in self.off
            else:
                self._guard("MLflow", lambda: mlflow_run.end("FINISHED"))
        self._save()
        return summary

    def _complete(self) -> bool:
        """``tracking.json`` says every tracker that is on has finished."""
        state = read_state(self.out)
        flow, tb = state.get("mlflow") or {}, state.get("tensorboard") or {}
        return self.on_round is None and (not self.use_tensorboard or bool(tb.get("finished"))) \
            and (not self.use_mlflow or (bool(flow.get("finished"))
                                         and flow.get("uri") == self.tracking.mlflow_uri
                                         and flow.get("experiment")
                                         == self.tracking.mlflow_experiment))

    def _finish_mlflow(self, run: MlflowRun, summary: Mapping[str, Any]) -> None:
        run.set_tags(summary_tags(summary))
        names = run.log_artifacts(self.out)
        run.end("FINISHED")
        self.say(f"tracking: MLflow run {run.run_id} finished: "
                 f"{len(run.steps)} round(s), artifacts {', '.join(names)}")

    def close(self) -> None:
        """End what :meth:`finish` did not (an error or Ctrl-C ended the run): the MLflow
        run ``FAILED`` (``KILLED`` on Ctrl-C), TensorBoard closed. Never raises."""
        if self.finished or not self.opened:
            return
        self.finished = True
        killed = isinstance(sys.exc_info()[1], KeyboardInterrupt)
        tb, mlflow_run = self.tensorboard, self.mlflow
        if tb is not None:
            self._guard("TensorBoard", tb.close)
        if mlflow_run is not None and "MLflow" not in self.off:
            self._guard("MLflow", lambda: mlflow_run.end("KILLED" if killed else "FAILED"))
