"""Packaging (issue 12): in a fresh virtual environment, installing the project puts exactly one
top-level import package (onnx_fp16_rewrite) and the console script there; another distribution
that ships top-level `models`, `passes` and `rewrite` packages beside it breaks nothing (the CLI
demo and the README's API block still run, also from a folder with its own `models/`).

The wheel is built from a copy of the working tree with this interpreter's setuptools (no network);
the fresh venv gets the dependencies through a path entry to this interpreter's site-packages,
whose own .pth files (the editable install) are not processed from there.
"""

import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import onnx_fp16_rewrite

ROOT = Path(__file__).resolve().parent.parent
DUMMY_PYPROJECT = """[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"
[project]
name = "dummy-yolo-style"
version = "1.0"
[tool.setuptools]
packages = ["models", "passes", "rewrite"]
"""


def _pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _wheel(src: Path, out: Path) -> Path:
    _pip("wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(out))
    return out


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("packaging")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("rewrite", "passes", "models"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "*.onnx.data"))
    (wheels := base / "wheels").mkdir()
    _wheel(src, wheels)
    env = base / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    assert list(site.iterdir()) == []
    (wheel,) = wheels.glob("onnx_fp16_rewrite-*.whl")
    _pip("--python", str(python), "install", "-q", "--no-deps", str(wheel))
    return {"base": base, "env": env, "python": python, "site": site, "wheel": wheel}


def test_one_top_level_package_and_the_console_script(venv):
    site = venv["site"]
    entries = sorted(p.name for p in site.iterdir())
    assert entries == ["onnx_fp16_rewrite", f"onnx_fp16_rewrite-{onnx_fp16_rewrite.__version__}.dist-info"]
    with zipfile.ZipFile(venv["wheel"]) as whl:
        tops = {name.split("/")[0] for name in whl.namelist()}
        metadata = next(whl.read(n).decode() for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
    assert tops == set(entries)
    assert {"passes", "models", "rewrite"}.isdisjoint(tops)
    assert (venv["env"] / "bin" / "onnx-rewrite").is_file()
    # The [trt] extra is pinned to the TensorRT versions trt_backend follows (10.x, 11.x).
    trt = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: tensorrt") and "trt\"" in line]
    assert trt and all(">=10.0" in line and "<12" in line for line in trt), trt


def test_a_distribution_with_models_passes_rewrite_breaks_nothing(venv):
    base, python, site = venv["base"], venv["python"], venv["site"]
    dummy = base / "dummy"
    for package in ("models", "passes", "rewrite"):
        (dummy / package).mkdir(parents=True)
        (dummy / package / "__init__.py").write_text("WHO = 'dummy'\n")
    (dummy / "pyproject.toml").write_text(DUMMY_PYPROJECT)
    (dummy_wheels := base / "dummy_wheels").mkdir()
    _wheel(dummy, dummy_wheels)
    _pip("--python", str(python), "install", "-q", "--no-deps", str(next(dummy_wheels.glob("*.whl"))))
    assert {"models", "passes", "rewrite", "onnx_fp16_rewrite"} <= {p.name for p in site.iterdir()}
    # Dependencies (numpy, onnx, onnxruntime, ...) from this interpreter, after the venv's own packages.
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")

    env_bin = venv["env"] / "bin"
    proc = subprocess.run([str(env_bin / "onnx-rewrite"), "check", "--demo", "nafnet", "-q"],
                          capture_output=True, text=True, cwd=base)
    assert proc.returncode == 4, proc.stderr  # the demo's FP16 failure, found: not an ImportError
    assert proc.stdout.startswith("FP16 emulation: FAIL") and proc.stderr == ""
    proc = subprocess.run([str(python), "-m", "onnx_fp16_rewrite", "--version"], capture_output=True, text=True)
    assert proc.stdout.strip() == f"onnx-rewrite {onnx_fp16_rewrite.__version__}"

    # The README's API block, run from a project folder with its own `models/` package first on sys.path.
    work = base / "user_project"
    (work / "models").mkdir(parents=True)
    (work / "models" / "__init__.py").write_text("WHO = 'user'\n")
    block = re.search(r"<!-- ci:api -->\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    script = ("import models, passes, onnx_fp16_rewrite\n"
              "assert models.WHO == 'user' and passes.WHO == 'dummy', (models.__file__, passes.__file__)\n"
              f"assert onnx_fp16_rewrite.__file__.startswith({str(site)!r}), onnx_fp16_rewrite.__file__\n" + block)
    proc = subprocess.run([str(python), "-c", script], capture_output=True, text=True, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "nafnet_mixed.onnx").stat().st_size > 10_000
