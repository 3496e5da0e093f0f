"""``onnx-rewrite fix``: passes, the automatic fix, emission, verification, the build line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from onnx_fp16_rewrite import cli_common
from onnx_fp16_rewrite.errors import BadInputError, RewriteError
from onnx_fp16_rewrite.progress import progress_for


def cmd_fix(args: argparse.Namespace) -> int:
    from onnx_fp16_rewrite.fix import fix_model
    from onnx_fp16_rewrite.io.model_io import refuse_overwrite
    from onnx_fp16_rewrite.pipeline.validate import Tolerance
    from onnx_fp16_rewrite.report.report import render_auto, render_fp16, render_passes

    out = Path(args.output)
    refuse_overwrite(out, args.model)
    if not out.parent.exists():
        raise BadInputError(f"output folder does not exist: {out.parent}")
    cli_common.check_out_paths(args, args.report, args.html, args.save_inputs)
    cli_common.require_plot(args)
    if args.keep_io_types and args.emit != "mixed":
        raise BadInputError("--keep-io-types only applies to --emit mixed")
    cli_common.require_trt(args.verify == "trt")  # fail before any work
    passes, auto, rewrites = _fix_passes(args)
    per_output = _parse_tolerances(args.tolerance)
    # No preflight run first: the first diagnosis computes the model in FP32 anyway, and the canonical
    # form's validation runs the original itself when it needs its outputs. Only when the fix fails
    # does a plain run of the model say whether the model or its inputs are at fault (exit 2).
    model, feeds, _ = cli_common.load(args, preflight_now=False)
    try:  # the weights load shared are released whatever happens (main() may run again in-process)
        from onnx_fp16_rewrite.cli_validate import check_node_names

        check_node_names([*passes, *rewrites], model)  # --nodes names a node of the model ('did you mean')
        progress = progress_for(sys.stdout, sys.stderr, quiet=args.quiet)
        try:
            result = fix_model(
                model, passes, feeds, emit=args.emit, keep_io_types=args.keep_io_types,
                strict_cumsum=args.strict_cumsum, tolerance=Tolerance(args.rtol, args.atol),
                per_output=per_output, rel_l2_tolerance=args.rel_l2, model_path=str(out), verify=args.verify,
                auto=auto, auto_rewrites=rewrites, progress=progress,
            )
        except (RewriteError, MemoryError):
            raise
        except Exception:  # ORT's errors are many types
            if not args.demo:
                from onnx_fp16_rewrite.io.ort_runner import preflight

                preflight(model, feeds[0], f"input model {args.model}")  # BadInputError when the inputs are at fault
            raise
        rep = result.report
        if rep.canonical is not None:
            if rep.canonical.changed() and not args.quiet:
                print(rep.canonical.summary())
            if rep.canonical.specialised_warning():
                print(f"warning: {rep.canonical.specialised_warning()}", file=sys.stderr)
        if not args.quiet:
            print(render_fp16(rep.fp16_before, "before: FP16 emulation"))
            if rep.passes.passes:
                print(render_passes(rep.passes))
            for e in rep.mixed_ort_error:
                print(f"mixed model in ORT vs FP32 reference: {e.output}: max abs {e.max_abs_error:.3g}, "
                      f"rel L2 {e.rel_l2:.3g} (FP16 weights)")
            if rep.auto is not None:
                print(render_auto(rep.auto))
            if rep.fp16_flop_fraction is not None:
                print(f"FP16 FLOP fraction: {rep.fp16_flop_fraction:.1%} of estimated FLOPs still run in FP16")
        cli_common.say(args, render_fp16(rep.fp16_after, f"after ({args.emit}): FP16 emulation"))
        if rep.trt_after is not None:
            cli_common.say(args, render_fp16(rep.trt_after, f"after ({args.emit}): TensorRT"))
            if rep.trt_after.not_verified:
                print(f"onnx-rewrite: not verified: {rep.trt_after.not_verified}", file=sys.stderr)
        args.tx.write_model("--output", result.model)  # renamed into place with the reports at the end
        print(f"wrote {out}")
        _print_build_line(rep)
        if not args.quiet and args.emit == "mixed" and not args.keep_io_types:
            print("note: the model's inputs and outputs are FLOAT16 now (--keep-io-types keeps them FP32)")
        if not args.quiet:
            for warning in rep.warnings:
                print(f"warning: {warning}")
        for line in _whats_left(rep, args):
            print(line)
        if args.report or args.html:
            from onnx_fp16_rewrite.report.outputs import fix_reports

            texts = fix_reports(result, model, feeds, argv=args.argv, model_path=args.model, demo=args.demo,
                                output_path=str(out), want_json=bool(args.report), want_html=bool(args.html),
                                strict_cumsum=args.strict_cumsum, tolerance=args.rel_l2)
            cli_common.write_reports(args, texts)
    finally:
        cli_common.release_model(model)
    return rep.exit_code


def _fix_passes(args: argparse.Namespace):
    """(passes to run, whether the automatic fix runs, the automatic fix's rewrites), from the flags."""
    from onnx_fp16_rewrite.cli_args import SHORT_PASS_FLAGS
    from onnx_fp16_rewrite.cli_passes import assign_short_flags, make_passes, parse_pass_options
    from onnx_fp16_rewrite.pipeline.registry import auto_rewrites, parse_pipeline

    names = parse_pipeline(args.passes or "")
    if args.passes is not None and not names:
        raise BadInputError("--pass needs at least one pass name")
    auto = args.auto or args.passes is None  # no --pass: the automatic fix
    auto_names = [p.name for p in auto_rewrites()] if auto else []
    selected = list(dict.fromkeys(names + auto_names))
    options = parse_pass_options(args.pass_option)
    given = {dest: getattr(args, f"short_{dest}") for dest, _, _ in SHORT_PASS_FLAGS.values()
             if getattr(args, f"short_{dest}") is not None}
    for name, opts in assign_short_flags(given, selected).items():
        twice = set(opts) & set(options.get(name, {}))
        if twice:
            raise BadInputError(f"{name}.{sorted(twice)[0]} is given twice (a short flag and --pass-option)")
        options.setdefault(name, {}).update(opts)
    idle = [name for name in options if name not in selected]
    if idle:
        raise BadInputError(f"options for {', '.join(idle)}, which does not run here: add --pass {idle[0]}"
                            + (" (and --auto to keep the automatic fix)" if not names else ""))
    return make_passes(names, options), auto, make_passes(auto_names, options)


def _parse_tolerances(specs: list[str]):
    from onnx_fp16_rewrite.cli_validate import check_tolerance
    from onnx_fp16_rewrite.pipeline.validate import Tolerance

    result = {}
    for spec in specs:
        name, _, tols = spec.rpartition(":")
        try:
            rtol, atol = (float(x) for x in tols.split(","))
        except ValueError:
            raise BadInputError(f"bad --tolerance {spec!r}: expected OUTPUT:RTOL,ATOL") from None
        check_tolerance(spec, rtol, atol)
        result[name] = Tolerance(rtol, atol)
    return result


def _print_build_line(rep) -> None:
    """The trtexec line; a weakly typed one (flags TensorRT 11 removed) carries its label on the line."""
    if "--stronglyTyped" in rep.trtexec_argv:
        print(f"build it with (TensorRT 10 and 11):\n  {rep.trtexec}")
    else:
        print(f"build it with ({cli_common.TRT10_LABEL}: TensorRT 11 removed --fp16, --precisionConstraints and "
              f"--layerPrecisions; for TensorRT 11 rerun with --emit mixed):\n  {rep.trtexec}  # {cli_common.TRT10_LABEL}")


def _whats_left(rep, args: argparse.Namespace) -> list[str]:
    from onnx_fp16_rewrite.fail_summary import whats_left

    return whats_left(rep, ran_auto=rep.auto is not None, rel_l2=args.rel_l2, emit=args.emit)


__all__ = ["cmd_fix"]
