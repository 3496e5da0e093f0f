"""The ``onnx-rewrite`` command line: check, fix, passes, trtexec. The only module that prints.

The parser is ``cli_args``; pass flags are ``cli_passes``; input flags are ``cli_inputs``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from onnx_fp16_rewrite.cli_args import build_parser, fix_positionals
from onnx_fp16_rewrite.errors import BadInputError, RewriteError, one_line
from onnx_fp16_rewrite.fix import EXIT_FP16_FAILS, EXIT_NOT_VERIFIED, EXIT_OK, MAX_FINDINGS
from onnx_fp16_rewrite.progress import progress_for

__all__ = ["build_parser", "main"]

TRT10_LABEL = "TensorRT 10 only"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fix_positionals(args)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the reports quote the exact command
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    if verbose and quiet:
        print("onnx-rewrite: error: -v and -q contradict each other", file=sys.stderr)
        return 2
    level = logging.INFO if verbose else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    args.quiet = quiet
    from onnx_fp16_rewrite.io.model_io import parsed_once

    try:
        with parsed_once():  # the input model's file is parsed once, for its output checks and its load
            if args.command == "passes":
                return _cmd_passes()
            if args.command == "check":
                return _with_outputs(_cmd_check, args)
            if args.command == "trtexec":
                return _cmd_trtexec(args)
            if args.command == "diff":
                return _cmd_diff(args)
            return _with_outputs(_cmd_fix, args)
    except RewriteError as exc:
        print(f"onnx-rewrite: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnx-rewrite: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: one line, never a traceback (unless --verbose)
        if verbose:
            raise
        print(f"onnx-rewrite: internal error: {type(exc).__name__}: {one_line(exc)} (rerun with -v)", file=sys.stderr)
        return 1


def _cmd_passes() -> int:
    from onnx_fp16_rewrite.cli_passes import list_passes

    print("\n".join(list_passes()))
    return EXIT_OK


def _load(args: argparse.Namespace, *, preflight_now: bool = True):
    """The model, its feeds, and its FP32 outputs on the first feed when the preflight ran it
    (``preflight_now=False``: none; the caller runs ``ort_runner.preflight`` when its work fails)."""
    from onnx_fp16_rewrite.cli_inputs import feeds_from_args, save_inputs
    from onnx_fp16_rewrite.cli_validate import check_feeds
    from onnx_fp16_rewrite.io.model_io import check_input_model, load_model
    from onnx_fp16_rewrite.io.ort_runner import preflight

    if bool(args.model) == bool(args.demo):
        raise BadInputError("give either a MODEL path or --demo NAME")
    session = None  # the input model's ORT session, from its load check to its preflight run
    if args.demo:
        from onnx_fp16_rewrite.models import DEMO_MODELS

        if args.demo not in DEMO_MODELS:
            raise BadInputError(f"unknown demo {args.demo!r} (known: {', '.join(DEMO_MODELS)})")
        model = DEMO_MODELS[args.demo]()
    else:
        model = load_model(args.model)
        session = check_input_model(model, f"input model {args.model}")  # checker, I/O, opsets, domains, ORT loads it
    try:
        feeds = feeds_from_args(args, model)
    except MemoryError:
        shapes = " ".join(args.shape) or "the model's own shapes"
        raise BadInputError(f"--shape: inputs of these shapes ({shapes}) do not fit in memory") from None
    source = " ".join(map(str, args.inputs)) if args.inputs else "generated inputs"
    check_feeds(feeds, source)  # finite, non-empty (cli_validate)
    # ORT's refusals are the input's (exit 2); its outputs are the FP32 reference on that feed.
    known = [preflight(model, feeds[0], f"input model {args.model}", session)] if preflight_now and not args.demo else []
    del session
    if args.save_inputs:  # staged: lands with the other outputs when the run succeeds (io.paths)
        if getattr(args, "tx", None):
            args.tx.write_with("--save-inputs", lambda path: save_inputs(feeds, path))
        else:
            save_inputs(feeds, args.save_inputs)
    return model, feeds, known


def _say(args: argparse.Namespace, text: str) -> None:
    """Print a report block; with -q only its first line (the verdict)."""
    print(text.split("\n", 1)[0] if args.quiet else text)


def _cmd_check(args: argparse.Namespace) -> int:
    from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
    from onnx_fp16_rewrite.report.report import render_fp16

    _check_out_paths(args, args.report, args.html, args.save_inputs)
    _require_plot(args)
    if args.backend == "trt" and args.strict_cumsum:
        raise BadInputError("--strict-cumsum applies to the emulation backend only")
    trt_library = _require_trt(args.backend == "trt")
    model, feeds, known = _load(args)
    progress = progress_for(sys.stdout, sys.stderr, quiet=args.quiet)
    if trt_library:
        from onnx_fp16_rewrite.tensorrt.trt_backend import check_trt

        with progress.phase(f"{trt_library.label}: build and run") as phase:
            report = check_trt(model, feeds, model_path=args.model, rel_l2_tolerance=args.rel_l2, library=trt_library)
            phase.done("NOT VERIFIED" if report.not_verified else ("PASS" if report.passed else "FAIL"))
        _say(args, render_fp16(report, trt_library.label))
    else:
        from onnx_fp16_rewrite.canonical import canonicalize, computes_as_given, confirm, unconfirmed

        given = model
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
                    report = check_fp16(model, feeds, strict_cumsum=args.strict_cumsum, rel_l2_tolerance=args.rel_l2,
                                        max_findings=MAX_FINDINGS, fp32_outputs=fp32,
                                        fp32_run=known if computes_as_given(canon) else None)
                    phase.done(f"{'PASS' if report.passed else 'FAIL'}, {report.failing_tensors} failing tensor(s)")
            except Exception:  # ORT's errors are many types
                if not unconfirmed(canon):
                    raise
                continue
            if confirm(canon, model, fp32 or None):
                break
        _say(args, render_fp16(report, "FP16 emulation"))
        if canon.changed() and not args.quiet:
            print(canon.summary())
    pitfalls = _print_pitfalls(model, trt_library, quiet=args.quiet)
    code = EXIT_NOT_VERIFIED if report.not_verified else (EXIT_OK if report.passed else EXIT_FP16_FAILS)
    if report.not_verified:  # built, not run: one line on stderr, the verdict says NOT VERIFIED
        print(f"onnx-rewrite: not verified: {report.not_verified}", file=sys.stderr)
    if args.report or args.html:
        from onnx_fp16_rewrite.report.outputs import check_reports

        texts = check_reports(report, model, feeds, argv=args.argv, model_path=args.model, demo=args.demo,
                              exit_code=code, backend="tensorrt" if trt_library else "emulation", pitfalls=pitfalls,
                              want_json=bool(args.report), want_html=bool(args.html),
                              strict_cumsum=args.strict_cumsum, tolerance=args.rel_l2)
        _write_reports(args, texts)
    return code


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


def _cmd_fix(args: argparse.Namespace) -> int:
    from onnx_fp16_rewrite.fix import fix_model
    from onnx_fp16_rewrite.io.model_io import refuse_overwrite, save_model
    from onnx_fp16_rewrite.pipeline.validate import Tolerance
    from onnx_fp16_rewrite.report.report import render_auto, render_fp16, render_passes

    out = Path(args.output)
    refuse_overwrite(out, args.model)
    if not out.parent.exists():
        raise BadInputError(f"output folder does not exist: {out.parent}")
    _check_out_paths(args, args.report, args.html, args.save_inputs)
    _require_plot(args)
    if args.keep_io_types and args.emit != "mixed":
        raise BadInputError("--keep-io-types only applies to --emit mixed")
    _require_trt(args.verify == "trt")  # fail before any work
    passes, auto, rewrites = _fix_passes(args)
    per_output = _parse_tolerances(args.tolerance)
    # No preflight run first: the first diagnosis computes the model in FP32 anyway, and the canonical
    # form's validation runs the original itself when it needs its outputs. Only when the fix fails
    # does a plain run of the model say whether the model or its inputs are at fault (exit 2).
    model, feeds, _ = _load(args, preflight_now=False)
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
    _say(args, render_fp16(rep.fp16_after, f"after ({args.emit}): FP16 emulation"))
    if rep.trt_after is not None:
        _say(args, render_fp16(rep.trt_after, f"after ({args.emit}): TensorRT"))
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
        _write_reports(args, texts)
    return rep.exit_code


# --- reports: --report JSON, --html page, diff (onnx_fp16_rewrite.report) ---


def _require_plot(args: argparse.Namespace) -> None:
    if args.html:
        from onnx_fp16_rewrite.report.plots import require_matplotlib

        require_matplotlib()  # one line, exit 2, before any work


def _write_reports(args: argparse.Namespace, texts) -> None:
    for option, path, text in (("--report", args.report, texts.json), ("--html", args.html, texts.html)):
        if path and text is not None:
            args.tx.write_text(option, text)
            if not args.quiet:
                print(f"wrote {path}")


def _cmd_diff(args: argparse.Namespace) -> int:
    from onnx_fp16_rewrite.io.model_io import load_model
    from onnx_fp16_rewrite.report.graph_diff import diff_models, render_diff
    from onnx_fp16_rewrite.report.json_report import diff_data, finite
    from onnx_fp16_rewrite.io.paths import plan_outputs

    # Checked before any work: the JSON may be neither of the two models (nor their data files).
    plan = plan_outputs(inputs=[args.original, args.fixed], outputs={"--json": args.diff_json}, model_outputs=())
    diff = diff_models(load_model(args.original), load_model(args.fixed))
    print(render_diff(diff))
    if args.diff_json:
        import json

        with plan.transaction() as tx:
            tx.write_text("--json", json.dumps(finite(diff_data(diff)), indent=2) + "\n")
    return EXIT_OK


def _print_build_line(rep) -> None:
    """The trtexec line; a weakly typed one (flags TensorRT 11 removed) carries its label on the line."""
    if "--stronglyTyped" in rep.trtexec_argv:
        print(f"build it with (TensorRT 10 and 11):\n  {rep.trtexec}")
    else:
        print(f"build it with ({TRT10_LABEL}: TensorRT 11 removed --fp16, --precisionConstraints and "
              f"--layerPrecisions; for TensorRT 11 rerun with --emit mixed):\n  {rep.trtexec}  # {TRT10_LABEL}")


def _whats_left(rep, args: argparse.Namespace) -> list[str]:
    from onnx_fp16_rewrite.fail_summary import whats_left

    return whats_left(rep, ran_auto=rep.auto is not None, rel_l2=args.rel_l2, emit=args.emit)


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


def _check_out_paths(args: argparse.Namespace, *paths: str | None) -> None:
    """Every file the run writes (-o, --report, --html, --save-inputs), checked before any work:
    never a file the run reads (the model, its external data, --inputs), never each other, not a
    folder, in a writable folder (io.paths.plan_outputs). They are written together at the end."""
    from onnx_fp16_rewrite.io.paths import plan_outputs

    outputs = {opt: getattr(args, dest, None) for opt, dest in (
        ("--output", "output"), ("--report", "report"), ("--html", "html"), ("--save-inputs", "save_inputs"))}
    outputs.update({str(p): p for p in paths if p is not None and p not in outputs.values()})
    plan = plan_outputs(inputs=[args.model, getattr(args, "inputs", None)], outputs=outputs)
    args.tx = plan.begin()


def _with_outputs(cmd, args: argparse.Namespace) -> int:
    """Run a command that writes files: its staged outputs land only if it returns (any exit
    code), and are removed on an error, Ctrl-C or SIGTERM (which ends the run like Ctrl-C)."""
    import signal
    import threading

    def terminated(signum, frame):
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminated) if main_thread else None
    try:
        code = cmd(args)
    except BaseException:
        if getattr(args, "tx", None) is not None:
            args.tx.discard()
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if getattr(args, "tx", None) is not None:
        args.tx.commit()
    return code


# --- TensorRT: check --backend trt, fix --verify trt, trtexec (onnx_fp16_rewrite.tensorrt.trt_backend, trt_pitfalls) ---


def _require_trt(wanted: bool):
    """The TensorRT library (TrtLibrary) when ``wanted`` (exit 5 before any work when it is missing), else None."""
    if not wanted:
        return None
    from onnx_fp16_rewrite.tensorrt.trt_backend import require_tensorrt

    return require_tensorrt()


def _print_pitfalls(model, trt_version, *, quiet: bool = False) -> list:
    """Pitfall warnings for the TensorRT library in use (TrtLibrary; None or TensorRT-RTX: all)."""
    from onnx_fp16_rewrite.tensorrt.trt_pitfalls import find_pitfalls

    pitfalls = find_pitfalls(model, trt_version=trt_version.parsed_version
                             if trt_version and not trt_version.is_rtx else None)
    if not quiet:
        for pitfall in pitfalls:
            print(f"warning: {pitfall.message}")
    return pitfalls


def _cmd_trtexec(args: argparse.Namespace) -> int:
    from onnx_fp16_rewrite.cli_inputs import parse_shape_specs
    from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
    from onnx_fp16_rewrite.emit.trtexec import dynamic_inputs, format_command, trtexec_command, validated_shapes
    from onnx_fp16_rewrite.io.model_io import load_model
    from onnx_fp16_rewrite.tensorrt.trt_backend import has_fp16_tensors, trtexec_mode

    model = load_model(args.model)
    mode, warnings = trtexec_mode(args.mode, has_fp16_tensors(model))
    shapes = parse_shape_specs(args.shape)
    dynamic = dynamic_inputs(model)
    unknown = sorted(set(shapes) - set(dynamic))
    if unknown:
        raise BadInputError(f"--shape {unknown[0]!r}: not a dynamic input of the model "
                            f"(dynamic: {', '.join(dynamic) or 'none'})")
    profiles = {**validated_shapes(model), **{k: (v, v, v) for k, v in shapes.items()}}  # fix stored what it validated
    profiles = {k: v for k, v in profiles.items() if k in dynamic}
    missing = [name for name in dynamic if name not in profiles]
    if missing:
        warnings.append(f"dynamic input(s) {', '.join(missing)} have no --shape: trtexec would build them with "
                        "every dynamic dim set to 1")
    argv = trtexec_command(args.model, PrecisionPlan.from_model(model), mode=mode, engine_path=args.engine,
                           shapes=profiles)
    # stdout stays the bare command (scripts run it); the TensorRT 10 label goes to stderr with the warnings.
    if mode == "weak":
        warnings.insert(0, f"{TRT10_LABEL}: weakly typed (--fp16, --precisionConstraints, --layerPrecisions were "
                           "removed in TensorRT 11); for TensorRT 11 build a mixed model (fix --emit mixed)")
    print(format_command(argv))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
