"""The HTML report: one self-contained file (no script, nothing loaded from anywhere), its per-layer
plot embedded as a PNG of the expected size that marks the failure sites (the CumSum on the NAFNet
demo) and the FP32 regions; it opens in headless Chromium without console errors."""

import base64
import html
import io
import re
import shutil
import sys
import subprocess

import numpy as np
import pytest

from onnx_fp16_rewrite.cli import main
from onnx_fp16_rewrite.report.outputs import fix_reports
from onnx_fp16_rewrite.report.plots import DPI, HEIGHT_IN, PINNED_RGB, SITE_RGB, width_inches
from tests.report_cases import case, fixed

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WINDOW = (1400, 3000)


def _png(page: str) -> tuple[np.ndarray, dict]:
    from matplotlib import image

    m = re.search(r'<img id="layer-plot" src="data:image/png;base64,([^"]+)" width="(\d+)" height="(\d+)"', page)
    assert m, "no embedded plot"
    pixels = image.imread(io.BytesIO(base64.b64decode(m.group(1))), format="png")
    return (pixels[..., :3] * 255).round().astype(np.int16), {"width": int(m.group(2)), "height": int(m.group(3))}


def _areas(page: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(title, tuple(int(v) for v in coords.split(",")))
            for coords, title in re.findall(r'<area shape="rect" coords="([\d,]+)" title="([^"]*)"', page)]


def _blend(rgb, alpha):
    """The colour a band of ``rgb`` at ``alpha`` gives over the white axes."""
    return np.array([round(c * alpha + 255 * (1 - alpha)) for c in rgb])


def _share(pixels: np.ndarray, rgb: np.ndarray, tol: int = 12) -> float:
    return float((np.abs(pixels - rgb).max(axis=-1) <= tol).mean())


def _assert_self_contained(page: str) -> None:
    assert "<script" not in page.lower()  # readable without JavaScript: there is none
    for value in re.findall(r'\b(?:src|href|action|data)="([^"]*)"', page):
        assert value.startswith(("data:", "#")), f"external reference {value[:60]}"
    assert "http://" not in page and "https://" not in page.replace("https://json-schema", "")


def _assert_plot(page: str, tensors: int) -> np.ndarray:
    pixels, size = _png(page)
    expected = (round(width_inches(tensors) * DPI), round(HEIGHT_IN * DPI))
    assert (size["width"], size["height"]) == expected == (pixels.shape[1], pixels.shape[0])
    white = (pixels >= 250).all(axis=-1).mean()
    assert white < 0.98 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # a plot, not a blank image
    return pixels


def _site_share(pixels: np.ndarray, box: tuple[int, ...]) -> float:
    """Share of the band's centre column drawn in the failure-site colour (over white, or over an
    FP32 region's shading)."""
    x0, y0, x1, y1 = box
    return float(_site_pixels(pixels[y0:y1, (x0 + x1) // 2]).mean())


def _site_pixels(pixels: np.ndarray) -> np.ndarray:
    """Where the failure-site colour is, over white or over an FP32 region's shading."""
    on_region = (np.array(SITE_RGB) * 0.55 + _blend(PINNED_RGB, 0.18) * 0.45).round()
    hits = [np.abs(pixels - c).max(axis=-1) <= 12 for c in (_blend(SITE_RGB, 0.55), on_region)]
    return hits[0] | hits[1]


def _open_in_chromium(path, tmp_path) -> np.ndarray:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", path.resolve().as_uri()],
        capture_output=True, text=True, timeout=180)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    assert shot.exists(), proc.stderr[-2000:]
    from matplotlib import image

    pixels = (image.imread(str(shot))[..., :3] * 255).round().astype(np.int16)
    assert pixels.shape[:2] == (WINDOW[1], WINDOW[0])
    assert (pixels < 250).any(axis=-1).mean() > 0.01  # the page rendered (text, tables)
    # ... and the browser drew the plot: its failure-site bands are on screen.
    assert _site_pixels(pixels).sum() > 2000
    return pixels


def test_console_errors_are_seen(tmp_path):
    """The console check can fail: a page with a script error is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>x'
                   "<script>console.error('boom')</script></body></html>")
    with pytest.raises(AssertionError, match="boom"):
        _open_in_chromium(bad, tmp_path)


def test_check_html_of_the_nafnet_demo_marks_the_cumsum(tmp_path):
    page_path = tmp_path / "check.html"
    assert main(["check", "--demo", "nafnet", "--html", str(page_path), "-q"]) == 4
    page = page_path.read_text()
    _assert_self_contained(page)
    pixels = _assert_plot(page, tensors=97)
    areas = _areas(page)
    cumsum = [box for title, box in areas if title.startswith("overflow at CumSum")]
    assert len(areas) == 1 and len(cumsum) == 1
    assert _site_share(pixels, cumsum[0]) > 0.5  # the band is drawn where the map says
    _open_in_chromium(page_path, tmp_path)


def test_fix_html_of_the_nafnet_demo_shades_the_fp32_region(tmp_path):
    model, feeds = case("nafnet")
    result = fixed("nafnet", "pass", "mixed")
    texts = fix_reports(result, model, feeds, argv=["fix", "--demo", "nafnet", "--pass", "protect-fp32"],
                        model_path=None, demo="nafnet", output_path="nafnet_fixed.onnx", want_html=True)
    page_path = tmp_path / "fix.html"
    page_path.write_text(texts.html)
    _assert_self_contained(texts.html)
    pixels = _assert_plot(texts.html, tensors=97)
    cumsum = [box for title, box in _areas(texts.html) if "CumSum" in title]
    assert cumsum and _site_share(pixels, cumsum[0]) > 0.5
    # The pinned sca regions (26 nodes, 2 blocks) are shaded: a visible share of the axes.
    assert _share(pixels, _blend(PINNED_RGB, 0.18), tol=6) > 0.05
    for needle in ("protect-fp32", html.escape(result.report.trtexec), "FP16 FLOP fraction", "onnxruntime",
                   "pinned by protect-fp32", "What changed"):
        assert needle in texts.html, needle
    _open_in_chromium(page_path, tmp_path)


def test_fix_html_of_the_t5_encoder(tmp_path):
    model, feeds = case("t5")
    result = fixed("t5", "auto")
    texts = fix_reports(result, model, feeds, argv=["fix", "t5.onnx", "--auto"], model_path=None, demo="t5",
                        output_path="t5_fixed.onnx", want_html=True)
    page_path = tmp_path / "t5.html"
    page_path.write_text(texts.html)
    _assert_self_contained(texts.html)
    rows = len(result.report.auto.ranges)
    pixels = _assert_plot(texts.html, tensors=rows)
    sites = _areas(texts.html)
    assert any(title.startswith("overflow at Pow") for title, _ in sites)
    assert all(_site_share(pixels, box) > 0.5 for _, box in sites)
    for name in result.report.auto.passes_kept:  # the rewrites that held, with their reasons
        assert f"{name} (tried by --auto): kept" in texts.html
    _open_in_chromium(page_path, tmp_path)


def test_html_without_matplotlib_is_a_one_line_error_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    page = tmp_path / "r.html"
    assert main(["check", "--demo", "nafnet", "--html", str(page)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().count("\n") == 0 and "pip install 'onnx-fp16-rewrite[report]'" in captured.err
    assert captured.out == "" and not page.exists()
