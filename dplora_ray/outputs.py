"""The output folder of a run or a sweep: what it owns, and checks done before any work.

* :data:`RUN_OUTPUTS` / :data:`SWEEP_OUTPUTS`: the entries a run (a sweep) writes at the
  top of its folder, ``dplora-ray analyze``'s ``report.md`` and ``plots/`` included, plus
  the temporary files of their interrupted writes (``.NAME.XXXX.tmp``, see
  :func:`dplora_ray.fileio.write_atomic`). ``--overwrite`` deletes those and nothing else
  (:func:`clear_outputs`), and refuses a folder that holds anything else
  (:func:`check_overwrite`): a user's config or data file is never deleted.
* :func:`check_writable`: the folder can be created and written (a probe file is created
  and removed, folders it had to create are removed again), checked before any model or
  data is loaded.
* :func:`write_folder_atomic`: a folder (the adapter) written whole or not at all;
  :func:`remove_temp_files` sweeps up what a failed write left.

Imports nothing heavy (no torch, no Ray).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

from dplora_ray.errors import OutputError

__all__ = [
    "RUN_OUTPUTS",
    "SWEEP_OUTPUTS",
    "check_overwrite",
    "check_writable",
    "clear_outputs",
    "entries",
    "finished_summary",
    "foreign_entries",
    "missing_results",
    "remove_temp_files",
    "write_folder_atomic",
]

#: what ``dplora-ray analyze DIR`` adds to a run or sweep folder (analysis/report.py)
_REPORT = ("report.md", "plots")
#: what the ``tracking`` config section adds (dplora_ray/tracking/)
_TRACKING = ("tracking.json", "tensorboard")
#: every entry a run writes in its folder (results.py, federated/checkpoint.py,
#: audit/report.py, the runner's adapter/model folders)
RUN_OUTPUTS = frozenset({
    "config.yaml", "rounds.parquet", "clients.parquet", "summary.json", "ledger.json",
    "checkpoint.pt", "adapter", "model", "audit.json", *_REPORT, *_TRACKING})
#: every entry a sweep writes in its folder (sweeps/folder.py, sweeps/table.py, tune.py)
SWEEP_OUTPUTS = frozenset({"sweep.yaml", "sweep.parquet", "trials", "tune", *_REPORT,
                           "tracking.json"})

_TMP = ".tmp"
_PROBE = "dplora-ray-probe"


def _is_temp(name: str, owned: Collection[str]) -> bool:
    """A temporary file or folder (``.NAME.XXXX.tmp``) that :func:`~dplora_ray.fileio.
    write_atomic` or :func:`write_folder_atomic` made for an ``owned`` entry, or a probe of
    :func:`check_writable`."""
    if not (name.startswith(".") and name.endswith(_TMP)):
        return False
    return any(name.startswith(f".{o}.") for o in (*owned, _PROBE))


def entries(folder: Path, key: str = "--out") -> list[str]:
    """The names in ``folder``, sorted (OutputError naming ``key`` when unreadable)."""
    try:
        return sorted(p.name for p in folder.iterdir())
    except OSError as exc:
        raise OutputError(key, str(folder), f"cannot be read ({_reason(exc, folder)})") from None


def foreign_entries(folder: Path, owned: Collection[str], key: str = "--out") -> list[str]:
    """The entries of ``folder`` that are neither in ``owned`` nor temporary files."""
    return [n for n in entries(folder, key) if n not in owned and not _is_temp(n, owned)]


def check_overwrite(folder: Path, owned: Collection[str], what: str = "run") -> None:
    """Refuse ``--overwrite`` of a folder holding anything a ``what`` did not write.

    Raises:
        OutputError: naming ``--overwrite`` and the foreign entries.
    """
    foreign = foreign_entries(folder, owned)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more"
                                          if len(foreign) > 8 else "")
        raise OutputError("--overwrite", True,
                          f"{str(folder)!r} holds files this {what} did not write: {shown}; "
                          "move them or pick a new folder")


def clear_outputs(folder: Path, owned: Collection[str]) -> None:
    """Delete the entries of ``folder`` in ``owned`` and its temporary files; keep the
    folder and everything else in it."""
    if not folder.is_dir():
        return
    for name in entries(folder):
        if name in owned or _is_temp(name, owned):
            _remove(folder / name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_temp_files(folder: Path, owned: Collection[str] = RUN_OUTPUTS) -> None:
    """Delete what interrupted atomic writes of ``owned`` entries left in ``folder``
    (never raises)."""
    try:
        for p in folder.iterdir():
            if _is_temp(p.name, owned):
                try:
                    _remove(p)
                except OSError:
                    pass
    except OSError:
        pass


def _reason(exc: OSError, folder: Path) -> str:
    """``strerror``, with the path that failed when it is not ``folder`` or inside it."""
    text = exc.strerror or type(exc).__name__
    name = exc.filename
    if name is not None:
        failed = Path(os.fsdecode(name))
        if failed != folder and folder not in failed.parents:
            return f"{failed}: {text}"
    return text


def check_writable(folder: Path, key: str = "--out") -> None:
    """``folder`` can be created and written: create it (and its missing parents), create
    and remove a probe file in it, then remove the folders this created, so nothing is
    left behind either way.

    Raises:
        OutputError: ``KEY='FOLDER': cannot write there (reason)``.
    """
    folder = Path(os.path.abspath(folder))
    for attempt in range(3):  # a concurrent probe may remove a shared new parent: retry
        try:
            _probe(folder)
            return
        except FileNotFoundError as exc:
            if attempt == 2:
                raise OutputError(key, str(folder),
                                  f"cannot write there ({_reason(exc, folder)})") from None
        except OSError as exc:
            raise OutputError(key, str(folder),
                              f"cannot write there ({_reason(exc, folder)})") from None


def _probe(folder: Path) -> None:
    missing: list[Path] = []
    p = folder
    while not os.path.lexists(p) and p.parent != p:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        fd, probe = tempfile.mkstemp(prefix=f".{_PROBE}.", suffix=_TMP, dir=folder)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(probe)
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass


def write_folder_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_folder)`` on a new temporary folder beside ``path``, then replace
    ``path`` with it; a failure leaves the old ``path`` (or none) and no temporary folder."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{_TMP}"
    tmp.mkdir()  # unlike mkdtemp, with the usual permissions (the folder is renamed)
    try:
        write(tmp)
        if path.exists() or path.is_symlink():
            _remove(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def missing_results(folder: Path, *, full_model: bool = False,
                    audit: bool = False) -> list[str]:
    """The result files a finished run should have and ``folder`` lacks."""
    need: Iterable[str] = ("config.yaml", "rounds.parquet", "clients.parquet", "ledger.json",
                           "summary.json",
                           *(("model/config.json",) if full_model else
                             ("adapter/adapter_config.json",
                              "adapter/adapter_model.safetensors")),
                           *(("audit.json",) if audit else ()))
    return [n for n in need if not (folder / n).is_file()]


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run folder that finished (not one that ended in an error)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or str(summary.get("stop_reason") or "error"
                                            ).startswith("error"):
        return None
    return summary
