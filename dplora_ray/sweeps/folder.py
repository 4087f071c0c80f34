"""The sweep folder (``DIR/``): checking ``--out``, writing the plan (``sweep.yaml``) and
the first ``sweep.parquet``, and finding the trials an earlier run already finished.

:func:`prepare_sweep` does everything a sweep does before any trial runs; the Ray Tune
adapter (:mod:`dplora_ray.tune`) then runs :attr:`SweepRun.todo` and writes the rows back.

Invariants:
    * Every trial's config is built and validated before anything is written.
    * ``--resume`` keeps the trials that finished (an ``ok`` row, or a ``summary.json``
      that did not end in an error) and refuses a folder that holds another sweep.
    * ``--out`` is checked writable first; ``--overwrite`` deletes only what a sweep
      writes (:data:`~dplora_ray.outputs.SWEEP_OUTPUTS`) and refuses a folder holding
      anything else.
    * No Ray.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dplora_ray.errors import OutputError
from dplora_ray.fileio import write_text_atomic
from dplora_ray.outputs import (
    SWEEP_OUTPUTS,
    check_overwrite,
    check_writable,
    clear_outputs,
    entries,
)
from dplora_ray.sweeps.spec import SweepSpec, TrialSpec, expand_trials
from dplora_ray.sweeps.table import (
    STATUS,
    SWEEP_COLUMNS,
    SWEEP_FILE,
    TRIAL,
    TRIAL_OK,
    base_row,
    finished_summary,
    read_sweep,
    row_from_summary,
    write_sweep,
)

__all__ = ["PLAN_FILE", "SweepRun", "check_out", "finished_rows", "plan_doc", "prepare_sweep"]

PLAN_FILE = "sweep.yaml"


@dataclass
class SweepRun:
    """A prepared sweep folder.

    Attributes:
        out: the sweep folder (absolute).
        trials: every trial of the sweep, in order.
        swept: the swept keys (a ``sweep.parquet`` column each).
        trial_dirs: trial name -> its run folder (``out/trials/<name>``).
        base_rows: trial name -> its row before it ran (pending).
        rows: trial name -> its current row (finished ones included).
        todo: the trials still to run.
    """

    out: Path
    trials: list[TrialSpec]
    swept: list[str]
    trial_dirs: dict[str, Path]
    base_rows: dict[str, dict[str, Any]]
    rows: dict[str, dict[str, Any]]
    todo: list[TrialSpec]

    def write(self) -> None:
        """Rewrite ``sweep.parquet`` from :attr:`rows`."""
        write_sweep([self.rows[t.name] for t in self.trials], self.swept, self.out)


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """``out`` may hold this sweep: empty or new, ``overwrite`` (only a sweep's own files in
    it), or ``resume`` with a plan; and it can be created and written.

    Raises:
        OutputError: naming ``--out`` (``--overwrite`` for files a sweep did not write).
    """
    if out.exists() and not out.is_dir():
        raise OutputError("--out", str(out), "exists and is not a folder")
    busy = out.is_dir() and bool(entries(out))
    if resume:
        if not (out / PLAN_FILE).is_file():
            raise OutputError(
                "--out",
                str(out),
                "has no sweep.yaml; nothing to resume (run without --resume first)",
            )
    elif busy and not overwrite:
        raise OutputError(
            "--out",
            str(out),
            "exists and is not empty; pass --resume to "
            "continue that sweep, --overwrite to replace it, or a new folder",
        )
    elif busy:
        check_overwrite(out, SWEEP_OUTPUTS, what="sweep")
    check_writable(out, "--out")



def plan_doc(spec: SweepSpec, trials: Sequence[TrialSpec]) -> dict[str, Any]:
    """``sweep.yaml``: the sweep and its trials' names and values (``inf`` as a string)."""
    def plain(v: Any) -> Any:
        return "inf" if isinstance(v, float) and math.isinf(v) else v

    return {
        "sweep": spec.to_dict(),
        "trials": [
            {"name": t.name, "params": {k: plain(v) for k, v in t.params.items()}} for t in trials
        ],
    }


def finished_rows(
    out: Path, trials: Sequence[TrialSpec], base_rows: Mapping[str, dict]
) -> dict[str, dict[str, Any]]:
    """Rows of trials an earlier (interrupted) run of this sweep finished."""
    done: dict[str, dict[str, Any]] = {}
    if (out / SWEEP_FILE).is_file():
        old = read_sweep(out)
        for rec in old.to_dict("records"):
            name = rec.get(TRIAL)
            if name in base_rows and rec.get(STATUS) == TRIAL_OK:
                done[name] = {
                    k: (None if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in rec.items()
                }
                done[name].update(
                    {k: v for k, v in base_rows[name].items() if k not in SWEEP_COLUMNS}
                )  # keep exact swept values
    for t in trials:
        summary = finished_summary(out / "trials" / t.name)
        if t.name not in done and summary is not None:
            done[t.name] = row_from_summary(base_rows[t.name], summary)
    return done



def prepare_sweep(spec: SweepSpec, out_dir: str | Path, *, resume: bool = False,
                  overwrite: bool = False,
                  before_write: Callable[[list[TrialSpec]], None] | None = None) -> SweepRun:
    """Validate every trial, check and (re)create the folder, write ``sweep.yaml`` and a
    first ``sweep.parquet`` (finished trials ``ok``, the others pending).
    ``before_write(trials)`` runs after every check, before anything is written (the
    Tune adapter starts Ray there and checks the trials can be placed).

    Raises:
        ConfigError: a trial config is invalid.
        OutputError: ``out_dir`` is not usable (see :func:`check_out`) or, with
            ``resume``, holds a different sweep.
    """
    out = Path(out_dir).expanduser().resolve()
    trials = expand_trials(spec)  # validates every trial config before anything is written
    check_out(out, resume, overwrite)
    plan = plan_doc(spec, trials)
    if resume:
        old = yaml.safe_load((out / PLAN_FILE).read_text()) or {}
        if [t["name"] for t in old.get("trials", [])] != [t.name for t in trials]:
            raise OutputError(
                "--out",
                str(out),
                "holds a different sweep (its trials do not "
                "match this sweep file); use a new folder",
            )
    if before_write is not None:
        before_write(trials)
    if overwrite and not resume:  # only what a sweep writes (check_out refused the rest)
        clear_outputs(out, SWEEP_OUTPUTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trials").mkdir(exist_ok=True)  # before concurrent trials check their folders
    write_text_atomic(out / PLAN_FILE, yaml.safe_dump(plan, sort_keys=False))

    trial_dirs = {t.name: out / "trials" / t.name for t in trials}
    base_rows = {t.name: base_row(t, trial_dirs[t.name]) for t in trials}
    rows: dict[str, dict[str, Any]] = dict(base_rows)
    done = finished_rows(out, trials, base_rows) if resume else {}
    rows.update(done)
    run = SweepRun(out=out, trials=trials, swept=spec.swept, trial_dirs=trial_dirs,
                   base_rows=base_rows, rows=rows,
                   todo=[t for t in trials if t.name not in done])
    run.write()
    if resume:
        print(
            f"resume: {len(done)} of {len(trials)} trials already finished, "
            f"{len(run.todo)} to run",
            file=sys.stderr,
        )
    return run
