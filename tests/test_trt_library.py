"""TensorRT-RTX without TensorRT-RTX: the build dispatch for it, how it is asked for, and how the
reason a built engine did not run is read from TensorRT's log. The real library is exercised in
tests/test_trt_rtx.py (on the GPU machine)."""

import pytest

from onnx_fp16_rewrite.errors import TensorRTUnavailableError
from onnx_fp16_rewrite.tensorrt.trt_backend import choose_build

@pytest.mark.parametrize(("fp16_model", "pinned", "mode", "strong_flag", "reason"), [
    (True, 0, "strong", True, "builds strongly typed (STRONGLY_TYPED)"),
    (False, 26, "fp32", True, "no weakly typed FP16 mode"),
    (False, 0, "fp32", True, "fix --emit mixed"),
])
def test_choose_build_for_tensorrt_rtx(fp16_model, pinned, mode, strong_flag, reason):
    choice = choose_build("1.7.1.116", model_has_fp16=fp16_model, pinned=pinned, library="tensorrt_rtx")
    assert (choice.mode, choice.fp16_flag, choice.strongly_typed_flag, choice.layer_precisions) == (
        mode, False, strong_flag, False)  # never the FP16 flag: Polygraphy refuses it under TensorRT-RTX
    assert reason in choice.reason
    if pinned:
        assert f"{pinned} pinned node(s) cannot be applied" in choice.reason


def test_tensorrt_rtx_0_x_is_refused():
    with pytest.raises(TensorRTUnavailableError, match=r"TensorRT-RTX 0.9.0 is too old: .*>= 1.0"):
        choose_build("0.9.0", model_has_fp16=True, library="tensorrt_rtx")


@pytest.mark.parametrize(("value", "wanted"), [("1", True), ("0", False), ("", False), ("yes", True)])
def test_rtx_is_requested_the_way_polygraphy_reads_it(monkeypatch, value, wanted):
    from onnx_fp16_rewrite.tensorrt.trt_library import rtx_requested

    monkeypatch.setenv("POLYGRAPHY_USE_TENSORRT_RTX", value)
    assert rtx_requested() is wanted


@pytest.mark.parametrize(("lines", "reason"), [
    # TensorRT-RTX 1.7.1.116 on an H200, as logged through Polygraphy (the location after "In" cut here).
    (["[E] IRuntime::deserializeCudaEngine: Error Code 6: API Usage Error (The engine cannot run on this GPU, which "
      "has compute capability 9.0. Supported compute capabilities: 8.0 8.6 8.9 12.0 12.1 >12.0. TensorRT-RTX does "
      "not support this compute capability, so the engine cannot be rebuilt for it. In throwUnlessSupported at "
      "runtime.cpp:123)",
      "[E] Could not deserialize engine. See log for details."],
     "The engine cannot run on this GPU, which has compute capability 9.0. Supported compute capabilities: 8.0 8.6 "
     "8.9 12.0 12.1 >12.0. TensorRT-RTX does not support this compute capability, so the engine cannot be rebuilt "
     "for it."),
    (["[E] Could not deserialize engine. See log for details.", "[E] CUDA initialization failure with error: 35"],
     "CUDA initialization failure"),
])
def test_the_reason_an_engine_did_not_run_is_tensorrts_own_line(lines, reason):
    from onnx_fp16_rewrite.tensorrt.trt_build import _ErrorLines

    errors = _ErrorLines()
    errors.lines = lines
    got = errors.reason()
    assert reason in got and not got.startswith("[E]") and "\n" not in got and "Error Code" not in got
