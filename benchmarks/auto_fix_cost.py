"""Cost of ``fix --auto`` (profiling + search) as a ratio to one plain ORT FP32 inference.

Each measurement runs in its own subprocess so peak RSS is that job's alone. Run by hand:
    python benchmarks/auto_fix_cost.py [--model nafnet|integral-1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_JOB = r"""
import json, resource, sys, time
job, name = sys.argv[1], sys.argv[2]
from onnx_fp16_rewrite.models import DEMO_MODELS, failure_patterns
from onnx_fp16_rewrite.models.nafnet import demo_inputs
if name == "nafnet":
    model = DEMO_MODELS["nafnet"](); feeds = [demo_inputs(model)]
else:
    model, feeds = failure_patterns.build_integral_mean(size=1024)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if job == "plain":
    from onnx_fp16_rewrite.io.ort_runner import run_model
    run_model(model, feeds)
    extra = {}
else:
    from onnx_fp16_rewrite.analysis.auto_fix import auto_fix
    from onnx_fp16_rewrite.pipeline.registry import auto_rewrites
    _, report = auto_fix(model, feeds, rewrites=auto_rewrites() if job == "auto" else ())
    extra = {"profiling_runs": report.profiling_runs, "emulation_runs": report.emulation_runs,
             "validation_runs": report.validation_runs, "kept": report.passes_kept,
             "fp32_nodes": report.fp32_nodes, "passed": report.passed}
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "delta_mb": (peak - base) / 1024, **extra}))
"""


def run(job: str, model: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _JOB, job, model], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="nafnet", choices=["nafnet", "integral-1024"])
    args = parser.parse_args()
    plain = run("plain", args.model)
    print(f"{args.model}: plain ORT FP32 inference {plain['seconds']:.2f} s, peak RSS {plain['peak_mb']:.0f} MB")
    for job, label in (("auto", "fix --auto (rewrites first)"), ("pin", "auto, pinning only")):
        auto = run(job, args.model)
        print(f"  {label}: {auto['seconds']:.2f} s = {auto['seconds'] / plain['seconds']:.1f}x, "
              f"peak RSS {auto['peak_mb']:.0f} MB = {auto['peak_mb'] / plain['peak_mb']:.1f}x "
              f"(model-run memory {auto['delta_mb']:.0f} vs {plain['delta_mb']:.0f} MB)")
        print(f"    runs: {auto['profiling_runs']} FP32 profiling + {auto['emulation_runs']} emulation + "
              f"{auto['validation_runs']} validation; kept {auto['kept']}; {auto['fp32_nodes']} FP32 nodes; "
              f"passed={auto['passed']}")


if __name__ == "__main__":
    main()
