"""Speed of the FP16 emulation as a ratio to one plain ORT FP32 inference, in the same process.

Run by hand: python benchmarks/emulation_speed.py [--size 512] [--repeat 5]
"""

from __future__ import annotations

import argparse
import resource
import time

from onnx_fp16_rewrite.models.nafnet import build_nafnet, demo_inputs
from onnx_fp16_rewrite.emulation.fp16_emulation import build_emulation, check_fp16
from onnx_fp16_rewrite.io.ort_runner import make_session


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    model = build_nafnet(height=args.size, width=args.size)
    feed = demo_inputs(model)
    plain = make_session(model)
    plain.run(None, feed)
    t_plain = best_of(lambda: plain.run(None, feed), args.repeat)
    emu = make_session(build_emulation(model).model)
    emu.run(None, feed)
    t_emu = best_of(lambda: emu.run(None, feed), args.repeat)
    strict = make_session(build_emulation(model, strict_cumsum=True).model)
    strict.run(None, feed)
    t_strict = best_of(lambda: strict.run(None, feed), args.repeat)
    t_check = best_of(lambda: check_fp16(model, [feed]), max(1, args.repeat // 2))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"NAFNet-style {args.size}x{args.size}: plain ORT FP32 run {t_plain * 1e3:.0f} ms")
    print(f"  emulation run        {t_emu / t_plain:5.1f}x plain")
    print(f"  strict-CumSum run    {t_strict / t_plain:5.1f}x plain")
    print(f"  whole check_fp16     {t_check / t_plain:5.1f}x plain (reference run, build, session, compare)")
    print(f"  peak RSS of this process {rss:.0f} MiB")


if __name__ == "__main__":
    main()
