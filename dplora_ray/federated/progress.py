"""The rounds progress bar (tqdm on stderr) and the messages written around it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["Progress", "fmt"]


def fmt(x: float | None, spec: str = ".3f") -> str | None:
    """``x`` formatted for the bar; None (left out) for None and NaN."""
    return None if x is None or (isinstance(x, float) and x != x) else format(x, spec)


class Progress:
    """A bar over the rounds when ``enabled``; messages go above it (or to ``say``)."""

    def __init__(self, total: int, done: int, enabled: bool,
                 say: Callable[[str], None]) -> None:
        self.bar: Any = None
        self.say = say
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc="rounds", unit="round",
                            file=sys.stderr, dynamic_ncols=True)

    def update(self, **post: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: v for k, v in post.items() if v is not None}, refresh=False)
            self.bar.update(1)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            self.say(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
