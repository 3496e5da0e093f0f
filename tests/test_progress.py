"""Progress (issue 12): library phases reported through the Progress protocol, rendered by rich on a
terminal (tested through a pseudo-terminal) and absent when the output is not a terminal."""

import io
import os
import re
import subprocess
import sys

import onnx
import onnx.parser
import pytest

from onnx_fp16_rewrite.fix import fix_model
from onnx_fp16_rewrite.io.inputs import generate_feeds
from onnx_fp16_rewrite.progress import NULL_PROGRESS, RecordingProgress, RichProgress, progress_for

CUMSUM = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 64] x) => (float[1, 2, 64] y) {
  k = Constant <value = float {4000.0}> ()
  axis = Constant <value = int64 {2}> ()
  s = Mul(x, k)
  c = CumSum(s, axis)
  y = Div(c, k)
}
"""
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def cumsum_path(tmp_path):
    path = tmp_path / "cumsum.onnx"
    onnx.save(onnx.parser.parse_model(CUMSUM), path)
    return path


def test_fix_model_reports_each_phase_with_its_result():
    model = onnx.parser.parse_model(CUMSUM)
    progress = RecordingProgress()
    result = fix_model(model, [], generate_feeds(model), auto=True, emit="mixed", progress=progress)
    assert result.report.exit_code == 0
    names = progress.names()
    # The long phases the issue names: profiling, diagnosis (the check of the original), each rewrite
    # tried, verification; each closed with its result.
    for phase in ("profiling ranges", "FP16 check of the original", "automatic fix", "rewrite rescale-accumulation",
                  "FP16 verification (mixed)"):
        assert phase in names, names
    assert all(p.closed and not p.failed and p.summary for p in progress.phases), progress.phases
    by_name = {p.name: p for p in progress.phases}
    profiling = by_name["profiling ranges"]
    assert profiling.total == profiling.advanced == 1  # one run per sample, counted
    assert by_name["FP16 check of the original"].summary.startswith("FAIL")
    assert by_name["rewrite rescale-accumulation"].summary.startswith("kept")
    assert by_name["rewrite rescale-accumulation"].depth == by_name["automatic fix"].depth + 1
    assert "kept rescale-accumulation" in by_name["automatic fix"].summary
    assert by_name["FP16 verification (mixed)"].summary.startswith("PASS (0 NaN, 0 Inf")


def test_rich_progress_prints_results_and_failures():
    stream = io.StringIO()
    progress = RichProgress(stream)
    with progress.phase("profiling", total=4) as phase:
        phase.advance(4)
        with progress.phase("inner") as inner:
            inner.done("nested result")
        phase.done("4 runs")
    with pytest.raises(ValueError):
        with progress.phase("diagnosis"):
            raise ValueError("boom")
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    assert lines[0].startswith("  done inner: nested result (")
    assert lines[1].startswith("done profiling: 4 runs (")
    assert lines[2].startswith("failed diagnosis (")


def test_progress_only_when_both_streams_are_terminals():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress_for(io.StringIO(), Tty()) is NULL_PROGRESS
    assert progress_for(Tty(), io.StringIO()) is NULL_PROGRESS
    assert progress_for(Tty(), Tty(), quiet=True) is NULL_PROGRESS
    assert isinstance(progress_for(Tty(), Tty()), RichProgress)


def _cli(args, *, tty: bool, cwd) -> tuple[int, str]:
    argv = [sys.executable, "-m", "onnx_fp16_rewrite", *args]
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    if not tty:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
        return proc.returncode, proc.stdout + "\n<stderr>\n" + proc.stderr
    master, slave = os.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    code = proc.wait(timeout=300)
    return code, _ANSI.sub("", b"".join(chunks).decode(errors="replace"))


def test_progress_on_a_terminal_and_not_in_a_pipe(cumsum_path, tmp_path):
    args = ["fix", str(cumsum_path), "-o", str(tmp_path / "fixed.onnx")]
    code, text = _cli(args, tty=True, cwd=tmp_path)
    assert code == 0, text
    assert "done automatic fix: 1 site(s), kept rescale-accumulation, 0 FP32 node(s)" in text
    assert "done profiling ranges: 1 FP32 run(s)" in text and "  done rewrite rescale-accumulation: kept" in text
    assert "done FP16 verification (mixed): PASS (0 NaN, 0 Inf" in text
    # Each result is printed as its phase ends: before the final report.
    assert text.index("done FP16 check of the original") < text.index("done automatic fix") < text.index("wrote ")
    code, text = _cli(args[:-1] + [str(tmp_path / "fixed2.onnx")], tty=False, cwd=tmp_path)
    assert code == 0, text
    assert "done " not in text and "automatic fix" not in text
    assert text.endswith("<stderr>\n")  # nothing at all on stderr
