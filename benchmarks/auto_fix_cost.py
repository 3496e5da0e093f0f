"""Cost of ``check`` and ``fix`` (automatic) as ratios to one plain ONNX Runtime inference.

The baseline is what a user pays for one inference: in a fresh process, an ORT session with
default optimisations plus one run (``plain``). Every job runs in its own fresh process (so peak
RSS is that job's alone) on the same model file and feeds, and the baseline is measured in the
same benchmark run, before and after the model's jobs (the ratio uses their median): the machine
is shared and noisy, so only ratios measured side by side mean anything. Imports and building
the model are outside every timing, tool and baseline alike.

Jobs: ``check`` (``check_fp16``), ``fix-fp32`` / ``fix-mixed`` (``fix_model(auto=True)`` with
the registry's rewrites, ``--emit fp32`` / ``mixed``); ``cli-check`` / ``cli-fix`` (``onnx-rewrite check`` /
``fix --auto`` on the first sample as ``--inputs``: loading, input checks, the preflight run and
canonicalisation included, as a user runs them; ``--jobs check,cli-check,...`` to add them). ``--samples 1,4,16`` repeats ``fix-mixed``
with that many calibration samples on ``--samples-model``.

Run by hand (from the repository root, in the venv):
    python benchmarks/auto_fix_cost.py [--models nafnet9,vae,t5,t5-torchscript] [--samples 1,4,16] [--json out.json]
Models (one plain inference on 2 cores): ``nafnet9`` (NAFNet-Local 512^2, ~1 s), ``vae`` (diffusers AutoencoderKL
decoder, latent 32 -> 256^2, TorchScript export, 1-1.5 s), ``t5`` (our T5 v1.1-style builder, seq 256),
``t5-torchscript`` (transformers T5EncoderModel, t5-small-like, seq 256, TorchScript export, ~1 s); the earlier
``vae-small`` (our builder, 0.1 s) and ``t5-torchscript-small`` (the corpus' tiny T5, 0.02 s) stay for comparison;
``t5-base-torchscript`` (t5-base's encoder, 420 MB), ``sd-vae-torchscript`` (Stable Diffusion's VAE decoder widths at
256x256, ~3 s) and ``nafnet-torchscript`` (megvii's NAFNetLocal UNet, GoPro config, 512x512, ~2 s) are real sizes,
given by name.
Each prints its nodes, weight MB, plain-inference seconds and whether ``check`` fails before any fix.
``--versions before=DIR,after=.`` measures several copies side by side, job by job interleaved, and
``--repeat N`` runs each job N times and reports medians (this machine's noise is +-15 % a run).
``--pythonpath DIR`` runs the jobs against another copy of the package (the "before" numbers):
DIR holds an ``onnx_fp16_rewrite`` folder laid out as installed (rewrite/ with passes/ and models/ inside).
The models are always built by this checkout's code (both sides see the same files); only the jobs use DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

_JOB = r"""
import json, resource, sys, time
import numpy as np, onnx
job, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = onnx.load(path + "/model.onnx")
data = np.load(path + "/feeds.npz")
feeds = [{k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")} for i in range(n)]
import onnxruntime as ort
if job.startswith("cli-"):
    from onnx_fp16_rewrite.cli import main
elif job != "plain":
    from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
    from onnx_fp16_rewrite.fix import fix_model
    from onnx_fp16_rewrite.pipeline.registry import auto_rewrites
def hwm():  # this process's peak RSS in KiB (ru_maxrss would carry the parent's over fork+exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
base = hwm()
start = time.perf_counter()
extra = {}
if job == "plain":
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session.run(None, feeds[0])
elif job == "check":
    extra = {"passed": check_fp16(model, feeds).passed}
elif job.startswith("cli-"):  # what a user runs: load, checks, preflight, canonicalisation, reports
    import contextlib, io, tempfile
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        argv = [job[4:], path + "/model.onnx", "--inputs", path + "/cli_inputs.npz", "-q"]
        if job == "cli-fix":
            argv += ["--auto", "-o", out + "/fixed.onnx"]
        extra = {"exit": main(argv)}
else:
    rep = fix_model(model, [], feeds, auto=True, auto_rewrites=auto_rewrites(), emit=job.split("-")[1]).report
    a = rep.auto
    pinned = sorted(n for s in a.sites for n in s.pinned_nodes)
    extra = {"passed": rep.fp16_after.passed, "auto_passed": a.passed, "kept": a.passes_kept,
             "fp32_nodes": a.fp32_nodes, "flop_fraction": rep.fp16_flop_fraction, "pinned": len(pinned),
             "runs": [a.profiling_runs, a.emulation_runs, a.validation_runs]}
seconds = time.perf_counter() - start
peak = hwm()
print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "delta_mb": (peak - base) / 1024, **extra}))
"""

MODELS = ("nafnet9", "vae", "t5", "t5-torchscript")
SMALL = ("vae-small", "t5-torchscript-small")  # the models of earlier runs: too small for the targets to mean much
# Real-size exports (--models to add them; 0.5-2 GB of RSS each): where users' cost lies, compute beside overhead.
LARGE = ("t5-base-torchscript", "sd-vae-torchscript", "nafnet-torchscript")
JOBS = ("check", "fix-fp32", "fix-mixed")
CLI_JOBS = ("cli-check", "cli-fix")  # the CLI on the same model and first sample (--jobs to add them)


def build(name: str, samples: int) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """The benchmark models, sized so one plain inference takes about a second on 2 cores (``*-small``: the
    earlier, smaller ones, 0.02-0.1 s, where fixed Python overhead dominates any ratio)."""
    if name == "nafnet9":  # NAFNet-Local 512x512, width 16, 9 blocks: the largest NAFNet-style model we build
        from onnx_fp16_rewrite.models.nafnet import build_nafnet, demo_inputs

        model = build_nafnet(height=512, width=512, channels=16, blocks=9)
    elif name == "vae-small":
        from onnx_fp16_rewrite.models.sd_vae_decoder import build_sd_vae_decoder, demo_inputs

        model = build_sd_vae_decoder(latent_size=32, channels=128)
    elif name == "t5":
        from onnx_fp16_rewrite.models.t5_encoder import build_t5_encoder, demo_inputs

        model = build_t5_encoder(seq_len=256, d_model=512, heads=8, d_ff=1024, layers=6)
    elif name in ("vae", "t5-torchscript", "t5-torchscript-small", *LARGE):
        # vae: diffusers AutoencoderKL decoder, latent 32 -> 256x256; t5-torchscript: transformers
        # T5EncoderModel, t5-small-like at seq 256; -small: the corpus' tiny t5-encoder. All through
        # torch.onnx.export(dynamo=False), cached on disk (the first run exports them: ~20 s each).
        from onnx_fp16_rewrite.models import exported
        from onnx_fp16_rewrite.models.exported import sized

        if name == "vae":
            spec = sized.vae_decoder()
        elif name == "t5-torchscript":
            spec = sized.t5_encoder()
        elif name == "t5-base-torchscript":  # t5-base's encoder: d_model 768, 12 layers of 12 heads, 420 MB
            spec = sized.t5_encoder(d_model=768, d_kv=64, d_ff=2048, layers=12, heads=12)
        elif name == "sd-vae-torchscript":  # Stable Diffusion's VAE decoder widths (128-512, 3 resnets a block)
            spec = sized.vae_decoder(channels=(128, 256, 512, 512), layers_per_block=2)
        elif name == "nafnet-torchscript":  # megvii NAFNetLocal, GoPro config (width 32, 1-1-1-28 blocks) at 512x512
            spec = sized.nafnet()
        else:
            spec = exported.spec("t5-encoder")
        model = exported.build(spec, "torchscript")
        feeds = spec.feeds()
        return model, [feeds[i % len(feeds)] for i in range(samples)]
    else:
        raise SystemExit(f"unknown model {name!r} (known: {', '.join(MODELS + SMALL + LARGE)})")
    return model, [demo_inputs(model, seed=i) for i in range(samples)]


def describe(model: onnx.ModelProto) -> dict:
    """Size of the model: nodes of the main graph and weight megabytes."""
    weights = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    weights += sum(onnx.numpy_helper.to_array(n.attribute[0].t).nbytes for n in model.graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR)
    return {"nodes": len(model.graph.node), "weights_mb": round(weights / 2**20, 1)}


def run_job(job: str, folder: Path, samples: int, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _JOB, job, str(folder), str(samples)], capture_output=True,
                         text=True, env=env, cwd=tempfile.gettempdir())
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def save(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], folder: Path) -> None:
    onnx.save_model(model, str(folder / "model.onnx"))
    np.savez(folder / "feeds.npz", **{f"{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})
    np.savez(folder / "cli_inputs.npz", **feeds[0])  # --inputs of the CLI jobs


def measure(name: str, jobs: list[str], samples: int, versions: dict[str, str | None], tmp: Path,
            repeat: int = 1) -> list[dict]:
    """One row per version: each job ``repeat`` times, the versions interleaved job by job (so
    the machine's drift falls on all of them alike), the baseline three times per repetition;
    a job's seconds and peak are its medians, ``times`` all of its runs."""
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-{samples}-", dir=tmp))
    model, feeds = build(name, samples)
    size = describe(model)
    save(model, feeds, folder)
    del model
    plain = {v: [] for v in versions}
    runs = {v: {job: [] for job in jobs} for v in versions}
    for _ in range(repeat):
        for v, path in versions.items():
            plain[v].append(run_job("plain", folder, 1, path))
        for job in jobs:
            for v, path in versions.items():
                runs[v][job].append(run_job(job, folder, samples, path))
        for v, path in versions.items():
            plain[v] += [run_job("plain", folder, 1, path) for _ in range(2)]
    rows = []
    for v in versions:
        base_s = statistics.median(p["seconds"] for p in plain[v])
        base_mb = statistics.median(p["peak_mb"] for p in plain[v])
        row = {"model": name, "version": v, "samples": samples, **size,
               "plain_s": [round(p["seconds"], 3) for p in plain[v]], "plain_peak_mb": round(base_mb),
               "load": os.getloadavg()}
        for job, results in runs[v].items():
            failed = next((r for r in results if "error" in r), None)
            if failed is not None:
                row[job] = failed
                continue
            seconds = statistics.median(r["seconds"] for r in results)
            peak = statistics.median(r["peak_mb"] for r in results)
            row[job] = {**results[0], "seconds": seconds, "peak_mb": peak, "times": [round(r["seconds"], 2) for r in results],
                        "ratio": round(seconds / base_s, 2), "rss_ratio": round(peak / base_mb, 2)}
        rows.append(row)
    return rows


def show(row: dict) -> None:
    check = row.get("check", {}).get("passed")
    verdict = "" if check is None else f", check before fix: {'passes' if check else 'FAILS'}"
    label = f" [{row['version']}]" if row.get("version") else ""
    print(f"{row['model']}{label} (N={row['samples']}): {row['nodes']} nodes, {row['weights_mb']} MB weights; plain ORT "
          f"{row['plain_s']} s, peak {row['plain_peak_mb']} MB{verdict}; load {row['load'][0]:.1f}", flush=True)
    for job in JOBS + CLI_JOBS:
        r = row.get(job)
        if r is None:
            continue
        if "error" in r:
            print(f"  {job:10s} ERROR {r['error']}", flush=True)
            continue
        detail = {k: r[k] for k in ("passed", "kept", "fp32_nodes", "pinned", "flop_fraction", "runs", "exit", "times")
                  if k in r and not (k == "times" and len(r[k]) < 2)}
        print(f"  {job:10s} {r['seconds']:7.2f} s = {r['ratio']:5.1f}x   peak {r['peak_mb']:6.0f} MB = "
              f"{r['rss_ratio']:4.2f}x   {detail}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--samples", default="1,4,16", help="calibration-sample counts for fix-mixed ('' for none)")
    parser.add_argument("--samples-model", default="t5")
    parser.add_argument("--pythonpath", default=None)
    parser.add_argument("--versions", default=None,
                        help="LABEL=DIR,... (DIR as --pythonpath; LABEL=. is this checkout): measured side by side")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each job (medians reported)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    versions = {"": args.pythonpath}
    if args.versions:
        pairs = [v.split("=", 1) for v in args.versions.split(",") if v]
        versions = {label: (None if path in ("", ".") else path) for label, path in pairs}
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}; "
          f"cores: {len(os.sched_getaffinity(0))}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="auto-fix-cost-") as tmp:
        for name in [m for m in args.models.split(",") if m]:
            for row in measure(name, args.jobs.split(","), 1, versions, Path(tmp), args.repeat):
                rows.append(row)
                show(row)
        for n in [int(s) for s in args.samples.split(",") if s]:
            for row in measure(args.samples_model, ["fix-mixed"], n, versions, Path(tmp), args.repeat):
                rows.append(row)
                show(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
