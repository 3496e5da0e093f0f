"""Write the ``fix --auto --emit mixed`` output of every corpus export to a folder, for TensorRT-RTX.

The GPU machine that has TensorRT-RTX lacks the exporters' libraries (diffusers, this transformers),
so the corpus is fixed here and the emitted models travel; ``tests/test_trt_rtx.py`` parses and
builds every ``*.onnx`` in ``$TRT_RTX_MODELS`` there. Usage::

    python benchmarks/trt_rtx_corpus.py OUT_DIR [--exporter torchscript|dynamo|both]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from onnx_fp16_rewrite.fix import fix_model
from onnx_fp16_rewrite.io.model_io import save_model
from onnx_fp16_rewrite.models import exported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo", "both"])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, exporter in exported.NAMES:
        if args.exporter != "both" and exporter != args.exporter:
            continue
        start = time.perf_counter()
        model = exported.build(name, exporter)
        feeds = exported.feeds(name, model)
        result = fix_model(model, [], feeds, auto=True, emit="mixed")
        path = out / f"{name}.{exporter}.mixed.onnx"
        save_model(result.model, path)
        rep = result.report
        summary[path.name] = {"exit": rep.exit_code, "fp16_flop_fraction": rep.fp16_flop_fraction,
                              "emulation_passed": rep.fp16_after.passed, "seconds": round(time.perf_counter() - start, 1),
                              "bytes": path.stat().st_size,
                              "shapes": {k: list(getattr(v, "shape", ())) for k, v in feeds[0].items()}}
        print(path.name, summary[path.name], flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
