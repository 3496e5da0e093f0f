"""The Pass base class and what a pass returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import onnx
    import onnx_graphsurgeon as gs

    from onnx_fp16_rewrite.pipeline.pass_context import PassContext


@dataclass
class Site:
    """One place a pass looked at: the node (or tensor) and what happened there."""

    node: str
    op: str
    detail: str


@dataclass
class PassResult:
    """What a pass did. ``modified`` must be honest: False means the graph and the plan are unchanged."""

    modified: bool
    rewritten: list[Site] = field(default_factory=list)
    skipped: list[Site] = field(default_factory=list)
    # A pass that knows which tensors' FP32 values it changed names them (the other tensors that
    # keep their name keep their values bit for bit: exact rewrites); None: not known, so every
    # tensor whose computation the rewrite reaches counts as changed (analysis.signatures).
    values_changed: list[str] | None = None
    # A re-association (box-filter: window sums by other sums): every tensor the pass did not rewrite
    # keeps its FP32 value up to rounding, its range included (what ``fix --auto`` may rely on).
    rounding_only: bool = False


class Pass:
    """A graph rewrite. Subclasses set ``name`` (kebab-case, the CLI name) and ``summary``
    (one line), take typed keyword-only options in ``__init__``, and implement ``run``.

    A pass edits ``graph`` in place and may edit ``ctx.plan``; it never validates itself:
    the PassManager checks, validates and rolls back.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # ``fix --auto`` tries range-safe rewrites with a cost, cheapest first, before pinning
    # anything to FP32; None keeps a pass out of the automatic search.
    auto_cost: ClassVar[int | None] = None

    def run(self, graph: "gs.Graph", ctx: "PassContext") -> PassResult:
        raise NotImplementedError

    def nothing_to_do(self, model: "onnx.ModelProto") -> PassResult | None:
        """The result ``run`` would return, where the model's op types alone show it has nothing
        to do (None: run it). The PassManager then skips graphsurgeon's import of the model
        (~0.03 s for a 230-node graph; ``fix --auto`` tries six rewrites on every model)."""
        return None

    def options(self) -> dict[str, object]:
        """The pass's options as plain data, for reports (subclasses are dataclass-like)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
