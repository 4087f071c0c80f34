"""Reading YAML the strict way: every file the user gives (a run config, a sweep file, a
run folder's ``config.yaml``) and every ``--set`` value.

:func:`read_yaml_file` turns each way a file can be bad into one
:class:`~dplora_ray.errors.ConfigError` naming the file: missing, unreadable, not UTF-8
text, empty (or only comments), invalid YAML, or a key given twice in one mapping
(PyYAML would silently keep the last one). :func:`load_yaml_text` is the same parser for
a string (a ``--set`` value).

Imports nothing of the package but :mod:`dplora_ray.errors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dplora_ray.errors import ConfigError

__all__ = ["DuplicateKeyError", "load_yaml_text", "read_yaml_file"]


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice; ``path`` is the dotted key, ``lines`` the two
    1-based line numbers."""

    def __init__(self, path: str, lines: tuple[int, int]) -> None:
        super().__init__(f"duplicate key {path!r} (lines {lines[0]} and {lines[1]})")
        self.path = path
        self.lines = lines


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in the same mapping."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_duplicates(node, (), set())
        return super().construct_document(node)

    def _check_duplicates(self, node: yaml.Node, path: tuple[str, ...], seen: set[int]) -> None:
        if id(node) in seen:  # an alias points back at a node already checked
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`
                    self._check_duplicates(value_node, path, seen)
                    continue
                key = (self.construct_object(key_node, deep=True)
                       if isinstance(key_node, yaml.ScalarNode) else None)
                line = key_node.start_mark.line + 1
                if key is not None:
                    try:
                        if key in first:
                            raise DuplicateKeyError(_dotted((*path, str(key))),
                                                    (first[key], line))
                        first[key] = line
                    except TypeError:  # an unhashable key: PyYAML reports it itself
                        pass
                self._check_duplicates(value_node, (*path, str(key)), seen)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_duplicates(item, (*path, f"[{i}]"), seen)


def _dotted(path: tuple[str, ...]) -> str:
    """``("cases", "[0]", "lora.r")`` -> ``cases[0].lora.r``."""
    return "".join(p if p.startswith("[") or i == 0 else f".{p}"
                   for i, p in enumerate(path))


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` that raises :class:`DuplicateKeyError` on a repeated key."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return " ".join(lines[:1]) or type(exc).__name__


def read_yaml_file(path: str | Path, key: str) -> Any:
    """The YAML document in ``path``; every problem is a ConfigError ``key=path: ...``.

    Raises:
        ConfigError: no such file, unreadable, not UTF-8 text, empty, invalid YAML, or a
            key repeated in one mapping (named with its dotted path and both lines).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(key, str(path), "no such file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(key, str(path),
                          f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(key, str(path), f"is not a UTF-8 text file (byte "
                          f"0x{data[exc.start]:02x} at offset {exc.start})") from None
    try:
        doc = load_yaml_text(text)
    except DuplicateKeyError as exc:
        raise ConfigError(key, str(path), f"key {exc.path!r} is given twice (lines "
                          f"{exc.lines[0]} and {exc.lines[1]}); keep one") from None
    except yaml.YAMLError as exc:
        raise ConfigError(key, str(path), f"is not valid YAML ({_first_line(exc)})") from None
    if doc is None:
        raise ConfigError(key, str(path), "the file is empty (no YAML content)")
    return doc
