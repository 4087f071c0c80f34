"""Command line: ``dplora-ray`` / ``python -m dplora_ray``.

Every user error (:class:`~dplora_ray.errors.DpLoraError`) ends with exit code 2 and one
line on stderr naming the key and the value; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dplora_ray.errors import DpLoraError

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dplora-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    from dplora_ray.privacy.cli import add_parser as add_privacy

    add_privacy(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DpLoraError as exc:
        print(f"dplora-ray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dplora-ray: interrupted", file=sys.stderr)
        return 130
