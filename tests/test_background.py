"""io.background.BackgroundCall: the call runs on its own named thread; its value or its error reaches the caller."""

from __future__ import annotations

import threading

import pytest

from onnx_fp16_rewrite.io.background import BackgroundCall


def test_result_is_the_calls_value_computed_on_another_thread():
    started = threading.Event()
    seen = []

    def work(a, b):
        seen.append(threading.current_thread().name)
        started.wait(5)  # held until the caller has gone on: it did not wait for the call
        return a * b

    call = BackgroundCall("onnx-rewrite-test", work, 6, 7)
    started.set()
    assert call.result() == 42 and call.result() == 42
    assert seen == ["onnx-rewrite-test"]


def test_result_raises_what_the_call_raised_and_wait_does_not():
    def fails():
        raise ValueError("refused")

    call = BackgroundCall("onnx-rewrite-test", fails)
    call.wait()
    with pytest.raises(ValueError, match="refused"):
        call.result()
