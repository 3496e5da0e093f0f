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
    model, feeds, known = cli_common.load(args)
    # What to release at the end, whatever happens (main() may run again in-process): the weights load
    # shared, or the emulation branch's (the same model unless a demo's weights were shared there).
    held = model
    try:
        progress = progress_for(sys.stdout, sys.stderr, quiet=args.quiet)
        if trt_library:
            from onnx_fp16_rewrite.tensorrt.trt_backend import check_trt

            if known:
                known.raise_failure()  # ORT's refusal is the input's: before a TensorRT build

            with progress.phase(f"{trt_library.label}: build and run") as phase:
                report = check_trt(model, feeds, model_path=args.model, rel_l2_tolerance=args.rel_l2,
                                   library=trt_library)
                phase.done("NOT VERIFIED" if report.not_verified else ("PASS" if report.passed else "FAIL"))
            cli_common.say(args, render_fp16(report, trt_library.label))
        else:
            from onnx_fp16_rewrite.canonical import canonicalize, computes_as_given, confirm, unconfirmed
            from onnx_fp16_rewrite.io import weights

            # Weights shared first: canonicalisation copies the model several times (as fix does). A model
            # file's are already (cli_common.load): then share returns it as it is; a demo's are shared here.
            given = held = weights.share(model)
            for later in (True, False):
                with progress.phase("canonicalisation") as phase:
                    # What fix analyses: folded shape arithmetic, no no-op Casts. Validated on the FP32
                    # outputs the check's shadow computes (one FP32 run fewer); if refused (or it does
                    # not run), canonicalised again, each step validated, as fix does.
                    model, canon = canonicalize(given, feeds, confirm_later=later, known_outputs=known)
                    phase.done(canon.summary())
                fp32: list = []
                # The preflight's outputs are the FP32 twin's, bit for bit, when the canonical form
                # computes what the model given does: the emulation graph then carries no twin.
                try:
                    with progress.phase("FP16 emulation") as phase:
                        report = check_fp16(model, feeds, strict_cumsum=args.strict_cumsum,
                                            rel_l2_tolerance=args.rel_l2, max_findings=MAX_FINDINGS, fp32_outputs=fp32,
                                            fp32_run=known if computes_as_given(canon) else None,
                                            # Beside canonicalisation and the graph's build (Python), not beside
                                            # the emulation's run: two ORT runs on two cores took longer than one
                                            # after the other (and held both runs' memory).
                                            before_run=known.raise_failure if known else None)
                        phase.done(f"{'PASS' if report.passed else 'FAIL'}, {report.failing_tensors} failing tensor(s)")
                except Exception:  # ORT's errors are many types
                    if known:
                        known.raise_failure()  # the inputs' fault: no second canonicalisation would run them
                    if not unconfirmed(canon):
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
    except BaseException:
        if known:
            known.raise_failure()  # the preflight runs beside the work: its refusal (exit 2) wins over what followed
        raise
    finally:
        if known:
            known.wait()  # its session reads the weights released next
        cli_common.release_model(held)
    return code


__all__ = ["cmd_check"]
