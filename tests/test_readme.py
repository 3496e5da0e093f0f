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


def test_every_readme_command_line_parses():
    """Each `onnx-rewrite ...` line in README.md's code blocks is accepted by the parser as written
    (the flags it shows exist and combine), so the examples cannot drift from the CLI."""
    import shlex

    from onnx_fp16_rewrite.cli_args import build_parser, fix_positionals

    text = README.read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    lines = []
    for block in blocks:
        for line in block.splitlines():
            line = line.removeprefix("$ ").split("  #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("onnx-rewrite "):
                    lines.append(part)
    assert len(lines) >= 8, lines
    for line in lines:
        args = build_parser().parse_args(shlex.split(line)[1:])
        fix_positionals(args)
        if args.command in ("check", "fix"):
            assert bool(args.model) != bool(args.demo), line
