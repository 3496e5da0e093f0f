"""What is left when ``fix`` does not end clean: which outputs, overflow or only rounding error,
and the next thing to try. Lines of text for the CLI (the data is all in the FixReport)."""

from __future__ import annotations

__all__ = ["whats_left"]


def whats_left(rep, *, ran_auto: bool, rel_l2: float, emit: str) -> list[str]:
    """Empty when the run ended clean (exit 0); else a short account and one suggestion per problem."""
    lines: list[str] = []
    after = rep.fp16_after
    if not after.passed:
        bad = [o for o in after.outputs if not o.ok]
        overflow = [o for o in bad if o.nan or o.inf]
        rounding = [o for o in bad if not (o.nan or o.inf)]
        lines.append(f"FAIL: {len(bad)} of {len(after.outputs)} output(s) still wrong in FP16 after the fix:")
        for o in overflow:
            lines.append(f"  {o.name}: {o.nan} NaN, {o.inf} Inf: overflow remains")
        for o in rounding:
            lines.append(f"  {o.name}: finite, rel L2 {o.rel_l2:.3g} > {rel_l2:g}: rounding error only, no overflow")
        firsts = after.first_failures[:3]
        if firsts:
            lines.append(f"  first failing tensor(s), of {after.failing_tensors}: "
                         + "; ".join(f"{f.kind} at {f.op} {f.node}" for f in firsts))
        node = firsts[0].node if firsts else None
        if overflow and not ran_auto:
            lines.append("next: run the automatic fix (leave out --pass, or add --auto to your --pass list)")
        elif overflow:
            pin = f"--pass protect-fp32 --nodes {node} --auto" if node else "--pass protect-fp32 --auto"
            lines.append("next: check that the inputs are representative (--inputs with real samples; generated "
                         f"inputs are U(0,1) unless --val-range says otherwise), or pin the first site: {pin}")
        else:
            worst = max(o.rel_l2 for o in rounding)
            pin = f" or pin where the error starts: --pass protect-fp32 --nodes {node} --auto" if node else ""
            lines.append(f"next: the outputs are finite; accept FP16 rounding with --rel-l2 {_loosened(worst)}"
                         f"{pin}")
    trt = rep.trt_after
    if trt is not None and not trt.passed and not getattr(trt, "not_verified", None):
        bad = [o.name for o in trt.outputs if not o.ok]
        lines.append(f"FAIL: TensorRT gives wrong results for {', '.join(bad) or 'some outputs'} "
                     "although the emulation passes")
        if emit != "mixed":
            lines.append("next: build strongly typed (--emit mixed); under weak typing TensorRT may run pinned "
                         "layers in FP16")
        else:
            lines.append("next: see the warnings above (TensorRT pitfalls); pin the failing region with "
                         "--pass protect-fp32 --nodes ... and --verify trt")
    for record in rep.passes.rolled_back:
        reason = record.error or "its FP32 results moved beyond --rtol/--atol"
        lines.append(f"rolled back: pass {record.name}: {reason}")
        lines.append(f"next: if {record.name} is approximate by design, loosen --rtol/--atol (or --tolerance "
                     "OUTPUT:RTOL,ATOL); otherwise leave it out")
    return lines


def _loosened(worst: float) -> str:
    """A round tolerance just above the measured error (2e-2 for 1.3e-2)."""
    mantissa, exponent = f"{worst:.0e}".split("e")
    value = (int(mantissa) + 1) * 10 ** int(exponent)
    return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")
