"""Pass options on the command line, built from the passes' own signatures.

Every keyword-only option of every pass can be set with ``--pass-option PASS.OPTION=VALUE``; the
value is read by the option's annotation (bool, int, float, str, a Literal's choices, a sequence
of names as ``a,b``, ``none`` for an optional one). The short flags of ``cli_args.SHORT_PASS_FLAGS``
are aliases: each goes to the one selected pass that takes it, and naming a pass is required when
several do. Unknown passes and options fail before any work, with "did you mean".
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from onnx_fp16_rewrite.cli_validate import check_pass_options
from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.pipeline.pass_base import Pass

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclass(frozen=True)
class PassOption:
    pass_name: str
    name: str
    annotation: Any
    default: Any

    @property
    def spelling(self) -> str:
        return f"{self.pass_name}.{self.name}"

    def type_text(self) -> str:
        return _type_text(self.annotation)

    def parse(self, text: str) -> Any:
        try:
            return _convert(self.annotation, text.strip())
        except ValueError as exc:
            raise BadInputError(f"--pass-option {self.spelling}={text}: {exc}") from None


def pass_options(cls: type[Pass]) -> dict[str, PassOption]:
    """The keyword-only options of ``cls.__init__``, with their resolved annotations."""
    hints = typing.get_type_hints(cls.__init__)
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: PassOption(cls.name, p.name, hints.get(p.name, type(p.default)), p.default)
            for p in params if p.kind == p.KEYWORD_ONLY}


def _convert(annotation: Any, text: str) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if text.lower() == "none" and len(inner) < len(args):
            return None
        if len(inner) == 1:
            return _convert(inner[0], text)
        raise ValueError(f"cannot read a value of type {_type_text(annotation)}")
    if origin is typing.Literal:
        if text not in args:
            raise ValueError(f"expected one of {', '.join(map(str, args))}")
        return text
    if annotation is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError("expected true or false")
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise ValueError(f"not {'an integer' if annotation is int else 'a number'}: {text!r}") from None
    if annotation is str:
        return text
    if origin is not None and args and _is_sequence(origin):
        return tuple(_convert(args[0], part) for part in filter(None, (s.strip() for s in text.split(","))))
    raise ValueError(f"cannot read a value of type {_type_text(annotation)}")


def _is_sequence(origin: Any) -> bool:
    return isinstance(origin, type) and issubclass(origin, Sequence) and origin is not str


def _type_text(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _type_text(a) for a in args)
    if origin is not None and args and _is_sequence(origin):
        return f"{_type_text(args[0])},..."
    return getattr(annotation, "__name__", str(annotation))


def _did_you_mean(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"


def parse_pass_options(specs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["rescale-accumulation.target_absmax=4096"]`` -> ``{"rescale-accumulation": {"target_absmax": 4096.0}}``.
    Option names may be written with ``-`` for ``_``."""
    from onnx_fp16_rewrite.pipeline.registry import get_pass_class

    result: dict[str, dict[str, Any]] = {}
    for spec in specs:
        key, eq, value = spec.partition("=")
        pass_name, dot, option = key.strip().rpartition(".")
        if not eq or not dot or not pass_name or not option:
            raise BadInputError(f"bad --pass-option {spec!r}: expected PASS.OPTION=VALUE, "
                                "e.g. rescale-accumulation.target_absmax=4096")
        cls = get_pass_class(pass_name)  # unknown pass: "did you mean"
        options = pass_options(cls)
        option = option.replace("-", "_")
        if option not in options:
            raise BadInputError(f"--pass-option: {pass_name} has no option {option!r}{_did_you_mean(option, list(options))}")
        result.setdefault(pass_name, {})[option] = options[option].parse(value)
    return result


def assign_short_flags(given: dict[str, Any], selected: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Route short-flag values (``{option: value}``) to the one pass among ``selected`` that takes
    each option; an option no selected pass takes, or several do, is an error naming the fix."""
    from onnx_fp16_rewrite.pipeline.registry import get_pass_class

    result: dict[str, dict[str, Any]] = {}
    for option, value in given.items():
        flag = "--" + option.replace("_", "-")
        owners = [name for name in dict.fromkeys(selected) if option in pass_options(get_pass_class(name))]
        if not owners:
            from onnx_fp16_rewrite.pipeline.registry import pass_classes

            takers = [name for name, cls in pass_classes().items() if option in pass_options(cls)]
            raise BadInputError(f"{flag} is not an option of the passes that run ({', '.join(selected) or 'none'}); "
                                f"it belongs to {' or '.join(takers)}: add --pass {takers[0]}")
        if len(owners) > 1:
            raise BadInputError(f"{flag} is an option of {', '.join(owners)}: name one, e.g. "
                                f"--pass-option {owners[0]}.{option}={value if not isinstance(value, tuple) else ','.join(value)}")
        result.setdefault(owners[0], {})[option] = value
    return result


def make_passes(names: Sequence[str], options: dict[str, dict[str, Any]]) -> list[Pass]:
    from onnx_fp16_rewrite.pipeline.registry import get_pass_class

    for name in names:
        check_pass_options(name, options.get(name, {}))  # finite, in range (cli_validate)
    return [get_pass_class(name)(**options.get(name, {})) for name in names]


def list_passes() -> list[str]:
    """The lines ``onnx-rewrite passes`` prints: name and summary, then one line per option with
    its type, default and the flag that sets it (lines do not depend on a column width)."""
    from onnx_fp16_rewrite.cli_args import SHORT_PASS_FLAGS
    from onnx_fp16_rewrite.pipeline.registry import pass_classes

    short = {dest: flag for flag, (dest, _, _) in SHORT_PASS_FLAGS.items()}
    classes = pass_classes()
    width = max(len(name) for name in classes) + 2
    lines = []
    for name, cls in classes.items():
        auto = "  [tried by the automatic fix]" if cls.auto_cost is not None else ""
        lines.append(f"{name:<{width}}{cls.summary}{auto}")
        for opt in pass_options(cls).values():
            alias = f" (or {short[opt.name]})" if opt.name in short else ""
            lines.append(f"    --pass-option {opt.spelling}=<{opt.type_text()}>  default {opt.default!r}{alias}")
    return lines
