"""Progress of long work: bars with their ETA on a terminal, one log line per finished task elsewhere.

Library code never prints.  Whoever starts the work (the CLI, :func:`~robustbench_lite.benchmark`,
:func:`~robustbench_lite.harness.run.run_plan`) makes one :class:`Progress` and passes it down to
what loops over points (the evaluation's attacks, curves, verification, training); nothing reads a
global.  A reporter is in one of three modes:

* ``bar``: tqdm bars on stderr, one for the run's cells and one per task (an attack's points left,
  its name, the rate and the ETA); notes are written above the bars;
* ``lines``: no bar (CI logs, ``nohup``): one INFO line on the ``robustbench_lite.progress``
  logger per finished task, with its time and the run's count of cells; notes are lines too;
* ``off``: nothing (``--no-progress``, ``progress=False``).

``Progress.auto()`` picks ``bar`` when stderr is a terminal (or in a Jupyter kernel), else ``lines``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

LOGGER = logging.getLogger("robustbench_lite.progress")
MODES = ("bar", "lines", "off")


def _interactive() -> bool:
    """stderr is a terminal, or this runs in a Jupyter kernel (tqdm draws a widget there)."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return ip is not None and hasattr(ip, "kernel")


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class Task:
    """One piece of work with a known size (points, steps, cells): ``update(n)`` as it goes,
    ``close()`` (or leave the ``with`` block) when done.  Leaving the block on an exception closes
    it without the line of a finished task."""

    def __init__(self, owner: Progress, label: str, total: int, unit: str, *, line: bool, outer: bool = False) -> None:
        self.owner, self.label, self.total, self.unit, self.line = owner, label, max(0, int(total)), unit, line
        self.done = 0
        self.start = time.perf_counter()
        self.closed = False
        self._bar: Any = None
        if owner.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=label, unit=f" {unit}", leave=outer, file=sys.stderr,
                             dynamic_ncols=True, mininterval=0.5)

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        n = int(n)
        if n <= 0 or self.closed:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def advance_to(self, done: int) -> None:
        """``done`` units done in all (never goes back)."""
        self.update(int(done) - self.done)

    def restart(self, total: int | None = None) -> None:
        """Start over (e.g. an attack rerun with a smaller batch after running out of memory)."""
        self.done = 0
        self.total = self.total if total is None else max(0, int(total))
        if self._bar is not None:
            self._bar.reset(total=self.total)

    def rewind(self, done: int) -> None:
        """Back to ``done`` units (work started over, e.g. with a smaller batch)."""
        done = max(0, int(done))
        if done < self.done:
            self.done = done
            if self._bar is not None:
                self._bar.n = done
                self._bar.refresh()

    def describe(self, text: str) -> None:
        """A short status beside the bar (nothing in the other modes)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def eta(self) -> float | None:
        """Seconds left at the rate so far (``None`` before the first unit)."""
        if self.done <= 0 or self.total <= 0:
            return None
        return self.seconds / self.done * max(0, self.total - self.done)

    def close(self, summary: str | None = None, *, ok: bool = True) -> None:
        """End the task; in ``lines`` mode a finished one logs ``label: summary in T s``."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        if ok and self.line and self.owner.mode == "lines":
            what = summary if summary is not None else f"{self.done} {self.unit}{'s' if self.done != 1 else ''}"
            LOGGER.info("%s: %s (%s)%s", self.label, what, _duration(self.seconds), self.owner.where())

    def __enter__(self) -> Task:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


class _Cells:
    """The run's count of cells, shared by a reporter and its children: each key counts once."""

    def __init__(self) -> None:
        self.task: Task | None = None
        self.keys: set[str] = set()
        self.counted: set[str] = set()


class Progress:
    """A progress reporter (see the module docstring); ``child(prefix)`` shares the mode and the
    run's cell count and prefixes its tasks' labels, e.g. with the model being evaluated."""

    def __init__(self, mode: str = "auto", *, prefix: str = "", _cells: _Cells | None = None) -> None:
        if mode == "auto":
            mode = "bar" if _interactive() else "lines"
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES} or 'auto', got {mode!r}")
        self.mode, self.prefix = mode, prefix
        self._cells = _cells if _cells is not None else _Cells()

    @classmethod
    def auto(cls) -> Progress:
        return cls("auto")

    @classmethod
    def off(cls) -> Progress:
        return cls("off")

    @classmethod
    def of(cls, value: bool | Progress | None) -> Progress:
        """A reporter from a ``progress=`` argument: a :class:`Progress` as it is, ``True`` the
        automatic mode, ``False``/``None`` off."""
        if isinstance(value, Progress):
            return value
        if value is None or isinstance(value, bool):
            return cls.auto() if value else cls.off()
        raise TypeError(f"progress must be True, False or a Progress, got {type(value).__name__}")

    def __bool__(self) -> bool:
        return self.mode != "off"

    def child(self, prefix: str) -> Progress:
        """The same reporter whose task labels start with ``prefix``."""
        joined = f"{self.prefix} {prefix}".strip() if prefix else self.prefix
        return Progress(self.mode, prefix=joined, _cells=self._cells)

    def _label(self, label: str) -> str:
        return f"{self.prefix}: {label}" if self.prefix else label

    def task(self, label: str, total: int, unit: str = "point", *, line: bool = True) -> Task:
        """A task of ``total`` units; ``line=False``: no line when it ends (``lines`` mode)."""
        return Task(self, self._label(label), total, unit, line=line)

    def cells(self, keys: Iterable[str]) -> Task:
        """The run's outer bar over its pending cells (``keys``), advanced by :meth:`cell_done`;
        ``lines`` mode shows the count and the time left in each task's line instead."""
        shared = self._cells
        shared.keys, shared.counted = set(keys), set()
        shared.task = Task(self, "cells", len(shared.keys), "cell", line=False, outer=True)
        return shared.task

    def cell_done(self, key: str) -> None:
        """The cell ``key`` of the run is measured (or found stored): counted once."""
        shared = self._cells
        if shared.task is not None and key in shared.keys and key not in shared.counted:
            shared.counted.add(key)
            shared.task.update(1)

    def where(self) -> str:
        """`` [cells 3/12, about 2 min left]`` from the run's cell count (empty without one)."""
        cells = self._cells.task
        if cells is None or cells.closed or cells.total <= 0:
            return ""
        eta = cells.eta()
        left = f", about {_duration(eta)} left" if eta is not None and cells.done < cells.total else ""
        return f" [cells {cells.done}/{cells.total}{left}]"

    def note(self, message: str) -> None:
        """One line saying what is happening and why (e.g. the escalation ladder starting)."""
        text = self._label(message)
        if self.mode == "bar":
            from tqdm.auto import tqdm

            tqdm.write(text, file=sys.stderr)
        elif self.mode == "lines":
            LOGGER.info("%s", text)
        else:
            LOGGER.debug("%s", text)


class _CurrentStderr(logging.Handler):
    """Writes each record to the ``sys.stderr`` of the moment (tests and notebooks swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def show_lines(enabled: bool = True) -> None:
    """For command-line tools: print the ``lines`` mode's INFO lines on stderr (with the time of
    day), or (``enabled=False``) leave the progress logger to the logging configuration.  Calling
    it again replaces what an earlier call set up."""
    for handler in [h for h in LOGGER.handlers if isinstance(h, _CurrentStderr)]:
        LOGGER.removeHandler(handler)
    if enabled:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        LOGGER.addHandler(handler)
        LOGGER.setLevel(logging.INFO)
        LOGGER.propagate = False
    else:
        LOGGER.setLevel(logging.NOTSET)
        LOGGER.propagate = True
