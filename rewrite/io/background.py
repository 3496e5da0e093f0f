"""A call run on a thread of its own while the caller's Python work goes on.

ORT builds and runs sessions without the GIL, so an ORT run that nothing needs yet can overlap
the caller's Python on a second core (fix's mixed model run as typed: emit.mixed_ort_run; the
CLI check's preflight: io.background_preflight). Its result or its error is handed back to the
caller's thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class BackgroundCall:
    """``fn(*args)`` started at once on a daemon thread (named ``name``); ``result()`` waits for
    it and returns what it returned or raises what it raised; ``wait()`` only waits."""

    def __init__(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        self._value: Any = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # handed to the caller's thread by result()
            self._failure = exc

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self.wait()
        if self._failure is not None:
            raise self._failure
        return self._value


__all__ = ["BackgroundCall"]
