"""The ``tracking`` section of a config (:class:`TrackingConfig`): experiment tracking with
TensorBoard and MLflow (issue 21; :mod:`dplora_ray.tracking` does the logging). On its
own so that :mod:`dplora_ray.config.sections` stays short; re-exported there and by
:mod:`dplora_ray.config`.

Only the form of the values is checked here (no package is imported): whether the
packages are installed and the MLflow store can be reached is checked when a run or a
sweep starts, before any work (:func:`dplora_ray.tracking.check_tracking`).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse

from dplora_ray.config.checks import check as _check

__all__ = ["MLFLOW_SCHEMES", "TrackingConfig"]

#: URI schemes of ``tracking.mlflow_uri`` (no scheme: a local folder, MLflow's file store)
MLFLOW_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https",
                  "databricks")


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking (issue 21; README "Experiment tracking"). Off by default; none
    of it changes what a run computes, so every key may change on ``--resume``.

    Attributes:
        tensorboard: write TensorBoard event files under ``OUT/tensorboard/`` (per
            round the columns of ``rounds.parquet``; the resolved config as
            hyperparameters and as text).
        mlflow_uri: MLflow tracking URI (``sqlite:///mlflow.db``, ``file:./mlruns``, a
            local folder, or a server ``http://host:5000``); None: no MLflow. One MLflow
            run per ``train`` and per sweep trial: the flattened config as params, the
            ``rounds.parquet`` columns as metrics with ``step`` = round, the adapter,
            results, report and plots as artifacts, and ``privacy_mode``,
            ``privacy_unit``, ``epsilon`` as tags.
        mlflow_experiment: the MLflow experiment the runs go to (created if missing).
    """

    tensorboard: bool = False
    mlflow_uri: str | None = None
    mlflow_experiment: str = "dplora_ray"

    def __post_init__(self) -> None:
        _check(bool(self.mlflow_experiment.strip()), "tracking.mlflow_experiment",
               self.mlflow_experiment, "must not be empty")
        uri = self.mlflow_uri
        if uri is None:
            return
        key = "tracking.mlflow_uri"
        _check(bool(uri.strip()) and uri == uri.strip(), key, uri,
               "must be a non-empty URI without surrounding spaces (or null for no MLflow)")
        parsed = urlparse(uri)
        scheme = parsed.scheme.lower()
        if len(scheme) == 1:  # a Windows drive letter: a local folder
            scheme = ""
        _check(scheme in ("", *MLFLOW_SCHEMES), key, uri,
               f"unknown scheme {parsed.scheme!r}; use sqlite:///PATH.db, file:PATH, a "
               "local folder, or an MLflow server http(s)://HOST:PORT")
        if scheme == "sqlite":
            _check(uri.startswith("sqlite:///") and len(uri) > len("sqlite:///"), key, uri,
                   "needs a database file: sqlite:///relative/path.db or "
                   "sqlite:////absolute/path.db")
        if scheme in ("http", "https"):
            _check(bool(parsed.hostname), key, uri, "names no host (http://HOST:PORT)")
            try:
                parsed.port  # noqa: B018 - raises on a bad port
            except ValueError:
                _check(False, key, uri, "has an invalid port")
