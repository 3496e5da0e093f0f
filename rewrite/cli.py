"""The ``onnx-rewrite`` command line: check, fix, passes, trtexec. The only module that prints."""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from onnx_fp16_rewrite.errors import BadInputError, RewriteError, one_line
from onnx_fp16_rewrite.fix import EXIT_BAD_INPUT, EXIT_FP16_FAILS, EXIT_OK

# CLI flag -> pass keyword argument, with how to parse it. A flag goes to every selected pass
# whose __init__ takes that keyword; a flag no selected pass takes is an error.
_PASS_FLAGS = {
    "match": ("--match", str, "regex on node / output names to pin (e.g. sca)"),
    "op_types": ("--op-types", lambda s: tuple(filter(None, s.split(","))), "op types to pin, comma-separated (default CumSum)"),
    "nodes": ("--nodes", lambda s: tuple(filter(None, s.split(","))), "node names to act on (protect-fp32: to pin), comma-separated"),
    "exit_absmax": ("--exit-absmax", float, "largest FP32 absmax a tensor may have to leave an FP32 region"),
    "window_form": ("--window-form", str, "box-filter: auto, blocked, prefix or pool"),
    "max_flop_ratio": ("--max-flop-ratio", float, "box-filter: skip sites whose rewrite costs more FLOPs than this ratio"),
    "target_absmax": ("--target-absmax", float, "rescale-accumulation / rescale-residual / fuse-normalization: largest value after rescaling"),
    "max_rel_l2": ("--max-rel-l2", float, "rescale-accumulation: largest FP16 error at the chain's exits to keep it"),
    "scan_form": ("--scan-form", str, "split-cumsum: blocked or matmul"),
    "block_size": ("--block-size", int, "split-cumsum: block length of the blocked scan"),
    "opset": ("--opset", int, "fuse-normalization: upgrade the model to this opset to fuse (only when given)"),
    "softmax": ("--softmax", str, "prescale-attention: fuse, max-subtract or keep decomposed softmaxes"),
    "margin": ("--margin", float, "clamp-fp16: clamp to +-(65504 - margin) (approximate)"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        self.exit(EXIT_BAD_INPUT, f"onnx-rewrite: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnx-rewrite", description="Make ONNX models safe for FP16 inference (TensorRT).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("passes", help="list the available passes")

    check = sub.add_parser("check", help="emulate FP16 on CPU and show where it breaks")
    _add_model_args(check)
    _add_check_args(check)

    fix = sub.add_parser("fix", help="rewrite, validate and FP16-check a model")
    _add_model_args(fix)
    fix.add_argument("-o", "--output", required=True, help="where to write the fixed model")
    fix.add_argument("--pass", dest="passes", help="passes to run, comma-separated (default protect-fp32, none with --auto)")
    fix.add_argument("--auto", action="store_true",
                     help="find the failure sites; try range-safe rewrites, pin minimal FP32 regions for the rest")
    for dest, (flag, conv, helptext) in _PASS_FLAGS.items():
        fix.add_argument(flag, dest=dest, type=conv, help=helptext)
    fix.add_argument("--emit", choices=["fp32", "mixed"], default="fp32",
                     help="fp32: FP32 model + trtexec --layerPrecisions; mixed: strongly typed FP16/FP32 model")
    fix.add_argument("--keep-io-types", action="store_true", help="with --emit mixed: keep FP32 inputs/outputs")
    fix.add_argument("--rtol", type=float, default=1e-5, help="FP32 validation rtol (default 1e-5)")
    fix.add_argument("--atol", type=float, default=1e-5, help="FP32 validation atol (default 1e-5)")
    fix.add_argument("--tolerance", action="append", default=[], metavar="OUTPUT:RTOL,ATOL",
                     help="per-output FP32 validation tolerance")
    _add_check_args(fix)
    _add_trt_args(sub, check, fix)
    return parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="input ONNX model")
    p.add_argument("--demo", help="use a built-in demo model instead (nafnet, residual-groupnorm, box-filter)")
    p.add_argument("--inputs", help="inputs: .npz, a folder of .npz, or Polygraphy JSON")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:1x3x512x512",
                   help="shape for generated inputs with dynamic dims")


def _add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict-cumsum", action="store_true",
                   help="FP16 CumSums accumulate in FP16 (TensorRT <= 10.7 loop form)")
    p.add_argument("--rel-l2", type=float, default=1e-2, help="FP16 check: max relative L2 error per output")
    p.add_argument("--report", help="write the report as JSON here")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "passes":
            return _cmd_passes()
        if args.command == "check":
            return _cmd_check(args)
        if args.command == "trtexec":
            return _cmd_trtexec(args)
        return _cmd_fix(args)
    except RewriteError as exc:
        print(f"onnx-rewrite: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnx-rewrite: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: one line, never a traceback (unless --verbose)
        if args.verbose:
            raise
        print(f"onnx-rewrite: internal error: {type(exc).__name__}: {one_line(exc)} (rerun with -v)", file=sys.stderr)
        return 1


def _cmd_passes() -> int:
    from onnx_fp16_rewrite.pipeline.registry import pass_classes

    for name, cls in pass_classes().items():
        params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.kind == p.KEYWORD_ONLY]
        opts = ", ".join(f"{p.name}={p.default!r}" for p in params)
        print(f"{name:<16} {cls.summary}")
        if opts:
            print(f"{'':<16} options: {opts}")
    return EXIT_OK


def _load(args: argparse.Namespace):
    from onnx_fp16_rewrite.io.inputs import generate_feeds, load_feeds, parse_shapes
    from onnx_fp16_rewrite.io.model_io import check_model, load_model

    if bool(args.model) == bool(args.demo):
        raise BadInputError("give either a MODEL path or --demo NAME")
    if args.demo:
        from onnx_fp16_rewrite.models import DEMO_MODELS

        if args.demo not in DEMO_MODELS:
            raise BadInputError(f"unknown demo {args.demo!r} (known: {', '.join(DEMO_MODELS)})")
        model = DEMO_MODELS[args.demo]()
    else:
        model = load_model(args.model)
        check_model(model, f"input model {args.model}")
    shapes = parse_shapes(args.shape)
    if args.inputs:
        if shapes:
            raise BadInputError("--shape is for generated inputs; it cannot be used with --inputs")
        feeds = load_feeds(args.inputs, model)
    else:
        feeds = generate_feeds(model, shapes)
    return model, feeds


def _cmd_check(args: argparse.Namespace) -> int:
    from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
    from onnx_fp16_rewrite.report.report import render_fp16, write_json

    _check_report_path(args.report, args.model)
    if args.backend == "trt" and args.strict_cumsum:
        raise BadInputError("--strict-cumsum applies to the emulation backend only")
    trt_version = _require_trt(args.backend == "trt")
    model, feeds = _load(args)
    if trt_version:
        from onnx_fp16_rewrite.tensorrt.trt_backend import check_trt

        report = check_trt(model, feeds, model_path=args.model, rel_l2_tolerance=args.rel_l2)
        print(render_fp16(report, f"TensorRT {trt_version}"))
    else:
        report = check_fp16(model, feeds, strict_cumsum=args.strict_cumsum, rel_l2_tolerance=args.rel_l2)
        print(render_fp16(report, "FP16 emulation"))
    pitfalls = _print_pitfalls(model, trt_version)
    if args.report:
        write_json({**asdict(report), "trt_pitfalls": [asdict(p) for p in pitfalls]}, args.report)
    return EXIT_OK if report.passed else EXIT_FP16_FAILS


def _cmd_fix(args: argparse.Namespace) -> int:
    from onnx_fp16_rewrite.fix import fix_model
    from onnx_fp16_rewrite.io.model_io import refuse_overwrite, save_model
    from onnx_fp16_rewrite.pipeline.registry import auto_rewrites, get_pass_class, parse_pipeline
    from onnx_fp16_rewrite.report.report import render_auto, render_fp16, render_passes, write_json
    from onnx_fp16_rewrite.pipeline.validate import Tolerance

    names = parse_pipeline(args.passes if args.passes is not None else ("" if args.auto else "protect-fp32"))
    if not names and not args.auto:
        raise BadInputError("--pass needs at least one pass name")
    out = Path(args.output)
    refuse_overwrite(out, args.model)
    if not out.parent.exists():
        raise BadInputError(f"output folder does not exist: {out.parent}")
    _check_report_path(args.report, args.model)
    if args.keep_io_types and args.emit != "mixed":
        raise BadInputError("--keep-io-types only applies to --emit mixed")
    _require_trt(args.verify == "trt")  # fail before any work
    passes = _make_passes(names, args, get_pass_class)
    per_output = _parse_tolerances(args.tolerance)
    model, feeds = _load(args)
    result = fix_model(
        model, passes, feeds, emit=args.emit, keep_io_types=args.keep_io_types,
        strict_cumsum=args.strict_cumsum, tolerance=Tolerance(args.rtol, args.atol),
        per_output=per_output, rel_l2_tolerance=args.rel_l2, model_path=str(out), verify=args.verify,
        auto=args.auto, auto_rewrites=auto_rewrites() if args.auto else (),
        progress=_progress("profiling ranges") if sys.stderr.isatty() else None,
    )
    rep = result.report
    print(render_fp16(rep.fp16_before, "before: FP16 emulation"))
    print(render_passes(rep.passes))
    for e in rep.mixed_ort_error:
        print(f"mixed model in ORT vs FP32 reference: {e.output}: max abs {e.max_abs_error:.3g}, rel L2 {e.rel_l2:.3g} (FP16 weights)")
    if rep.auto is not None:
        print(render_auto(rep.auto))
    if rep.fp16_flop_fraction is not None:
        print(f"FP16 FLOP fraction: {rep.fp16_flop_fraction:.1%} of estimated FLOPs still run in FP16")
    print(render_fp16(rep.fp16_after, f"after ({args.emit}): FP16 emulation"))
    if rep.trt_after is not None:
        print(render_fp16(rep.trt_after, f"after ({args.emit}): TensorRT"))
    save_model(result.model, out, input_path=args.model)
    print(f"wrote {out}")
    print(f"build it with:\n  {rep.trtexec}")
    for warning in rep.warnings:
        print(f"warning: {warning}")
    if args.report:
        write_json(rep.to_dict(), args.report)
    return rep.exit_code


def _progress(label: str):
    """A one-line progress counter on a terminal's stderr (profiling many samples takes a while)."""
    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r{label}: {done}/{total} runs", end=end, file=sys.stderr, flush=True)

    return show


def _make_passes(names, args, get_pass_class):
    given = {kw: getattr(args, kw) for kw in _PASS_FLAGS if getattr(args, kw) is not None}
    used: set[str] = set()
    passes = []
    for name in names:
        cls = get_pass_class(name)
        accepted = set(inspect.signature(cls.__init__).parameters)
        kwargs = {k: v for k, v in given.items() if k in accepted}
        used |= set(kwargs)
        passes.append(cls(**kwargs))
    unused = set(given) - used
    if unused:
        flags = ", ".join(_PASS_FLAGS[k][0] for k in sorted(unused))
        raise BadInputError(f"{flags} not used by the selected passes ({', '.join(names)})")
    return passes


def _parse_tolerances(specs: list[str]):
    from onnx_fp16_rewrite.pipeline.validate import Tolerance

    result = {}
    for spec in specs:
        name, _, tols = spec.rpartition(":")
        try:
            rtol, atol = (float(x) for x in tols.split(","))
        except ValueError:
            raise BadInputError(f"bad --tolerance {spec!r}: expected OUTPUT:RTOL,ATOL") from None
        result[name] = Tolerance(rtol, atol)
    return result


def _check_report_path(report: str | None, model: str | None) -> None:
    if report is None:
        return
    from onnx_fp16_rewrite.io.model_io import refuse_overwrite

    refuse_overwrite(report, model)
    if not Path(report).parent.exists():
        raise BadInputError(f"report folder does not exist: {Path(report).parent}")


# --- TensorRT: check --backend trt, fix --verify trt, trtexec (onnx_fp16_rewrite.tensorrt.trt_backend, onnx_fp16_rewrite.tensorrt.trt_pitfalls) ---


def _add_trt_args(sub, check: argparse.ArgumentParser, fix: argparse.ArgumentParser) -> None:
    check.add_argument("--backend", choices=["emulation", "trt"], default="emulation",
                       help="emulation: FP16 on the CPU (default); trt: build and run a TensorRT engine (GPU)")
    fix.add_argument("--verify", choices=["emulation", "trt"], default="emulation",
                     help="trt: also build and run the fixed model with TensorRT (GPU)")
    cmd = sub.add_parser("trtexec", help="print the trtexec command that builds a (fixed) model")
    cmd.add_argument("model", help="ONNX model (its precision plan is read from the model)")
    cmd.add_argument("--mode", choices=["weak", "strong", "auto"], default="auto",
                     help="weak: --fp16 + --layerPrecisions; strong: --stronglyTyped; auto: strong for FLOAT16 models")
    cmd.add_argument("--engine", help="add --saveEngine=PATH")


def _require_trt(wanted: bool) -> str | None:
    """TensorRT's version when ``wanted`` (exit 5 before any work when it is missing), else None."""
    if not wanted:
        return None
    from onnx_fp16_rewrite.tensorrt.trt_backend import require_tensorrt

    return require_tensorrt()


def _print_pitfalls(model, trt_version: str | None) -> list:
    from onnx_fp16_rewrite.tensorrt.trt_backend import parse_trt_version
    from onnx_fp16_rewrite.tensorrt.trt_pitfalls import find_pitfalls

    pitfalls = find_pitfalls(model, trt_version=parse_trt_version(trt_version) if trt_version else None)
    for pitfall in pitfalls:
        print(f"warning: {pitfall.message}")
    return pitfalls


def _cmd_trtexec(args: argparse.Namespace) -> int:
    from onnx_fp16_rewrite.io.model_io import load_model
    from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
    from onnx_fp16_rewrite.tensorrt.trt_backend import has_fp16_tensors, trtexec_mode
    from onnx_fp16_rewrite.emit.trtexec import format_command, trtexec_command

    model = load_model(args.model)
    mode, warnings = trtexec_mode(args.mode, has_fp16_tensors(model))
    argv = trtexec_command(args.model, PrecisionPlan.from_model(model), mode=mode, engine_path=args.engine)
    print(format_command(argv))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
