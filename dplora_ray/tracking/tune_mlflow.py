"""MLflow for sweeps: Ray Tune's own ``MLflowLoggerCallback`` on the driver, one MLflow
run per trial (the trials' runners log no MLflow themselves: no run twice).

Tune's callback sets up the tracking URI and the experiment (:meth:`setup`); this
subclass makes each trial's run what ``dplora-ray train`` makes (:mod:`dplora_ray.
tracking`): named by the trial, the trial's resolved config as params, the per-round
metrics that the trial reports to Tune every round (``result["round"]``, step = its
``server_round``) and, when the trial ends, its report, artifacts and tags.

Resume: ``DIR/tracking.json`` maps trial names to MLflow run ids. A resumed sweep
reopens a trial's run; the trial replays its checkpoint's rounds to Tune and only the
steps missing from the run's history are logged, so a trial killed and resumed has one
point per round. Trials that an earlier attempt finished are completed in MLflow too
(rounds from ``rounds.parquet``) when their run misses rounds or was never ended.

A failure of MLflow warns once and turns MLflow off for the rest of the sweep.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback

from dplora_ray import results as R
from dplora_ray.config import TrackingConfig
from dplora_ray.fileio import one_line, write_json_atomic
from dplora_ray.outputs import finished_summary
from dplora_ray.tracking import TRACKING_FILE, read_state, summary_tags, write_run_report
from dplora_ray.tracking.sinks import MlflowRun, flat_config

__all__ = ["SweepMLflowCallback", "sync_finished"]


class SweepMLflowCallback(MLflowLoggerCallback):
    """One MLflow run per trial (see the module doc).

    Args:
        tracking: the trials' common ``tracking`` section.
        out: the sweep folder.
        trials: trial name -> (its config as plain data, its run folder), every trial.
        done: trials an earlier attempt finished (they do not run again).
    """

    def __init__(self, tracking: TrackingConfig, out: Path,
                 trials: Mapping[str, tuple[dict[str, Any], Path]],
                 done: list[str]) -> None:
        super().__init__(tracking_uri=tracking.mlflow_uri,
                         experiment_name=tracking.mlflow_experiment,
                         tags={"dplora_ray.sweep": str(out)})
        self.uri, self.experiment = tracking.mlflow_uri or "", tracking.mlflow_experiment
        self.out, self.trials, self.done = out, dict(trials), list(done)
        self.runs: dict[str, MlflowRun] = {}
        self.off = False

    # ------------------------------------------------------------------ guard, state
    def _guard(self, fn: Callable[[], Any]) -> Any:
        if self.off:
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - tracking must not sink the sweep
            self.off = True
            print(f"warning: tracking: MLflow failed ({one_line(exc, limit=200)}); no more "
                  f"MLflow logging in this sweep, which goes on (--resume logs what MLflow "
                  "misses)", file=sys.stderr)
            return None

    def _run_ids(self) -> dict[str, str]:
        mine = read_state(self.out).get("mlflow") or {}
        if mine.get("uri") != self.uri or mine.get("experiment") != self.experiment:
            return {}
        return dict(mine.get("runs") or {})

    def _open(self, name: str, touch: bool = True) -> MlflowRun:
        if name in self.runs:
            return self.runs[name]
        ids = self._run_ids()
        cfg_dict, folder = self.trials[name]
        run = MlflowRun(self.uri, self.experiment, ids.get(name), name=name,
                        tags={**(self.tags or {}), "trial_name": name,
                              "dplora_ray.output_dir": str(folder),
                              "privacy_mode": str(cfg_dict["privacy"]["mode"])},
                        touch=touch)
        run.log_params(flat_config(cfg_dict))
        ids[name] = run.run_id
        write_json_atomic({"mlflow": {"uri": self.uri, "experiment": self.experiment,
                                      "runs": ids}}, self.out / TRACKING_FILE)
        self.runs[name] = run
        return run

    def _end(self, name: str, summary: Mapping[str, Any] | None) -> None:
        run, folder = self._open(name), self.trials[name][1]
        if summary is not None:
            try:
                write_run_report(folder)
            except Exception as exc:  # noqa: BLE001 - a report is not worth the artifacts
                print(f"warning: tracking: no report for trial {name} ({one_line(exc)})",
                      file=sys.stderr)
            run.set_tags(summary_tags(summary))
            run.log_artifacts(folder)
        run.end("FINISHED" if summary is not None else "FAILED")

    # ------------------------------------------------------------------ Tune's hooks
    def setup(self, *args: Any, **kwargs: Any) -> None:
        self._guard(lambda: super(SweepMLflowCallback, self).setup(*args, **kwargs))
        self._guard(self._complete_done)

    def _complete_done(self) -> None:
        """Trials an earlier attempt finished whose run misses rounds or its end."""
        sync_finished(self, self.done)

    def log_trial_start(self, trial: Any) -> None:
        self._guard(lambda: self._open(trial.config["trial"]["name"]))

    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        if "round" not in result:  # the trial's final summary: logged at its end
            return
        row = {**result["round"], R.SERVER_ROUND: int(result["server_round"])}
        self._guard(lambda: self._open(trial.config["trial"]["name"]).log_round(row))

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        name = trial.config["trial"]["name"]
        summary = None if failed else finished_summary(self.trials[name][1])
        self._guard(lambda: self._end(name, summary))


def sync_finished(callback: SweepMLflowCallback, names: list[str]) -> None:
    """Complete the MLflow runs of finished trials ``names``: log the rounds of their
    ``rounds.parquet`` that a run misses; end, with artifacts and tags, a run that is not
    ``FINISHED``. Trials with neither a run nor tracking before get one now."""
    import pandas as pd

    for name in names:
        folder = callback.trials[name][1]
        summary = finished_summary(folder)
        if summary is None or not (folder / "rounds.parquet").is_file():
            continue
        run = callback._open(name, touch=False)  # MLflow takes metrics after the end too
        rows = pd.read_parquet(folder / "rounds.parquet").to_dict("records")
        logged = [run.log_round(row) for row in rows]
        if any(logged) or run.status != "FINISHED":
            callback._end(name, summary)
