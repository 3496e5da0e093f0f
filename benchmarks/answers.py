"""Same answers before and after a change: ``fix --auto`` on the test suite's models, recorded and compared.

Speed must not buy a different answer (issue 11). For every case -- the models the tests build with our own
builders, plus corpus models exported by torch's TorchScript and dynamo exporters (``models.exported``) and the
meaning-level rewrites' small exports (``tests/meaning_exports.py``) -- and
each of pin-only (no rewrites) / the registry's rewrites x ``--emit fp32`` / ``mixed``, this records:
``before`` / ``after`` / ``auto`` (the FP16 verdicts before the fix, after it, and the automatic search's),
``exit`` (the CLI's exit code), ``flop`` (FP16 FLOP fraction), ``pinned`` (the nodes the emitted precision plan
keeps FP32), ``kept`` (rewrites kept) and ``sites`` ((kind, op, tensor, fix) per site), plus ``after_rel`` (each
output's relative L2 error after the fix: numerics, reported but not an answer) and ``proved`` (the mixed model's
verification proved from the search's final run, not run: emulation.same_values; not an answer either).

The models are always built by this checkout's code (so both sides see the same graphs); the fixes run in a
child process, against ``--pythonpath DIR`` when given: DIR holds an ``onnx_fp16_rewrite`` folder laid out as
installed (rewrite/ with passes/ and models/ inside), e.g. a copy of the package before the change.

Run by hand (from the repository root, in the venv; all cases take ~5 min on 2 cores):
    python benchmarks/answers.py before.json --pythonpath /tmp/pkg_before
    python benchmarks/answers.py after.json
    python benchmarks/answers.py --compare before.json after.json
``--cases a,b`` runs only those (``--list`` names them). ``--compare`` prints every difference, key by key,
and exits 1 when an answer (anything but ``after_rel`` and ``proved``) differs or a key is missing from one side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

# Corpus exports in the answers: integral images, residual streams, attention logits, symbolic dims, a control.
EXPORTED = ("guided-filter", "nafnet-local-pool", "nafnet-local-unet", "t5-encoder", "gpt2-eager", "vae-decoder", "t5-encoder-dynamic", "bert")
EXPORTERS = ("torchscript", "dynamo")
ANSWERS = ("before", "after", "auto", "exit", "flop", "kept", "pinned", "sites")
# Recorded, not answers: each output's rel L2 after the fix (numerics), and whether the verification
# of a mixed model was proved from the search's run instead of run (emulation.same_values).
INFO = ("after_rel", "proved")


def _own(module: str, builder: str):
    def make():
        import importlib

        m = importlib.import_module(f"onnx_fp16_rewrite.models.{module}")
        model = getattr(m, builder)()
        return model, [m.demo_inputs(model)]

    return make


def _demo(name: str):
    def make():
        from onnx_fp16_rewrite.models import DEMO_MODELS
        from onnx_fp16_rewrite.models.nafnet import demo_inputs

        model = DEMO_MODELS[name]()
        return model, [demo_inputs(model)]

    return make


def _pattern(builder: str, **kwargs):
    def make():
        from onnx_fp16_rewrite.models import failure_patterns

        return getattr(failure_patterns, builder)(**kwargs)

    return make


def _exported(name: str, exporter: str):
    def make():
        from onnx_fp16_rewrite.models import exported

        model = exported.build(name, exporter)
        return model, exported.feeds(name, model)

    return make


# The meaning-level rewrites' torch exports (tests/meaning_exports.py: shape-computed scales, F.pad, no-op Casts,
# unfused BatchNorm, a window sum by integral image), each from both exporters.
MEANING = ("linear_attention", "log_mel", "conv_bn", "computed_scale_attention", "masked_attention", "box_filter")


def _meaning(name: str, dynamo: bool):
    def make():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import meaning_exports

        return meaning_exports.build(name, dynamo=dynamo), meaning_exports.feeds(name)

    return make


CASES = {
    "integral-1024": _pattern("build_integral_mean", size=1024),
    "integral-224": _pattern("build_integral_mean", size=224),
    "rmsnorm-pow": _pattern("build_rmsnorm_pow"),
    "attention-logits": _pattern("build_attention_logits"),
    "causal-linear-attention": _pattern("build_causal_linear_attention"),
    "residual-groupnorm": _demo("residual-groupnorm"),
    "box-filter": _demo("box-filter"),
    "nafnet": _demo("nafnet"),
    "gpt2": _own("gpt2_attention", "build_gpt2_attention"),
    "vae": _own("sd_vae_decoder", "build_sd_vae_decoder"),
    "t5": _own("t5_encoder", "build_t5_encoder"),
    **{f"{name}@{exporter}": _exported(name, exporter) for name in EXPORTED for exporter in EXPORTERS},
    **{f"meaning-{name}@{exporter}": _meaning(name, exporter == "dynamo") for name in MEANING
       for exporter in EXPORTERS},
}


def worker(folder: Path, out: Path) -> None:
    """Runs every fix on the saved cases (in the child process: imports whichever package PYTHONPATH gives)."""
    from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
    from onnx_fp16_rewrite.fix import fix_model
    from onnx_fp16_rewrite.pipeline.registry import auto_rewrites

    result = {}
    for name in json.loads((folder / "cases.json").read_text()):
        model = onnx.load(str(folder / f"{name}.onnx"))
        with np.load(folder / f"{name}.npz") as data:
            n = 1 + max(int(k.split("/", 1)[0]) for k in data.files)
            feeds = [{k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")} for i in range(n)]
        for rw in ("pin", "rewrites"):
            for emit in ("fp32", "mixed"):
                key = f"{name}/{rw}/{emit}"
                try:
                    r = fix_model(model, [], feeds, auto=True, emit=emit,
                                  auto_rewrites=auto_rewrites() if rw == "rewrites" else ())
                except Exception as e:  # an answer too: the error is compared like the rest
                    msg = f"{type(e).__name__}: {e}"  # ORT puts the reason last, after a long C++ signature
                    result[key] = {"error": msg if len(msg) <= 400 else f"{msg[:120]} ... {msg[-260:]}"}
                    print(key, "ERROR", result[key]["error"], file=sys.stderr, flush=True)
                    continue
                rep = r.report
                plan = PrecisionPlan.from_model(r.model)
                result[key] = {"before": rep.fp16_before.passed, "after": rep.fp16_after.passed,
                               "auto": rep.auto.passed, "exit": rep.exit_code, "flop": rep.fp16_flop_fraction,
                               "kept": rep.auto.passes_kept, "pinned": sorted(plan.fp32_nodes),
                               "sites": [(s.kind, s.op, s.tensor, s.fix) for s in rep.auto.sites],
                               "after_rel": [o.rel_l2 for o in rep.fp16_after.outputs],
                               "proved": any(n.startswith("not run again") for n in rep.fp16_after.notes)}
                print(key, result[key]["flop"], len(result[key]["pinned"]), file=sys.stderr, flush=True)
    out.write_text(json.dumps(result, indent=1))


def record(out: Path, names: list[str], pythonpath: str | None) -> int:
    with tempfile.TemporaryDirectory(prefix="answers-") as tmp:
        folder = Path(tmp)
        for name in names:
            model, feeds = CASES[name]()
            onnx.save_model(model, str(folder / f"{name}.onnx"))
            np.savez(folder / f"{name}.npz", **{f"{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})
        (folder / "cases.json").write_text(json.dumps(names))
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
        part = folder / "answers.json"
        rc = subprocess.run([sys.executable, __file__, "--worker", str(folder), str(part)], env=env,
                            cwd=tempfile.gettempdir()).returncode
        if rc:
            print(f"worker failed (exit {rc})", file=sys.stderr)
            return 1
        tmp_out = out.with_name(out.name + ".tmp")
        tmp_out.write_text(part.read_text())
        os.replace(tmp_out, out)
    return 0


def _differences(key: str, a: dict, b: dict) -> tuple[list[str], bool]:
    """Lines describing how ``b`` differs from ``a``, and whether an answer (not only numerics) differs."""
    if ("error" in a) != ("error" in b):  # one side failed: its error is the difference
        return [f"{key}: {a.get('error', 'answered')} -> {b.get('error', 'answered')}"], True
    order = [*ANSWERS, *INFO]
    lines, answer = [], False
    for field in sorted(set(a) | set(b), key=lambda f: order.index(f) if f in order else len(order)):
        x, y = a.get(field), b.get(field)
        if x == y:
            continue
        answer |= field not in INFO
        if field in ("pinned", "kept", "sites") and isinstance(x, list) and isinstance(y, list):
            xs, ys = {json.dumps(v) for v in x}, {json.dumps(v) for v in y}
            gone, new = sorted(xs - ys), sorted(ys - xs)
            lines.append(f"{key}: {field} {len(x)} -> {len(y)}" + ("" if gone or new else " (order only)"))
            lines += [f"    - {v}" for v in gone] + [f"    + {v}" for v in new]
        elif isinstance(x, float) and isinstance(y, float):
            lines.append(f"{key}: {field} {x!r} -> {y!r} ({y - x:+.3g})")
        else:
            lines.append(f"{key}: {field} {x!r} -> {y!r}" + (f"  ({field}: not an answer)" if field in INFO else ""))
    return lines, answer


def compare(path_a: Path, path_b: Path) -> int:
    a, b = json.loads(path_a.read_text()), json.loads(path_b.read_text())
    only = answers = numerics = 0
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            print(f"{key}: only in {path_a if key in a else path_b}")
            only += 1
            continue
        lines, answer = _differences(key, a[key], b[key])
        if lines:
            print("\n".join(lines))
        answers += answer
        numerics += bool(lines) and not answer
    common = len(set(a) & set(b))
    print(f"{common} keys in both: {answers} with a different answer, {numerics} with different numerics only, "
          f"{common - answers - numerics} identical; {only} in one file only")
    return 1 if answers or only else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="JSON file to write the answers to")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--pythonpath", default=None)
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"))
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]))
        return 0
    if args.list:
        print("\n".join(CASES))
        return 0
    if args.compare:
        return compare(Path(args.compare[0]), Path(args.compare[1]))
    if not args.out:
        parser.error("give an output file, --compare A B or --list")
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown} (known: {', '.join(CASES)})")
    return record(Path(args.out), names, args.pythonpath)


if __name__ == "__main__":
    sys.exit(main())
