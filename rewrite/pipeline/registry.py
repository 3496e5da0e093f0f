"""Looking passes up by name; the list itself is ``passes.ALL_PASSES``."""

from __future__ import annotations

import difflib

from onnx_fp16_rewrite.errors import UnknownPassError
from onnx_fp16_rewrite.pipeline.pass_base import Pass


def pass_classes() -> dict[str, type[Pass]]:
    from onnx_fp16_rewrite.passes import ALL_PASSES

    return {cls.name: cls for cls in ALL_PASSES}


def get_pass_class(name: str) -> type[Pass]:
    """The pass class called ``name``; unknown names raise with a 'did you mean' hint."""
    classes = pass_classes()
    if name in classes:
        return classes[name]
    close = difflib.get_close_matches(name, list(classes), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(classes)})"
    raise UnknownPassError(f"unknown pass {name!r}{hint}")


def parse_pipeline(text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, every name checked before any work is done."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        get_pass_class(name)
    return names


def auto_rewrites() -> list[Pass]:
    """The range-safe rewrites ``fix --auto`` tries, cheapest first, with default options."""
    candidates = [cls for cls in pass_classes().values() if cls.auto_cost is not None]
    return [cls() for cls in sorted(candidates, key=lambda c: c.auto_cost)]
