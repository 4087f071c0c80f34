"""``dplora-ray analyze DIR``: report.md and PNG plots for a sweep or run folder."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``dplora-ray analyze`` on the CLI's subparsers."""
    p = sub.add_parser(
        "analyze",
        help="write report.md and PNG plots for a sweep folder (sweep.parquet) or a run folder",
    )
    p.add_argument("dir", help="sweep folder or run folder")
    p.add_argument(
        "--out", default=None, help="where to write report.md and plots/ (default: DIR itself)"
    )
    p.set_defaults(func=_cmd_analyze)
    return p


def _cmd_analyze(args: argparse.Namespace) -> int:
    from analysis.report import write_report
    from analysis.tables import markdown_table

    report = write_report(args.dir, args.out)
    pivot = report.tables.get("privacy_utility_pivot")
    if pivot is not None and not pivot.empty:
        show = pivot.copy()
        show.columns = [f"r={c}" for c in show.columns]
        print("mean test accuracy (rows: target epsilon, columns: LoRA rank)")
        print(markdown_table(show, {c: ".4f" for c in show.columns}, index=True))
    for p in report.plots:
        print(f"plot: {p}")
    print(f"report: {report.path}")
    return 0
