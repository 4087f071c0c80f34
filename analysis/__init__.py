"""Analysis of dplora_ray results: load run and sweep folders into pandas with a fixed
schema, privacy-utility and communication tables, PNG plots and a Markdown report.

Builds only on the package's public API (:mod:`dplora_ray.results` constants and
loaders, the sweep table of :mod:`dplora_ray.tune`, :func:`dplora_ray.config.load_config`).
matplotlib and transformers are imported only when a plot or a parameter count is made.
"""

from __future__ import annotations

from analysis.loading import Results, key_columns, load_results
from analysis.params import base_model_parameters
from analysis.report import Report, write_report
from analysis.tables import (
    accuracy_curves,
    communication_table,
    privacy_utility_pivot,
    privacy_utility_table,
)

__all__ = [
    "Report",
    "Results",
    "accuracy_curves",
    "base_model_parameters",
    "communication_table",
    "key_columns",
    "load_results",
    "privacy_utility_pivot",
    "privacy_utility_table",
    "write_report",
]
