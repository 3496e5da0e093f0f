"""What a corpus entry is: a seeded torch module, its feeds, and how to export it.

A ``Spec`` knows nothing of caching; ``onnx_fp16_rewrite.models.exported`` builds, exports and caches it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Feed = dict[str, np.ndarray]

EXPORTERS = ("torchscript", "dynamo")


@dataclass(frozen=True)
class Spec:
    """One corpus model.

    ``module`` returns the eval-mode torch module (seeded: the same weights on every call); ``feeds`` returns
    deterministic numpy feeds, in the order of ``inputs``, the first of which is the export example.
    ``control``: FP16 runs it fine (nothing should be pinned or rewritten). ``unsupported`` maps an exporter
    to the reason it cannot export this model. ``dynamic`` maps input name -> {axis: dim name} (TorchScript
    ``dynamic_axes``; dynamo gets ``torch.export.Dim.DYNAMIC`` on those axes). ``torchscript_options`` go to
    ``torch.onnx.export(..., dynamo=False)`` (``training="preserve"`` for ``TrainingMode.PRESERVE``),
    ``dynamo_options`` to ``dynamo=True`` (``optimize=False`` keeps BatchNormalization); ``post`` edits the
    exported ModelProto (e.g. Paddle's -1 dims); ``script`` maps the module to the ScriptModule the TorchScript
    exporter gets (data-dependent control flow: dynamo exports ``torch.cond``, TorchScript needs
    ``torch.jit.script``). ``opset`` is TorchScript's ``opset_version``; dynamo exports at its default (20 with
    torch 2.13).
    """

    name: str
    module: Callable[[], Any]
    feeds: Callable[[], list[Feed]]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    control: bool = False
    about: str = ""
    unsupported: Mapping[str, str] = field(default_factory=dict)
    dynamic: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    torchscript_options: Mapping[str, Any] = field(default_factory=dict)
    dynamo_options: Mapping[str, Any] = field(default_factory=dict)
    opset: int = 17
    post: Callable[[Any], None] | None = None
    script: Callable[[Any], Any] | None = None
