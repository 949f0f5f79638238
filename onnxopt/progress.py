"""Progress bars for long work (calibration, validation, sweeps), on stderr, where someone watches.

    with progress.task("calibrating", total=n, unit="sample") as bar:
        for feed in feeds:
            ...
            bar.advance(rows)
    for layer in progress.iterate(layers, "svd: decomposing", unit="layer"):
        ...
    report = progress.callback("evaluating", unit="candidate")   # report(done, total)
    executor.map(fn, shared, items, progress=report)

A bar (tqdm: count, rate, time left) shows only when stderr is a terminal, never on stdout, so
the summary and JSON output stay clean. It appears once a task has run for ``DELAY_S`` (quick
steps print nothing) and is erased when the task ends. ``--quiet`` (``configure(quiet=True)``),
``ONNXOPT_PROGRESS=0`` or ``set_enabled(False)`` silence every bar; ``ONNXOPT_PROGRESS=1`` or
``set_enabled(True)`` show them on any stream. Without tqdm installed nothing is shown and every
call here is a no-op.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # a minimal install: no bars, same behaviour otherwise
    _tqdm = None

T = TypeVar("T")

DELAY_S = 0.5  # a task shorter than this shows no bar at all
REFRESH_S = 0.2  # redraw a bar at most this often
ENV = "ONNXOPT_PROGRESS"
_OFF, _ON = ("0", "false", "no", "off"), ("1", "true", "yes", "on")
_switch: Optional[bool] = None  # None: automatic (stderr a terminal); set by the CLI and set_enabled


def available() -> bool:
    """Whether tqdm is installed (bars are possible at all)."""
    return _tqdm is not None


def set_enabled(on: Optional[bool]) -> None:
    """Force bars on (True) or off (False), or back to automatic (None: when stderr is a terminal)."""
    global _switch
    _switch = on


def configure(quiet: bool = False) -> None:
    """What the CLI sets per command: ``quiet`` silences bars and onnxopt's warnings (errors still
    show); otherwise both are back to their defaults."""
    set_enabled(False if quiet else None)
    logging.getLogger("onnxopt").setLevel(logging.ERROR if quiet else logging.NOTSET)


def enabled() -> bool:
    """Whether a bar made now would be shown: tqdm is there, nothing silenced it, and stderr is a
    terminal (or bars were forced on)."""
    env = os.environ.get(ENV, "").strip().lower()
    if _tqdm is None or _switch is False or env in _OFF:
        return False
    if _switch or env in _ON:
        return True
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class Bar:
    """One task's progress; every method is a no-op when bars are off."""

    def __init__(self, desc: str, total: Optional[int] = None, unit: str = "it") -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.done = 0
        self.closed = False
        self._bar = None
        if enabled():
            # stderr as it is now (a test's capture, the terminal); leave=False erases the bar at the end
            self._bar = _tqdm(desc=desc, total=total, unit=unit, file=sys.stderr, leave=False,
                              delay=DELAY_S, dynamic_ncols=True, mininterval=REFRESH_S)

    @property
    def shown(self) -> bool:
        """Whether this bar writes anything (bars enabled when it was made)."""
        return self._bar is not None

    def advance(self, k: int = 1) -> None:
        """``k`` more units done."""
        self.done += k
        if self._bar is not None and not self.closed:
            self._bar.update(k)

    def update_to(self, done: int, total: Optional[int] = None) -> None:
        """``done`` units done so far (of ``total``, when it is now known or has changed)."""
        if total is not None and total != self.total:
            self.set_total(total)
        self.advance(done - self.done)

    def set_total(self, total: Optional[int]) -> None:
        self.total = total
        if self._bar is not None and not self.closed:
            self._bar.total = total
            self._bar.refresh()

    def close(self) -> None:
        if not self.closed and self._bar is not None:
            self._bar.close()
        self.closed = True

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def task(desc: str, total: Optional[int] = None, unit: str = "it") -> Bar:
    """A bar for a ``with`` block: ``with task("calibrating", total=n) as bar: bar.advance(k)``."""
    return Bar(desc, total, unit)


def iterate(items: Iterable[T], desc: str, total: Optional[int] = None, unit: str = "it") -> Iterator[T]:
    """``items``, one at a time, advancing a bar after each (total from ``len(items)`` when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(desc, total, unit) as bar:
        for item in items:
            yield item
            bar.advance()


def callback(desc: str, total: Optional[int] = None, unit: str = "it") -> Callable[..., None]:
    """A ``report(done, total=None)`` function, as the executors' ``map(..., progress=report)`` calls it:
    the bar opens on the first call and closes when ``done`` reaches the total (a later call opens
    a fresh one, for the next sweep)."""
    bar: Optional[Bar] = None

    def report(done: int, total_now: Optional[int] = None) -> None:
        nonlocal bar
        if bar is None or bar.closed:
            bar = Bar(desc, total_now if total_now is not None else total, unit)
        bar.update_to(done, total_now)
        if bar.total is not None and done >= bar.total:
            bar.close()

    return report


def labelled(prefix: str, unit: str = "it") -> Callable[[str, int, int], None]:
    """A ``report(what, done, total)`` function: one bar per ``what`` (``prefix: what``), as ``tune``
    reports its sweeps; calls with no total (a single point) draw nothing."""
    bars: dict[str, Callable[..., None]] = {}

    def report(what: str, done: int, total: int) -> None:
        if total:
            bars.setdefault(what, callback(f"{prefix}: {what}", total, unit))(done, total)

    return report


class LogHandler(logging.StreamHandler):
    """A stderr log handler that writes around the bars on screen (clears them, writes the line,
    draws them again) instead of into the middle of one."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if _tqdm is None or not enabled():
            return super().emit(record)
        try:
            _tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)
