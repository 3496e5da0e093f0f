"""The prefix-sum rewrites side by side with FP32 pinning, on the issue's acceptance models.

For every model and fix: did the pass keep its rewrite, the FP32 error against the original (and
what it was judged against), the FP16 emulation (nothing pinned for the rewrites; the plan for
protect-fp32), with FP32 and with FP16 (``--strict-cumsum``) CumSum accumulation, the FLOP ratio
to the original and the share of FLOPs left in FP16.

Run by hand: python benchmarks/prefix_sum_rewrites.py [--models nafnet-512,guided-224,...]
"""

from __future__ import annotations

import argparse
import time

from onnx_fp16_rewrite.models import build_integral_box_filter, build_nafnet
from onnx_fp16_rewrite.models.guided_filter import build_guided_filter
from onnx_fp16_rewrite.models.nafnet import demo_inputs
from onnx_fp16_rewrite.passes import ProtectFp32
from onnx_fp16_rewrite.passes.box_filter import BoxFilter
from onnx_fp16_rewrite.passes.rescale_accumulation import RescaleAccumulation
from onnx_fp16_rewrite.passes.split_cumsum import SplitCumSum
from onnx_fp16_rewrite.analysis.flops import fp16_flop_fraction, node_flops
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.io.ort_runner import run_model
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan

MODELS = {
    "nafnet-512": build_nafnet,
    "guided-224": lambda: build_guided_filter(size=224),
    "guided-1024": lambda: build_guided_filter(size=1024),
    "box-3x3-256": build_integral_box_filter,
}


def fixes(name: str) -> dict:
    return {
        "none": None,
        "protect-fp32": ProtectFp32(match="sca") if name.startswith("nafnet") else ProtectFp32(),
        "box-filter": BoxFilter(),
        "box-filter blocked": BoxFilter(window_form="blocked"),
        "rescale-accumulation": RescaleAccumulation(),
        "split-cumsum": SplitCumSum(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    print(f"{'model':<12} {'fix':<21} {'status':<9} {'FP32 err (vs)':<18} {'FP16 NaN/Inf':>13} "
          f"{'rel L2':>9} {'strict':>9} {'FLOPs':>6} {'FP16 FLOPs':>10} {'s':>5}")
    for name in args.models.split(","):
        model = MODELS[name]()
        feeds = [demo_inputs(model)]
        reference = run_model(model, feeds)
        base = sum(node_flops(model).values())
        for label, fix in fixes(name).items():
            start = time.perf_counter()
            fixed, status, err = model, "-", "-"
            if fix is not None:
                fixed, report = PassManager([fix], feeds).run(model)
                record = report.passes[0]
                status = record.status
                if record.validation:
                    worst = max(record.validation.outputs, key=lambda o: o.max_abs_error)
                    err = f"{worst.max_abs_error:.2g} ({worst.judged_against})"
            plan = PrecisionPlan.from_model(fixed)
            fp16 = check_fp16(fixed, feeds, reference, plan=plan).outputs[0]
            strict = check_fp16(fixed, feeds, reference, plan=plan, strict_cumsum=True).outputs[0]
            ratio = sum(node_flops(fixed).values()) / base
            share = fp16_flop_fraction(fixed, plan)
            print(f"{name:<12} {label:<21} {status:<9} {err:<18} {f'{fp16.nan}/{fp16.inf}':>13} "
                  f"{fp16.rel_l2:>9.3g} {strict.rel_l2:>9.3g} {ratio:>6.2f} {share:>10.1%} "
                  f"{time.perf_counter() - start:>5.1f}")


if __name__ == "__main__":
    main()
