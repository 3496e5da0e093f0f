"""``onnx-rewrite check``: the FP16 verdict of a model (the emulation, or TensorRT with --backend trt)."""

from __future__ import annotations

import argparse
import sys

from onnx_fp16_rewrite import cli_common
from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.fix import EXIT_FP16_FAILS, EXIT_NOT_VERIFIED, EXIT_OK, MAX_FINDINGS
from onnx_fp16_rewrite.progress import progress_for


def cmd_check(args: argparse.Namespace) -> int:
    from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
    from onnx_fp16_rewrite.report.report import render_fp16

    cli_common.check_out_paths(args, args.report, args.html, args.save_inputs)
    cli_common.require_plot(args)
    if args.backend == "trt" and args.strict_cumsum:
        raise BadInputError("--strict-cumsum applies to the emulation backend only")
    trt_library = cli_common.require_trt(args.backend == "trt")
    # No preflight run for the emulation: its FP32 twin is the model's FP32 run, in the same graph (a
    # run beside the emulation costs more than the twin: NAFNet-9 0.68 s against 0.5 s). Only when the
    # check fails does a plain run say whether the model or its inputs are at fault (exit 2), as in fix.
    model, feeds, _ = cli_common.load(args, preflight_now=bool(trt_library))
    # What to release at the end, whatever happens (main() may run again in-process): the weights load
    # shared, or the emulation branch's (the same model unless a demo's weights were shared there).
    held = model
    try:
        progress = progress_for(sys.stdout, sys.stderr, quiet=args.quiet)
        if trt_library:
            from onnx_fp16_rewrite.tensorrt.trt_backend import check_trt

            with progress.phase(f"{trt_library.label}: build and run") as phase:
                report = check_trt(model, feeds, model_path=args.model, rel_l2_tolerance=args.rel_l2,
                                   library=trt_library)
                phase.done("NOT VERIFIED" if report.not_verified else ("PASS" if report.passed else "FAIL"))
            cli_common.say(args, render_fp16(report, trt_library.label))
        else:
            from onnx_fp16_rewrite.canonical import canonicalize, confirm, unconfirmed
            from onnx_fp16_rewrite.io import weights

            # Weights shared first: canonicalisation copies the model several times (as fix does). A model
            # file's are already (cli_common.load): then share returns it as it is; a demo's are shared here.
            given = held = weights.share(model)
            for later in (True, False):
                with progress.phase("canonicalisation") as phase:
                    # What fix analyses: folded shape arithmetic, no no-op Casts. Validated on the FP32
                    # outputs the check's shadow computes (one FP32 run fewer); if refused (or it does
                    # not run), canonicalised again, each step validated, as fix does.
                    model, canon = canonicalize(given, feeds, confirm_later=later)
                    phase.done(canon.summary())
                fp32: list = []
                try:
                    with progress.phase("FP16 emulation") as phase:
                        report = check_fp16(model, feeds, strict_cumsum=args.strict_cumsum,
                                            rel_l2_tolerance=args.rel_l2, max_findings=MAX_FINDINGS, fp32_outputs=fp32)
                        phase.done(f"{'PASS' if report.passed else 'FAIL'}, {report.failing_tensors} failing tensor(s)")
                except Exception:  # ORT's errors are many types
                    if not unconfirmed(canon):
                        if not args.demo:
                            from onnx_fp16_rewrite.io.ort_runner import preflight

                            preflight(given, feeds[0], f"input model {args.model}")  # BadInputError: the inputs' fault
                        raise
                    continue
                if confirm(canon, model, fp32 or None):
                    break
            cli_common.say(args, render_fp16(report, "FP16 emulation"))
            if canon.changed() and not args.quiet:
                print(canon.summary())
        pitfalls = cli_common.print_pitfalls(model, trt_library, quiet=args.quiet)
        code = EXIT_NOT_VERIFIED if report.not_verified else (EXIT_OK if report.passed else EXIT_FP16_FAILS)
        if report.not_verified:  # built, not run: one line on stderr, the verdict says NOT VERIFIED
            print(f"onnx-rewrite: not verified: {report.not_verified}", file=sys.stderr)
        if args.report or args.html:
            from onnx_fp16_rewrite.report.outputs import check_reports

            texts = check_reports(report, model, feeds, argv=args.argv, model_path=args.model, demo=args.demo,
                                  exit_code=code, backend="tensorrt" if trt_library else "emulation", pitfalls=pitfalls,
                                  want_json=bool(args.report), want_html=bool(args.html),
                                  strict_cumsum=args.strict_cumsum, tolerance=args.rel_l2)
            cli_common.write_reports(args, texts)
    finally:
        cli_common.release_model(held)
    return code


__all__ = ["cmd_check"]
