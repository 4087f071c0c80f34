"""The two trackers a run writes to: :class:`MlflowRun` (one MLflow run, created or
reopened by id) and :class:`TensorBoardLog` (event files of one run folder), each logging
a round at most once. Used by :class:`dplora_ray.tracking.Tracker` (``train`` and a sweep
trial's runner) and by the sweep driver's MLflow callback
(:mod:`dplora_ray.tracking.tune_mlflow`).

``mlflow`` and ``tensorboardX`` are imported when an object is made, never at import.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dplora_ray import results as R

__all__ = [
    "ARTIFACT_DIRS",
    "ARTIFACT_FILES",
    "MAX_PARAM_CHARS",
    "ROUND_METRICS",
    "STEP_METRIC",
    "MlflowRun",
    "TensorBoardLog",
    "flat_config",
    "round_metrics",
    "tag_text",
]

#: the per-round metrics: the numeric columns of ``rounds.parquet`` (a NaN or None, e.g.
#: accuracy of a round that was not evaluated or epsilon without privacy, is not logged)
ROUND_METRICS = (R.TRAIN_LOSS, R.EVAL_LOSS, R.EVAL_ACCURACY, R.EVAL_F1_MACRO,
                 R.EVAL_F1_WEIGHTED, R.EVAL_PERPLEXITY, R.EVAL_ROUGE_L, R.EPSILON,
                 R.EPSILON_MEAN, R.NOISE_MULTIPLIER, R.BYTES_UP, R.BYTES_DOWN,
                 R.ROUND_SECONDS, R.NUM_CLIENTS_SAMPLED, R.NUM_CLIENTS_COMPLETED)
#: logged every round (always finite): its MLflow history says which rounds a run has
STEP_METRIC = R.ROUND_SECONDS
#: the entries of a run folder uploaded as MLflow artifacts (plus every top-level
#: ``*.md``: the report); the adapter folder holds the model card. Never
#: ``checkpoint.pt`` (the secret noise key), nor ``clients.parquet`` (per-client metadata)
ARTIFACT_FILES = ("config.yaml", "summary.json", "rounds.parquet", "ledger.json",
                  "audit.json")
ARTIFACT_DIRS = ("adapter", "plots")
#: MLflow params are cut to this many characters (old servers allow 500)
MAX_PARAM_CHARS = 500
#: MLflow's batch limit on params and tags
_BATCH = 100


def tag_text(value: Any) -> str:
    """A value as MLflow tag or param text: strings as they are, the rest as JSON
    (``null``, ``true``, ``2.5``, ``["q_proj", "v_proj"]``)."""
    return value if isinstance(value, str) else json.dumps(value)


def flat_config(cfg_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``config_to_dict`` output as dotted keys (``lora.r``), without ``tracking.*``
    (where a run is tracked is no parameter of it, and may change on resume)."""
    out: dict[str, Any] = {}
    for section, values in cfg_dict.items():
        if section == "tracking":
            continue
        if isinstance(values, Mapping):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return out


def round_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite :data:`ROUND_METRICS` of a ``rounds.parquet`` row."""
    out = {}
    for key in ROUND_METRICS:
        value = row.get(key)
        if value is None or isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out


# ----------------------------------------------------------------------------- MLflow
class MlflowRun:
    """One MLflow run: reopened when ``run_id`` names a live run of this store, else
    created in ``experiment`` (created too if missing) with ``name`` and ``tags``.

    Attributes:
        run_id: the run's id.
        reopened: an existing run was reopened (a resumed run); it is set ``RUNNING``
            again unless ``touch`` is False.
        status: the run's status before this object (``RUNNING`` for a new run).
        steps: the rounds the run already has (the history of :data:`STEP_METRIC`).
    """

    def __init__(self, uri: str, experiment: str, run_id: str | None, *, name: str,
                 tags: Mapping[str, str], touch: bool = True) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.reopened = False
        self.status = "RUNNING"
        run = None
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
            except Exception:  # noqa: BLE001 - gone, or another store: a new run
                run = None
            if run is not None and run.info.lifecycle_stage != "active":
                run = None
        if run is not None:
            self.run_id = run.info.run_id
            self.status = str(run.info.status)
            if touch:
                self.client.update_run(self.run_id, status="RUNNING")
            self.params = dict(run.data.params)
            self.steps = {int(m.step) for m in
                          self.client.get_metric_history(self.run_id, STEP_METRIC)}
            self.reopened = True
            return
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else \
            self.client.create_experiment(experiment)
        run = self.client.create_run(exp_id, run_name=name, tags=dict(tags))
        self.run_id = run.info.run_id
        self.params = {}
        self.steps = set()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log the params the run does not have yet (a reopened run keeps its first
        values: MLflow refuses to change a param)."""
        from mlflow.entities import Param

        todo = [Param(k, tag_text(v)[:MAX_PARAM_CHARS]) for k, v in params.items()
                if k not in self.params]
        for i in range(0, len(todo), _BATCH):
            self.client.log_batch(self.run_id, params=todo[i:i + _BATCH])
        self.params.update({p.key: p.value for p in todo})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, tag_text(v)) for k, v in tags.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, tags=items[i:i + _BATCH])

    def log_round(self, row: Mapping[str, Any]) -> bool:
        """Log a round's metrics with ``step`` = its round, unless the run has it (one
        ``log_batch``: all of a round or none of it). True when logged."""
        from mlflow.entities import Metric

        step = int(row[R.SERVER_ROUND])
        if step in self.steps:
            return False
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in round_metrics(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.steps.add(step)
        return True

    def log_artifacts(self, folder: Path) -> list[str]:
        """Upload a run folder's shareable results (:data:`ARTIFACT_FILES`,
        :data:`ARTIFACT_DIRS`, top-level ``*.md``); the names uploaded."""
        done = []
        for name in ARTIFACT_DIRS:
            if (folder / name).is_dir():
                self.client.log_artifacts(self.run_id, str(folder / name), name)
                done.append(name)
        files = [folder / n for n in ARTIFACT_FILES] + sorted(folder.glob("*.md"))
        for path in files:
            if path.is_file() and not path.name.startswith("."):
                self.client.log_artifact(self.run_id, str(path))
                done.append(path.name)
        return done

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)
        self.status = status


# ----------------------------------------------------------------------------- TensorBoard
class TensorBoardLog:
    """TensorBoard event files in ``logdir``, rounds ``confirmed + 1`` on.

    A folder that already has event files is reopened with ``purge_step = confirmed +
    1``: TensorBoard drops whatever earlier writers logged from that step on (a round
    logged but not confirmed before a kill), so each round shows once. A new folder gets
    the config as hyperparameters (the HParams dashboard, with ``metrics`` as its
    columns) and as text.
    """

    def __init__(self, logdir: Path, confirmed: int, hparams: Mapping[str, Any],
                 config_text: str, metrics: Iterable[str]) -> None:
        from tensorboardX import SummaryWriter

        existing = logdir.is_dir() and any(logdir.glob("events.out.tfevents.*"))
        self.confirmed = confirmed
        # a unique file name: two writers in one second would otherwise share one
        self.writer = SummaryWriter(str(logdir), purge_step=confirmed + 1 if existing else None,
                                    filename_suffix=f".{os.getpid()}.{time.time_ns()}")
        if not existing:
            from tensorboardX.summary import hparams as hparams_summary

            values = {k: v if isinstance(v, (bool, int, float, str)) else tag_text(v)
                      for k, v in hparams.items()}
            writer = self.writer._get_file_writer()
            for summary in hparams_summary(values, {m: 0.0 for m in metrics}):
                writer.add_summary(summary)
            self.writer.add_text("config", config_text, 0)
            self.writer.flush()

    def log_round(self, row: Mapping[str, Any]) -> bool:
        step = int(row[R.SERVER_ROUND])
        if step <= self.confirmed:
            return False
        for key, value in round_metrics(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # on disk before the round counts as confirmed
        self.confirmed = step
        return True

    def log_summary(self, summary: Mapping[str, Any], step: int) -> None:
        text = json.dumps({k: v for k, v in summary.items() if k != "audit"}, indent=2)
        self.writer.add_text("summary", "\n".join("    " + t for t in text.splitlines()),
                             step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
