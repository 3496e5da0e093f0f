"""What a pass may ask of the run it is part of: the sample inputs, the precision plan, ranges."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx

from onnx_fp16_rewrite.io.ort_runner import Feed
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan


@dataclass
class PassContext:
    """Handed to every pass. ``model`` is the model as it was before the pass (read only);
    ``plan`` is the pass's to edit; ranges are measured on ``feeds`` on demand and cached.
    ``judge``: the caller's cut-out judge, ``judge(model, cutouts, l1_below) -> (scores, l1)`` as
    ``analysis.cutout_judge.judge_with_l1`` without the feeds; None: the pass judges on ``feeds``
    itself (fix --auto brings one that judges inside the candidate's diagnosis run)."""

    model: onnx.ModelProto
    feeds: Sequence[Feed]
    plan: PrecisionPlan = field(default_factory=PrecisionPlan)
    _absmax: dict[str, float] | None = None
    judge: Callable | None = None

    def tensor_absmax(self) -> dict[str, float]:
        """FP32 absmax (over all feeds) of every float tensor a node of ``model`` produces."""
        if self._absmax is None:
            from onnx_fp16_rewrite.analysis.range_profile import profile_absmax

            self._absmax = profile_absmax(self.model, self.feeds)
        return self._absmax
