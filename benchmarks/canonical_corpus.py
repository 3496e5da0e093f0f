"""Canonicalisation over the corpus of library exports (models/exported): what it folds and removes.

Per model: nodes before -> after, nodes folded, no-op Casts removed, whether analysis was
specialised, whether an unchanged model gets its dynamic dims back (proven on a second shape),
the FP32 validation against the original, FP32 nodes whose precision-relevant float FLOPs are
counted on traced shapes, and the seconds it took (relative to one ORT run of the original).

    python benchmarks/canonical_corpus.py [NAME ...]
"""

from __future__ import annotations

import sys
import time


def main(names: list[str]) -> int:
    import logging

    logging.basicConfig(level=logging.ERROR)
    from onnx_fp16_rewrite.analysis.flops import node_flops
    from onnx_fp16_rewrite.canonical import canonicalize, restore_dynamic
    from onnx_fp16_rewrite.io.ort_runner import run_model
    from onnx_fp16_rewrite.models import exported

    print(f"{'model':<20} {'exporter':<11} {'nodes':>11} {'folded':>6} {'casts':>5} {'spec':>4} {'dyn':>4} "
          f"{'flops orig':>10} {'flops canon':>11} {'time/run':>8}  validation")
    for name, exporter in exported.NAMES:
        if names and name not in names:
            continue
        try:
            model = exported.build(name, exporter=exporter)
            feeds = exported.feeds(name, model)
        except Exception as exc:  # a corpus entry that does not build here is reported, not fatal
            print(f"{name:<20} {exporter:<11} build failed: {type(exc).__name__}: {str(exc)[:80]}")
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
              f"{canon_s / max(run_s, 1e-3):>7.1f}x  {rep.validation}"
              + (f"  notes: {'; '.join(rep.notes)}" if rep.notes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
