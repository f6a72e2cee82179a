"""Progress with an ETA: tqdm bars on a terminal, the usual plain lines when the output is a pipe or a file.

``lowcomm sim`` shows one bar for the whole job and one for the strategy running; ``lowcomm train``
one for the run. Lines written through :meth:`Progress.write` appear above the bars on a
terminal (tqdm's ``write``) and as ordinary flushed lines otherwise, so logs stay readable
under torchrun, in CI and through ``| tee``.
"""

from __future__ import annotations

import sys
from typing import IO, Any

__all__ = ["Progress"]


class Progress:
    """One or more stacked tqdm bars when ``stream`` is a terminal, nothing but lines otherwise.

    Args:
        bars: ``(name, total)`` of each bar, top to bottom; a bar's total may be reset later
            (:meth:`reset`), e.g. the per-strategy bar of the simulator.
        stream: where bars and lines go (default stdout).
        enabled: ``False`` shows no bars (lines still go through :meth:`write`).
    """

    def __init__(self, bars: list[tuple[str, int]], stream: IO[str] | None = None, enabled: bool = True,
                 unit: str = "step"):
        self.stream = stream or sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(enabled and callable(isatty) and isatty())
        self._bars: dict[str, Any] = {}
        if self.tty:
            from tqdm import tqdm

            for pos, (name, total) in enumerate(bars):
                self._bars[name] = tqdm(total=total, desc=name, position=pos, leave=pos == 0, file=self.stream,
                                        unit=unit, dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1, bar: str | None = None) -> None:
        """Advance ``bar`` (every bar when ``None``) by ``n``."""
        for name, b in self._bars.items():
            if bar is None or name == bar:
                b.update(n)

    def reset(self, bar: str, total: int, desc: str | None = None) -> None:
        """Start ``bar`` again from 0 with a new total (and label)."""
        b = self._bars.get(bar)
        if b is not None:
            b.reset(total=total)
            if desc is not None:
                b.set_description(desc)

    def write(self, line: str) -> None:
        """A line of text, above the bars on a terminal."""
        if self._bars:
            from tqdm import tqdm

            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        for b in reversed(list(self._bars.values())):
            b.close()
        self._bars = {}

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
