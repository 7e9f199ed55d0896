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
    """The part of tqdm's interface that hdfunc uses, writing plain lines (no ``\\r``)."""

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
        self.n += n
        now = time.monotonic()
        done = self.total is not None and self.n >= self.total
        if (done or self._fraction() - self._last_fraction >= 0.1
                or now - self._last_time >= self.interval):
            if not (done and self._last_fraction >= 1.0):
                self._emit()

    def reset(self, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        self.n = 0
        self._last_fraction = 0.0
        self._start = self._last_time = time.monotonic()

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0,
                 leave: bool = True, file: IO[str] | None = None) -> Any:
    """A tqdm bar when ``file`` (default stderr) is a terminal, else a :class:`PlainProgress`."""
    stream = file if file is not None else sys.stderr
    if _is_terminal(stream):
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=stream)
    return PlainProgress(total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                         file=stream)
