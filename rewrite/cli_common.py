"""What the ``onnx-rewrite`` commands share: loading the model and its inputs, the output files
checked before any work, the report blocks, and TensorRT's presence and pitfalls."""

from __future__ import annotations

import argparse

from onnx_fp16_rewrite.errors import BadInputError

TRT10_LABEL = "TensorRT 10 only"


def load(args: argparse.Namespace, *, preflight_now: bool = True):
    """The model, its feeds, and its FP32 outputs on the first feed from the preflight run (a
    ``BackgroundPreflight``, still running; ``preflight_now=False``, or a demo: none, and the
    caller runs ``ort_runner.preflight`` when its work fails)."""
    from onnx_fp16_rewrite.cli_inputs import save_inputs
    from onnx_fp16_rewrite.cli_validate import check_feeds
    from onnx_fp16_rewrite.io.model_io import check_input_model, load_model
    from onnx_fp16_rewrite.io.background_preflight import BackgroundPreflight

    if bool(args.model) == bool(args.demo):
        raise BadInputError("give either a MODEL path or --demo NAME")
    session = None  # the input model's ORT session, from its load check to its preflight run
    known = []
    if args.demo:
        from onnx_fp16_rewrite.models import DEMO_MODELS

        if args.demo not in DEMO_MODELS:
            raise BadInputError(f"unknown demo {args.demo!r} (known: {', '.join(DEMO_MODELS)})")
        model = DEMO_MODELS[args.demo]()
    else:
        # Checker, I/O, opsets, domains, ORT loads it; its float weights shared from here on (release_model frees them).
        model, session = check_input_model(load_model(args.model), f"input model {args.model}")
    try:
        feeds = _feeds(args, model)
        source = " ".join(map(str, args.inputs)) if args.inputs else "generated inputs"
        check_feeds(feeds, source)  # finite, non-empty (cli_validate)
        # ORT's refusals are the input's (exit 2); its outputs are the FP32 reference on that feed. It runs
        # beside the caller's Python work (canonicalisation): the caller calls ``raise_failure`` on any error
        # (the preflight's failure wins) and ``wait`` before releasing the model (io.background_preflight).
        known = (BackgroundPreflight(model, feeds[0], f"input model {args.model}", session)
                 if preflight_now and not args.demo else [])
        del session
        if args.save_inputs:  # staged: lands with the other outputs when the run succeeds (io.paths)
            if getattr(args, "tx", None):
                args.tx.write_with("--save-inputs", lambda path: save_inputs(feeds, path))
            else:
                save_inputs(feeds, args.save_inputs)
    except BaseException:  # refused inputs (exit 2) or an interrupt: the caller never gets the model to release
        session = None  # ORT reads the shared buffers: the session goes before they are freed
        try:
            if known:
                known.raise_failure()  # the preflight's refusal, when it has one, is the error to report
        finally:
            release_model(model)
        raise
    return model, feeds, known


def _feeds(args: argparse.Namespace, model):
    """The feeds the arguments ask for; inputs too large for memory are the input's fault (exit 2)."""
    from onnx_fp16_rewrite.cli_inputs import feeds_from_args

    try:
        return feeds_from_args(args, model)
    except MemoryError:
        shapes = " ".join(args.shape) or "the model's own shapes"
        raise BadInputError(f"--shape: inputs of these shapes ({shapes}) do not fit in memory") from None


def release_model(model) -> None:
    """Free the weights ``load`` shared for ``model`` (main() may run again in-process)."""
    from onnx_fp16_rewrite.io import weights

    weights.release(model, None)


def say(args: argparse.Namespace, text: str) -> None:
    """Print a report block; with -q only its first line (the verdict)."""
    print(text.split("\n", 1)[0] if args.quiet else text)


def require_plot(args: argparse.Namespace) -> None:
    if args.html:
        from onnx_fp16_rewrite.report.plots import require_matplotlib

        require_matplotlib()  # one line, exit 2, before any work


def write_reports(args: argparse.Namespace, texts) -> None:
    for option, path, text in (("--report", args.report, texts.json), ("--html", args.html, texts.html)):
        if path and text is not None:
            args.tx.write_text(option, text)
            if not args.quiet:
                print(f"wrote {path}")


def check_out_paths(args: argparse.Namespace, *paths: str | None) -> None:
    """Every file the run writes (-o, --report, --html, --save-inputs), checked before any work:
    never a file the run reads (the model, its external data, --inputs), never each other, not a
    folder, in a writable folder (io.paths.plan_outputs). They are written together at the end."""
    from onnx_fp16_rewrite.io.paths import plan_outputs

    outputs = {opt: getattr(args, dest, None) for opt, dest in (
        ("--output", "output"), ("--report", "report"), ("--html", "html"), ("--save-inputs", "save_inputs"))}
    outputs.update({str(p): p for p in paths if p is not None and p not in outputs.values()})
    plan = plan_outputs(inputs=[args.model, getattr(args, "inputs", None)], outputs=outputs)
    args.tx = plan.begin()


def require_trt(wanted: bool):
    """The TensorRT library (TrtLibrary) when ``wanted`` (exit 5 before any work when it is missing), else None."""
    if not wanted:
        return None
    from onnx_fp16_rewrite.tensorrt.trt_backend import require_tensorrt

    return require_tensorrt()


def print_pitfalls(model, trt_version, *, quiet: bool = False) -> list:
    """Pitfall warnings for the TensorRT library in use (TrtLibrary; None or TensorRT-RTX: all)."""
    from onnx_fp16_rewrite.tensorrt.trt_pitfalls import find_pitfalls

    pitfalls = find_pitfalls(model, trt_version=trt_version.parsed_version
                             if trt_version and not trt_version.is_rtx else None)
    if not quiet:
        for pitfall in pitfalls:
            print(f"warning: {pitfall.message}")
    return pitfalls


__all__ = ["TRT10_LABEL", "check_out_paths", "load", "print_pitfalls", "require_plot", "require_trt", "say",
           "write_reports"]
