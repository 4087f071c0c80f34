"""Two small things every part of the package needs, written once.

* :func:`write_atomic`: a file is written whole or not at all. The content goes to a
  temporary file in the same folder, is flushed and fsynced, and is renamed over the
  target; the folder is fsynced so the rename itself survives a crash. A failure at any
  point leaves the previous file (or none) and no temporary file.
* :func:`one_line`: an exception as the one line a user sees (the CLI, ``summary.json``'s
  ``stop_reason``, the sweep table's ``error`` column): our own errors
  (:class:`~dplora_ray.errors.DpLoraError`) by their message, anything else prefixed with
  its type, first line only, whitespace collapsed, cut to ``limit`` characters.

Imports nothing heavy (no torch, no Ray).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = ["json_safe", "one_line", "write_atomic", "write_json_atomic", "write_text_atomic"]


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(binary_file)`` on a temporary file, fsync it, rename it to ``path``."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some file systems cannot fsync a folder
        pass


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def json_safe(obj: Any) -> Any:
    """Plain JSON values: NaN -> None, +-inf -> "inf"/"-inf", numpy scalars -> Python."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return json_safe(obj.item())
    return obj


def write_json_atomic(obj: Any, path: str | os.PathLike[str], indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(json_safe(obj), indent=indent) + "\n")


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """The one line a user sees for ``exc`` (see the module doc)."""
    from dplora_ray.errors import DpLoraError

    if isinstance(exc, BaseException):
        lines = str(exc).strip().splitlines()
        first = lines[0] if lines else ""
        text = first if isinstance(exc, DpLoraError) else (
            f"{type(exc).__name__}: {first}" if first else type(exc).__name__)
    else:
        text = exc
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
