"""The corpus of library exports: each model exports, is valid ONNX, matches torch in ORT, and fails (or, for the
controls, passes) the FP16 emulation as stated.

Exports are cached on disk (``$ONNX_FP16_REWRITE_CACHE``, else the pytest cache), so a machine exports each
(model, exporter) once. Marked ``corpus``: ``python -m pytest -m corpus`` runs only these.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16  # noqa: E402
from onnx_fp16_rewrite.io.ort_runner import run_model  # noqa: E402
from onnx_fp16_rewrite.models import exported  # noqa: E402

pytestmark = pytest.mark.corpus

ENTRIES = [pytest.param(name, exporter, id=f"{name}-{exporter}") for name, exporter in exported.NAMES]


@pytest.fixture(scope="session")
def cache_root(request) -> str:
    return os.environ.get("ONNX_FP16_REWRITE_CACHE") or str(request.config.cache.mkdir("onnx-fp16-rewrite"))


def _rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("name,exporter", ENTRIES)
def test_export_is_valid_and_matches_torch(name, exporter, cache_root):
    model = exported.build(name, exporter, cache_root=cache_root)
    onnx.checker.check_model(model, full_check=True)
    feeds = exported.feeds(name, model)
    ref = exported.reference(name, exporter, cache_root=cache_root)
    got = run_model(model, feeds)
    assert [o.name for o in model.graph.output] == list(exported.spec(name).outputs)
    for out, want in zip(got, ref):
        for key, value in want.items():
            assert out[key].shape == value.shape
            # FP32 ORT vs FP32 torch: only summation order differs. Overall rel L2 1e-4; elementwise rtol 1e-4
            # with atol 1e-3 of the output's range (the guided filter's FP32 prefix sums of 6.5e4 pixels cancel
            # to window sums: a few of its 2e5 values differ by 2e-4 relative between the two runtimes).
            assert _rel_l2(out[key], value) < 1e-4, key
            np.testing.assert_allclose(out[key], value, rtol=1e-4, atol=1e-3 * float(np.abs(value).max()))


@pytest.mark.parametrize("name,exporter", ENTRIES)
def test_fp16_emulation_fails_exactly_where_stated(name, exporter, cache_root):
    model = exported.build(name, exporter, cache_root=cache_root)
    report = check_fp16(model, exported.feeds(name, model))
    worst = max(o.rel_l2 for o in report.outputs)
    bad = sum(o.nan + o.inf for o in report.outputs)
    if exported.is_control(name):
        assert report.passed and bad == 0 and worst <= 1e-2, (worst, bad)
    else:
        assert not report.passed and (bad > 0 or worst > 1e-2), (worst, bad)


def test_names_cover_both_exporters_and_unsupported_have_reasons():
    names = {n for n, _ in exported.NAMES}
    assert names == set(exported.SPECS)
    for name, exporter, reason in exported.UNSUPPORTED:
        assert exporter in exported.EXPORTERS and reason
    with pytest.raises(KeyError, match="no corpus model"):
        exported.spec("no-such-model")


def test_cache_returns_the_same_model_and_rebuilds_a_damaged_entry(tmp_path):
    name = "nafnet-local-pool"
    first = exported.build(name, "torchscript", cache_root=tmp_path)
    (entry,) = list((tmp_path / "exported").glob(f"{name}-torchscript-*.onnx"))
    again = exported.build(name, "torchscript", cache_root=tmp_path)
    assert again.SerializeToString() == first.SerializeToString()
    entry.write_bytes(b"not a model")
    rebuilt = exported.build(name, "torchscript", cache_root=tmp_path)
    assert len(rebuilt.graph.node) == len(first.graph.node)
    assert onnx.load(entry).graph.node  # the damaged file was replaced


def test_importing_the_corpus_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, onnx_fp16_rewrite.models.exported as x; x.feeds('t5-encoder'); "
            "assert not {'torch', 'transformers', 'diffusers'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", sorted(exported.SPECS))
def test_feeds_are_deterministic(name):
    first, again = exported.feeds(name), exported.feeds(name)
    assert len(first) == len(again) >= 1
    for a, b in zip(first, again):
        assert a.keys() == b.keys() == set(exported.spec(name).inputs)
        for key in a:
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key])
