"""Progress of long phases (profiling, diagnosis, each rewrite tried, verification).

Library code reports through the small ``Progress`` protocol and never renders anything itself::

    def profile(model, feeds, *, progress: Progress = NULL_PROGRESS):
        with progress.phase("profiling ranges", total=len(feeds)) as phase:
            for feed in feeds:
                ...
                phase.advance()
            phase.done(f"{len(feeds)} runs, {n} tensors")

``NULL_PROGRESS`` does nothing (the default everywhere). The CLI passes a ``RichProgress`` when
stdout and stderr are both terminals: a live bar per open phase on stderr, and each phase's
summary printed on its own line as the phase ends. ``RecordingProgress`` keeps the events, for tests.
Phases may nest (a rewrite tried inside the auto-fix search); each is a separate line.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Protocol

__all__ = ["NULL_PROGRESS", "Phase", "PhaseRecord", "Progress", "RecordingProgress", "RichProgress", "progress_for"]


class Phase(Protocol):
    """One running phase: ``advance`` moves its counter, ``done`` gives the line shown when it ends."""

    def advance(self, n: int = 1) -> None: ...

    def done(self, summary: str) -> None: ...


class Progress(Protocol):
    """Opens phases; ``with progress.phase("diagnosis", total=3) as ph: ...``."""

    def phase(self, name: str, total: int | None = None):  # -> ContextManager[Phase]
        ...


class _NullPhase:
    def advance(self, n: int = 1) -> None:
        pass

    def done(self, summary: str) -> None:
        pass


class _NullProgress:
    """Reports nothing (the default for library calls)."""

    _PHASE = _NullPhase()

    @contextmanager
    def phase(self, name: str, total: int | None = None) -> Iterator[Phase]:
        yield self._PHASE


NULL_PROGRESS: Progress = _NullProgress()


@dataclass
class PhaseRecord:
    name: str
    total: int | None
    depth: int
    advanced: int = 0
    summary: str | None = None
    closed: bool = False
    failed: bool = False


@dataclass
class _RecordingPhase:
    record: PhaseRecord

    def advance(self, n: int = 1) -> None:
        self.record.advanced += n

    def done(self, summary: str) -> None:
        self.record.summary = summary


@dataclass
class RecordingProgress:
    """Keeps every phase (in the order opened) with its advances and summary: for tests."""

    phases: list[PhaseRecord] = field(default_factory=list)
    _depth: int = 0

    @contextmanager
    def phase(self, name: str, total: int | None = None) -> Iterator[Phase]:
        record = PhaseRecord(name, total, self._depth)
        self.phases.append(record)
        self._depth += 1
        try:
            yield _RecordingPhase(record)
        except BaseException:
            record.failed = True
            raise
        finally:
            self._depth -= 1
            record.closed = True

    def names(self) -> list[str]:
        return [p.name for p in self.phases]


class _RichPhase:
    def __init__(self, owner: RichProgress, task_id: int) -> None:
        self._owner, self._task, self.summary = owner, task_id, None

    def advance(self, n: int = 1) -> None:
        self._owner._advance(self._task, n)

    def done(self, summary: str) -> None:
        self.summary = summary


class RichProgress:
    """Live bars on a terminal (rich), one per open phase; each phase's result printed as it ends."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        import sys

        from rich.console import Console
        from rich.progress import BarColumn, Progress as Bars, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = Console(file=stream or sys.stderr)
        # "done/total" only for phases that know their total (a bar with "0/?" would say nothing).
        self._bars = Bars(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                          TextColumn("{task.fields[count]}"), TimeElapsedColumn(), console=self.console, transient=True)
        self._open = 0

    def _advance(self, task: int, n: int) -> None:
        self._bars.advance(task, n)
        t = self._bars.tasks[[x.id for x in self._bars.tasks].index(task)]
        if t.total is not None:
            self._bars.update(task, count=f"{int(t.completed)}/{int(t.total)}")

    @contextmanager
    def phase(self, name: str, total: int | None = None) -> Iterator[Phase]:
        if self._open == 0:
            self._bars.start()
        indent = "  " * self._open
        self._open += 1
        task = self._bars.add_task(indent + name, total=total, count=f"0/{total}" if total is not None else "")
        phase = _RichPhase(self, task)
        start = time.perf_counter()
        ok = False
        try:
            yield phase
            ok = True
        finally:
            self._bars.remove_task(task)
            self._open -= 1
            seconds = time.perf_counter() - start
            mark = "[green]done[/]" if ok else "[red]failed[/]"
            result = f": {phase.summary}" if phase.summary else ""
            # Printed through the live display's console, so it lands above the bars.
            self.console.print(f"{indent}{mark} {name}{result} [dim]({seconds:.1f} s)[/]", highlight=False)
            if self._open == 0:
                self._bars.stop()


def progress_for(stdout: IO[str], stderr: IO[str], *, quiet: bool = False) -> Progress:
    """What the CLI renders: rich bars when both streams are terminals (and not ``-q``), else nothing.
    Redirected output is a log or a pipe: bars and per-phase lines would only clutter it."""
    if quiet or not (_isatty(stdout) and _isatty(stderr)):
        return NULL_PROGRESS
    return RichProgress(stderr)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False
