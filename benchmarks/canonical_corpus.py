"""Canonicalisation over the corpus of library exports (models/exported): what it folds and removes.

Per model: nodes before -> after, nodes folded, no-op Casts removed, whether analysis was
specialised, whether an unchanged model gets its dynamic dims back (proven on a second shape),
the FP32 validation against the original, FP32 nodes whose precision-relevant float FLOPs are
counted on traced shapes, and the seconds it took (relative to one ORT run of the original).

    python benchmarks/canonical_corpus.py [--dynamic] [--fix] [NAME ...]

``--fix`` runs ``fix_model(auto=True, emit="fp32")`` with and without canonicalisation instead and
prints the FP16 FLOP fraction (and beside it the corpus' independent count on traced shapes), the
FP32 nodes, the rewrites kept and whether the emitted model kept its dynamic dims.

``--dynamic`` re-exports each TorchScript entry with dynamic axes (batch and spatial/sequence dims,
one dim name per axis position, so inputs that share a batch or a sequence share it): the case
where analysis is specialised and the emitted model must get its dynamic dims back.
"""

from __future__ import annotations

import sys
import time


def _dynamic_variant(name: str):
    """(model, feeds) of ``name`` exported by TorchScript with dynamic batch/spatial/sequence axes."""
    import dataclasses

    import numpy as np

    from onnx_fp16_rewrite.models import exported
    from onnx_fp16_rewrite.models.exported.export import export_spec

    spec = exported.spec(name)
    feeds = spec.feeds()
    axes = {}
    for input_name in spec.inputs:
        ndim = np.ndim(feeds[0][input_name])
        picked = [0, 2, 3] if ndim == 4 else list(range(min(ndim, 2)))
        axes[input_name] = {a: f"d{a}" for a in picked}
    dyn = dataclasses.replace(spec, dynamic=axes)
    model = export_spec(dyn, dyn.module(), feeds[0], "torchscript")
    return model, exported.feeds(name, model)


def _fix_rows(name: str, exporter: str, model, feeds) -> None:
    import onnx

    from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
    from onnx_fp16_rewrite.fix import fix_model
    from onnx_fp16_rewrite.models.exported.traced_flops import traced_fp16_fraction

    for canonical in (False, True):
        t0 = time.perf_counter()
        subject = model
        if not canonical:  # auto_fix canonicalises an unmarked model itself: mark it as done
            from onnx_fp16_rewrite.canonical import MARK_KEY

            subject = onnx.ModelProto()
            subject.CopyFrom(model)
            subject.metadata_props.add(key=MARK_KEY, value="{}")
        try:
            result = fix_model(subject, [], feeds, auto=True, emit="fp32", canonical=canonical)
        except Exception as exc:  # reported per model
            print(f"{name:<20} {exporter:<11} {'canon' if canonical else 'plain':<6} failed: {type(exc).__name__}: {exc}"[:200])
            continue
        rep = result.report
        plan = PrecisionPlan.from_model(result.model)
        independent = traced_fp16_fraction(result.model, feeds[0], set(plan.fp32_nodes))
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in result.model.graph.input[0].type.tensor_type.shape.dim]
        kept = ",".join(rep.auto.passes_kept) if rep.auto else ""
        if rep.canonical is not None and rep.canonical.specialised:
            kept += f"] [{'dynamic dims restored' if rep.canonical.emitted_dynamic else 'EMITTED SPECIALISED: ' + rep.canonical.notes[-1]}"
        print(f"{name:<20} {exporter:<11} {'canon' if canonical else 'plain':<6} exit {rep.exit_code} "
              f"fp16 {rep.fp16_flop_fraction:7.2%} (independent {independent:7.2%}) fp32 nodes {len(plan):>3} "
              f"kept [{kept}] input {dims} {time.perf_counter() - t0:6.1f}s")


def main(names: list[str]) -> int:
    import logging

    logging.basicConfig(level=logging.ERROR)
    from onnx_fp16_rewrite.analysis.flops import node_flops
    from onnx_fp16_rewrite.canonical import canonicalize, restore_dynamic
    from onnx_fp16_rewrite.io.ort_runner import run_model
    from onnx_fp16_rewrite.models import exported

    print(f"{'model':<20} {'exporter':<11} {'nodes':>11} {'folded':>6} {'casts':>5} {'spec':>4} {'dyn':>4} "
          f"{'flops orig':>10} {'flops canon':>11} {'seconds':>7} {'/run':>6}  validation")
    dynamic, fix = "--dynamic" in names, "--fix" in names
    names = [n for n in names if n not in ("--dynamic", "--fix")]
    entries = [(n, "ts-dynamic") for n in exported.SPECS] if dynamic else exported.NAMES
    for name, exporter in entries:
        if names and name not in names or (fix and exporter == "dynamo"):  # --fix: TorchScript's graphs
            continue
        try:
            if dynamic:
                model, feeds = _dynamic_variant(name)
            else:
                model = exported.build(name, exporter=exporter)
                feeds = exported.feeds(name, model)
        except Exception as exc:  # a corpus entry that does not build here is reported, not fatal
            print(f"{name:<20} {exporter:<11} build failed: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        if fix:
            _fix_rows(name, exporter, model, feeds)
            continue
        t0 = time.perf_counter()
        run_model(model, feeds[:1])
        run_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        canon, rep = canonicalize(model, feeds)
        canon_s = time.perf_counter() - t0
        emitted = restore_dynamic(canon, rep)
        dyn = "-" if rep.emitted_dynamic is None else ("yes" if rep.emitted_dynamic else "NO")
        f0 = sum(node_flops(model, feeds[:1]).values())
        f1 = sum(node_flops(emitted, feeds[:1]).values())
        print(f"{name:<20} {exporter:<11} {rep.nodes_before:>5}->{rep.nodes_after:<5} {rep.folded:>6} "
              f"{len(rep.casts_removed):>5} {'yes' if rep.specialised else 'no':>4} {dyn:>4} {f0:>10.3g} {f1:>11.3g} "
              f"{canon_s:>7.2f} {canon_s / max(run_s, 1e-3):>5.1f}x  {rep.validation}"
              + (f"  notes: {'; '.join(rep.notes)}" if rep.notes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
