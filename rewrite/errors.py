"""Error types. Every error a user can cause derives from RewriteError and carries a one-line message."""

from __future__ import annotations


class RewriteError(Exception):
    """Base class; ``exit_code`` is what the CLI returns for it."""

    exit_code = 1


class BadInputError(RewriteError):
    """The model, the inputs file, an option or an output path is unusable."""

    exit_code = 2


class UnknownPassError(BadInputError):
    """A pass name that is not in the registry (the message carries 'did you mean')."""


class PassFailedError(RewriteError):
    """A pass raised, broke the graph or failed validation (the manager rolls it back)."""

    exit_code = 3


class TensorRTUnavailableError(RewriteError):
    """TensorRT (or Polygraphy) is not installed, cannot be loaded, or is older than 10.0."""

    exit_code = 5


class TensorRTBuildError(RewriteError):
    """TensorRT could not parse, build or run the model (exit code 1: not the user's input, not a verdict)."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]
