"""Progress reporting: a tqdm bar on a terminal, plain periodic lines otherwise.

Redirected output (a log file, CI, ``nohup``) gets no cursor-control codes: one line roughly
every 10% of the work or every ``interval`` seconds, whichever comes first, and one at the end.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


class PlainProgress:
    """The part of tqdm's interface that hdfunc uses, writing plain lines (no ``\\r``).

    Args:
        total: the amount of work, or None if unknown.
        desc: the text before the count.
        unit: the name of one unit of work.
        initial: the work already done.
        leave: accepted for tqdm's interface (a plain line always stays).
        file: where the lines go (default stderr).
        interval: the longest time in seconds between two lines.
    """

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it",
                 initial: int = 0, leave: bool = True, file: IO[str] | None = None,
                 interval: float = 30.0) -> None:
        self.total, self.desc, self.unit, self.leave = total, desc, unit, leave
        self.n = initial
        self.file = file if file is not None else sys.stderr
        self.interval = interval
        self.postfix = ""
        self._start = self._last_time = time.monotonic()
        self._last_fraction = self._fraction()
        self._closed = False

    def _fraction(self) -> float:
        return self.n / self.total if self.total else 0.0

    def _line(self) -> str:
        elapsed = time.monotonic() - self._start
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        percent = f" ({100 * self._fraction():.0f}%)" if self.total else ""
        postfix = f" {self.postfix}" if self.postfix else ""
        desc = f"{self.desc}: " if self.desc else ""
        return f"{desc}{count} {self.unit}{percent}, {elapsed:.1f} s{postfix}"

    def _emit(self) -> None:
        try:
            print(self._line(), file=self.file, flush=True)
        except (OSError, ValueError):
            pass
        self._last_time, self._last_fraction = time.monotonic(), self._fraction()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units of work; write a line when enough work or time has passed.

        Args:
            n: the units of work just done.
        """
        self.n += n
        now = time.monotonic()
        done = self.total is not None and self.n >= self.total
        if (done or self._fraction() - self._last_fraction >= 0.1
                or now - self._last_time >= self.interval):
            if not (done and self._last_fraction >= 1.0):
                self._emit()

    def reset(self, total: int | None = None) -> None:
        """Start counting again from 0 (and the clock from now).

        Args:
            total: the new amount of work (None: keep it).
        """
        if total is not None:
            self.total = total
        self.n = 0
        self._last_fraction = 0.0
        self._start = self._last_time = time.monotonic()

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        """Set the text before the count.

        Args:
            desc: the text.
            refresh: accepted for tqdm's interface.
        """
        self.desc = desc

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Set the text after the count.

        Args:
            s: the text.
            refresh: accepted for tqdm's interface.
        """
        self.postfix = s

    def close(self) -> None:
        """Stop reporting (the last line was written when the work was done)."""
        self._closed = True

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0,
                 leave: bool = True, file: IO[str] | None = None) -> Any:
    """A tqdm bar when ``file`` (default stderr) is a terminal, else a :class:`PlainProgress`.

    Args:
        total: the amount of work, or None if unknown.
        desc: the text before the count.
        unit: the name of one unit of work.
        initial: the work already done.
        leave: keep the bar on the terminal when it closes.
        file: the stream (default stderr).

    Returns:
        The bar: ``update(n)``, ``set_postfix_str``, ``close``, a context manager.
    """
    stream = file if file is not None else sys.stderr
    if _is_terminal(stream):
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=stream)
    return PlainProgress(total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                         file=stream)
