"""README examples stay true: the Python API block runs as written (the two set-up commands
are run by .ci/run, which reads them from README.md)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _block(marker: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- ci:{marker} -->\n```[a-z]*\n(.*?)```", text, re.S)
    assert match, f"README.md has no ci:{marker} block"
    return match.group(1)


def test_setup_commands_present():
    assert "pip install ." in _block("demo") and "onnx-rewrite fix --demo nafnet" in _block("demo")
    assert "pip install '.[test]'" in _block("test") and "pytest" in _block("test")


def test_python_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_block("api"), "README.md", "exec"), {})
    assert (tmp_path / "nafnet_mixed.onnx").stat().st_size > 10_000
