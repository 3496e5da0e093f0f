"""The ``onnx-rewrite`` command line: check, fix, passes, diff, trtexec. The only modules that print
are this one and the commands' own (``cli_check``, ``cli_fix``; what they share: ``cli_common``).

The parser is ``cli_args``; pass flags are ``cli_passes``; input flags are ``cli_inputs``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from onnx_fp16_rewrite import cli_common
from onnx_fp16_rewrite.cli_args import build_parser, fix_positionals
from onnx_fp16_rewrite.cli_check import cmd_check
from onnx_fp16_rewrite.cli_fix import cmd_fix
from onnx_fp16_rewrite.errors import BadInputError, RewriteError, one_line
from onnx_fp16_rewrite.fix import EXIT_OK

__all__ = ["build_parser", "main"]


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
                return _with_outputs(cmd_check, args)
            if args.command == "trtexec":
                return _cmd_trtexec(args)
            if args.command == "diff":
                return _cmd_diff(args)
            return _with_outputs(cmd_fix, args)
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
        warnings.insert(0, f"{cli_common.TRT10_LABEL}: weakly typed (--fp16, --precisionConstraints, --layerPrecisions were "
                           "removed in TensorRT 11); for TensorRT 11 build a mixed model (fix --emit mixed)")
    print(format_command(argv))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
