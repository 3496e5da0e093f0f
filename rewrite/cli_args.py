"""The ``onnx-rewrite`` argument parser: subcommands, their flags, and the aliases users bring from
Polygraphy (``--load-inputs``, ``--input-shapes x:[1,3,64,64]``, ``--seed``, ``--val-range``,
``--save-inputs``) and trtexec (``--shapes=x:1x3x64x64,y:...``).

Only the parser lives here; ``cli.py`` dispatches the commands (``cli_check``, ``cli_fix``) and
``cli_passes.py`` turns pass flags into pass objects.
"""

from __future__ import annotations

import argparse

from onnx_fp16_rewrite import __version__
from onnx_fp16_rewrite.cli_validate import nonnegative_float, positive_float
from onnx_fp16_rewrite.fix import EXIT_BAD_INPUT

# Short pass flags kept from earlier releases: flag -> (option keyword, argparse type, help). Each
# is an alias of ``--pass-option PASS.OPTION=VALUE`` for the one pass that takes the option; the
# two that several passes take (--nodes, --target-absmax) must name their pass when more than one
# of those runs (cli_passes says so). Every other option is set with --pass-option.
def _names(text: str) -> tuple[str, ...]:
    return tuple(filter(None, (s.strip() for s in text.split(","))))


SHORT_PASS_FLAGS = {
    "--match": ("match", str, "protect-fp32: regex on node / output names to pin (e.g. sca)"),
    "--op-types": ("op_types", _names, "protect-fp32: op types to pin, comma-separated (default CumSum)"),
    "--nodes": ("nodes", _names, "node names to act on (the one selected pass that takes nodes), comma-separated"),
    "--exit-absmax": ("exit_absmax", float, "protect-fp32: largest FP32 absmax a tensor may have to leave an FP32 region"),
    "--window-form": ("window_form", str, "box-filter: auto, blocked, prefix or pool"),
    "--max-flop-ratio": ("max_flop_ratio", float, "box-filter: skip sites whose rewrite costs more FLOPs than this ratio"),
    "--target-absmax": ("target_absmax", float, "the one selected pass that takes target_absmax: largest value after rescaling"),
    "--max-rel-l2": ("max_rel_l2", float, "rescale-accumulation: largest FP16 error at the chain's exits to keep it"),
    "--scan-form": ("scan_form", str, "split-cumsum: blocked or matmul"),
    "--block-size": ("block_size", int, "split-cumsum: block length of the blocked scan"),
    "--opset": ("opset", int, "fuse-normalization: upgrade the model to this opset to fuse (only when given)"),
    "--softmax": ("softmax", str, "prescale-attention: fuse, max-subtract or keep decomposed softmaxes"),
    "--margin": ("margin", float, "clamp-fp16: clamp to +-(65504 - margin) (approximate)"),
}


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--seed` must never be read as `--seed-ops` or the reverse
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        self.exit(EXIT_BAD_INPUT, f"onnx-rewrite: error: {message}\n")


def _add_verbosity(p: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    # In a subcommand the default is SUPPRESS: argparse would otherwise reset a -v given before the
    # subcommand to the subparser's default.
    default = argparse.SUPPRESS if in_subcommand else False
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="log what each stage does")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="print only errors and the final verdict lines (no progress)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnx-rewrite", description="Make ONNX models safe for FP16 inference (TensorRT).")
    parser.add_argument("--version", action="version", version=f"onnx-rewrite {__version__}")
    _add_verbosity(parser, in_subcommand=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    passes = sub.add_parser("passes", help="list the available passes and how to set each option")
    _add_verbosity(passes, in_subcommand=True)

    check = sub.add_parser("check", help="emulate FP16 on CPU and show where it breaks")
    _add_model_args(check)
    _add_check_args(check)
    check.add_argument("--backend", choices=["emulation", "trt"], default="emulation",
                       help="emulation: FP16 on the CPU (default); trt: build and run a TensorRT engine (GPU)")

    fix = sub.add_parser("fix", help="find and fix FP16 failures (automatic unless --pass is given), validate, emit")
    _add_model_args(fix)
    fix.add_argument("-o", "--output", required=True, help="where to write the fixed model")
    fix.add_argument("--pass", dest="passes",
                     help="run these passes, comma-separated, instead of the automatic fix (add --auto for both)")
    fix.add_argument("--auto", action="store_true",
                     help="the automatic fix (the default without --pass): find the failure sites, try range-safe "
                          "rewrites, pin minimal FP32 regions for the rest")
    fix.add_argument("--pass-option", action="append", default=[], metavar="PASS.OPTION=VALUE",
                     help="set one option of one pass, e.g. rescale-accumulation.target_absmax=4096 "
                          "(`onnx-rewrite passes` lists them); applies to --pass passes and to the automatic fix's rewrites")
    short = fix.add_argument_group("short pass flags (each an alias of --pass-option for the one pass that takes it)")
    for flag, (dest, conv, helptext) in SHORT_PASS_FLAGS.items():
        short.add_argument(flag, dest=f"short_{dest}", metavar=dest.upper(), type=conv, help=helptext)
    fix.add_argument("--emit", choices=["mixed", "fp32"], default="mixed",
                     help="mixed (default): strongly typed FP16/FP32 model for trtexec --stronglyTyped (TensorRT 10 "
                          "and 11); fp32: FP32 model + --fp16 --layerPrecisions (TensorRT 10 only)")
    fix.add_argument("--keep-io-types", action="store_true", help="with --emit mixed: keep FP32 inputs/outputs")
    fix.add_argument("--rtol", type=nonnegative_float, default=1e-5, help="FP32 validation rtol (default 1e-5)")
    fix.add_argument("--atol", type=nonnegative_float, default=1e-5, help="FP32 validation atol (default 1e-5)")
    fix.add_argument("--tolerance", action="append", default=[], metavar="OUTPUT:RTOL,ATOL",
                     help="per-output FP32 validation tolerance")
    _add_check_args(fix)
    fix.add_argument("--verify", choices=["emulation", "trt"], default="emulation",
                     help="trt: also build and run the fixed model with TensorRT (GPU)")

    diff = sub.add_parser("diff", help="nodes added, removed, retyped or pinned between a model and its fixed version")
    _add_verbosity(diff, in_subcommand=True)
    diff.add_argument("original", help="the model before the fix")
    diff.add_argument("fixed", help="the model onnx-rewrite fix wrote")
    diff.add_argument("--json", dest="diff_json", metavar="PATH", help="also write the diff as JSON here")

    cmd = sub.add_parser("trtexec", help="print the trtexec command that builds a (fixed) model")
    _add_verbosity(cmd, in_subcommand=True)
    cmd.add_argument("model", help="ONNX model (its precision plan is read from the model)")
    cmd.add_argument("--mode", choices=["weak", "strong", "auto"], default="auto",
                     help="weak: --fp16 + --layerPrecisions (TensorRT 10 only); strong: --stronglyTyped; "
                          "auto: strong for FLOAT16 models")
    cmd.add_argument("--engine", help="add --saveEngine=PATH")
    _add_shape_arg(cmd, "shapes of the dynamic inputs, written as trtexec --shapes")
    return parser


def _add_shape_arg(p: argparse.ArgumentParser, helptext: str) -> None:
    p.add_argument("--shape", "--shapes", "--input-shapes", dest="shape", nargs="+", action="extend", default=[],
                   metavar="NAME:SHAPE", help=f"{helptext}: x:1x3x512x512 (trtexec), x:[1,3,512,512] (Polygraphy); "
                                              "several inputs space- or comma-separated")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    _add_verbosity(p, in_subcommand=True)
    p.add_argument("model", nargs="?", help="input ONNX model")
    p.add_argument("--demo", help="use a built-in demo model instead (nafnet, residual-groupnorm, box-filter)")
    p.add_argument("--inputs", "--load-inputs", "--load-input-data", dest="inputs", nargs="+", action="extend",
                   default=[], metavar="PATH",
                   help="inputs: .npz, a folder of .npz, or Polygraphy JSON (--save-inputs); several are chained")
    _add_shape_arg(p, "shapes for generated inputs with dynamic dims")
    p.add_argument("--seed", type=int, default=None, help="seed for generated inputs (default 0)")
    p.add_argument("--val-range", nargs="+", action="extend", default=[], metavar="[NAME:][MIN,MAX]",
                   help="range of generated values, Polygraphy syntax: [0,1] for all inputs, x:[-1,1] for one")
    p.add_argument("--save-inputs", metavar="PATH",
                   help="write the inputs used (generated or loaded) as Polygraphy JSON (polygraphy run --load-inputs)")


def _add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict-cumsum", action="store_true",
                   help="FP16 CumSums accumulate in FP16 (TensorRT <= 10.7 loop form)")
    p.add_argument("--rel-l2", type=positive_float, default=1e-2, help="FP16 check: max relative L2 error per output")
    p.add_argument("--report", help="write the report as JSON here (schema: onnx_fp16_rewrite/report/report_schema.json)")
    p.add_argument("--html", metavar="REPORT.html",
                   help="write a self-contained HTML report with per-layer range/error plots (needs matplotlib: "
                        "the [report] extra; costs 1-3 extra model runs per sample)")


def fix_positionals(args: argparse.Namespace) -> None:
    """``check --shapes x:[1,2] model.onnx`` (Polygraphy's order): the list flags take several
    values, so argparse hands them the model path; give it back to ``model``."""
    if getattr(args, "model", "absent") is not None:
        return
    for dest in ("shape", "inputs", "val_range"):
        values = getattr(args, dest, None)
        if values and values[-1].endswith(".onnx"):
            args.model = values.pop()
            return
