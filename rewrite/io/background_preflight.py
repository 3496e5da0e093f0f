"""The CLI's preflight run on a thread of its own, beside the Python work that does not need it.

``onnx-rewrite check`` runs the user's model once before anything else (``ort_runner.preflight``):
its failure is the input's (exit 2), and its outputs are the FP32 reference. Nothing reads them
until the emulation run has been compared, while canonicalisation and the emulation graph's build
are Python (a TorchScript NAFNetLocal: 2.6 s of ORT beside 3 s of shape folding). ORT releases the
GIL while it runs, so the two overlap on a second core. The emulation's own ORT run waits for it
(``check_fp16(before_run=)``): two ORT runs at once on two cores took longer than one after the other.

``BackgroundPreflight`` is the sequence of those outputs (one dict a feed, its length known at
once); reading an item waits for the run. Its failure still wins over anything that fails after
it started: ``raise_failure`` is called first by whoever handles an error (the preflight's own
BadInputError then stands, as when it ran first), and ``wait`` before the weights the session
reads are released.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx

from onnx_fp16_rewrite.io import ort_runner
from onnx_fp16_rewrite.io.background import BackgroundCall
from onnx_fp16_rewrite.io.ort_runner import Feed


class BackgroundPreflight(BackgroundCall, Sequence):
    """``ort_runner.preflight(model, feed, what, session)`` started now on a thread of its own."""

    def __init__(self, model: onnx.ModelProto, feed: Feed, what: str, session=None) -> None:
        super().__init__("onnx-rewrite-preflight", ort_runner.preflight, model, feed, what, session)

    def raise_failure(self) -> None:
        """Wait, and raise the run's own error if it failed (BadInputError: the input's fault);
        ``wait()`` only waits (until its session no longer reads the model's weights)."""
        self.result()

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        if index not in (0, -1):
            raise IndexError(index)
        return self.result()


__all__ = ["BackgroundPreflight"]
