"""The initializers an analysis-graph build adds, indexed by name.

Every tensor's statistics ask whether a shared constant (a reduction axis, a sample stride, the
sample positions of a size) is there yet; a scan of the list per ask grew with tensors times
initializers (NAFNetLocal's diagnosis graph: 1783 tensors, 3034 initializers).
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx


class NewInitializers(list):
    """A list of TensorProtos that also keeps a name index (``find``); add only through
    ``append``, ``extend`` or ``+=``."""

    def __init__(self, items: Iterable[onnx.TensorProto] = ()) -> None:
        super().__init__()
        self._by_name: dict[str, onnx.TensorProto] = {}
        self.extend(items)

    def append(self, init: onnx.TensorProto) -> None:
        super().append(init)
        self._by_name.setdefault(init.name, init)

    def extend(self, inits: Iterable[onnx.TensorProto]) -> None:
        for init in inits:
            self.append(init)

    def __iadd__(self, inits: Iterable[onnx.TensorProto]) -> NewInitializers:
        self.extend(inits)
        return self


def find(inits: list[onnx.TensorProto], name: str) -> onnx.TensorProto | None:
    """The initializer called ``name`` in ``inits`` (indexed for NewInitializers, scanned otherwise)."""
    if isinstance(inits, NewInitializers):
        return inits._by_name.get(name)
    return next((i for i in inits if i.name == name), None)


__all__ = ["NewInitializers", "find"]
