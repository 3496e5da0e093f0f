"""Models past the protobuf limit, exercised with a small size threshold (issue 10): large weights
stay references (never copied into a ModelProto, never serialised whole), the caller's model is
never emptied, ORT runs them, and check / fix (both emits) write reloadable external-data outputs
whose FP32 results equal the original's. benchmarks/large_model.py runs the same paths at 2.4 GB."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fp16_rewrite.cli import main
from onnx_fp16_rewrite.emulation.fp16_emulation import build_emulation
from onnx_fp16_rewrite.io import weights
from onnx_fp16_rewrite.io.model_io import load_model, save_model
from onnx_fp16_rewrite.io.ort_runner import infer_types, run_model
from onnx_fp16_rewrite.models.embedding_table import table_nodes

LIMIT = 4096  # bytes: stands in for the 16 MiB default so the 2 GiB code paths run in a second


def table_model(rows: int = 3000, dim: int = 64) -> onnx.ModelProto:
    """An embedding Gather table (the large weight), a MatMul and a normalisation whose sum of
    squares overflows FP16 (so the automatic fix has something to pin)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((rows, dim)).astype(np.float32)
    w = (rng.standard_normal((dim, dim)) * 30).astype(np.float32)
    nodes = table_nodes()
    g = helper.make_graph(nodes, "table", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16, dim])],
                          [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w"),
                           numpy_helper.from_array(np.array([-1], np.int64), "axes")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def small_limit(monkeypatch):
    monkeypatch.setattr(weights, "LARGE_TENSOR_BYTES", LIMIT)


@pytest.fixture
def external_model(tmp_path):
    path = tmp_path / "in" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(table_model(), str(path), save_as_external_data=True, location="w.bin", size_threshold=1024)
    return path


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_large_weights_stay_references(small_limit, external_model):
    m = load_model(external_model)
    refs = {t.name for t in m.graph.initializer if weights.is_ref(t)}
    assert refs == {"table", "w"}
    assert m.ByteSize() < 2000  # the proto is the graph, not the 800 kB of weights
    before = m.SerializeToString()
    infer_types(m)  # used to save the caller's model as external data into a temp folder, emptying it
    emu = build_emulation(m)
    assert m.SerializeToString() == before
    rounded = [t for t in emu.model.graph.initializer if t.name.endswith("__r16")]
    assert rounded and all(weights.is_ref(t) for t in rounded) and emu.model.ByteSize() < 20000
    again = build_emulation(m)  # the rounded copy is made once and shared
    assert {t.external_data[0].value for t in again.model.graph.initializer if t.name.endswith("__r16")} == \
           {t.external_data[0].value for t in rounded}


def test_ort_runs_references_like_the_file(small_limit, external_model):
    feed = {"ids": np.random.default_rng(1).integers(0, 3000, (4, 16))}
    want = ort.InferenceSession(str(external_model), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = run_model(load_model(external_model), [feed])[0]["y"]
    assert np.array_equal(got, want)


def test_save_streams_references(small_limit, external_model, tmp_path):
    out = save_model(load_model(external_model), tmp_path / "copy.onnx", input_path=external_model)
    data = tmp_path / "copy.onnx.data"
    assert data.exists() and out.stat().st_size < 2000
    reloaded = onnx.load(str(out))
    original = onnx.load(str(external_model))
    for a, b in zip(reloaded.graph.initializer, original.graph.initializer):
        assert np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


@pytest.mark.parametrize("command", [["check"], ["fix", "--emit", "fp32"], ["fix", "--emit", "mixed"]], ids=" ".join)
def test_cli_on_referenced_weights(small_limit, external_model, tmp_path, capfd, command):
    before = _digest(external_model.parent)
    out = tmp_path / "out" / "f.onnx"
    out.parent.mkdir()
    argv = [command[0], str(external_model), *command[1:], *(["-o", str(out)] if command[0] == "fix" else [])]
    code = main(argv)
    err = capfd.readouterr().err
    assert code in (0, 4) and "Traceback" not in err, err
    assert _digest(external_model.parent) == before
    if command[0] == "check":
        return
    assert code == 0, err
    assert sorted(p.name for p in out.parent.iterdir()) == ["f.onnx", "f.onnx.data"]
    feed = {"ids": np.random.default_rng(2).integers(0, 3000, (4, 16))}
    want = ort.InferenceSession(str(external_model), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)[0].astype(np.float32)
    if command[-1] == "fp32":
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    else:  # FP16 weights and FP16 compute where the plan allows
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


def test_a_replaced_data_file_is_read_afresh(small_limit, tmp_path):
    """One mapping per data file is shared, but a file replaced at the same path is a new file."""
    path = tmp_path / "m.onnx"
    feed = {"ids": np.arange(64).reshape(4, 16)}
    outs = []
    for scale in (1.0, 2.0):
        m = table_model()
        t = m.graph.initializer[0]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * scale, "table"))
        onnx.save_model(m, str(path), save_as_external_data=True, location="w.bin", size_threshold=1024)
        loaded = load_model(path)
        outs.append(weights.tensor_array(loaded.graph.initializer[0])[:4].copy())
        run_model(loaded, [feed])
    np.testing.assert_array_equal(outs[1], 2 * outs[0])


@pytest.mark.parametrize("emit", ["fp32", "mixed"])
def test_shared_weights_give_the_same_fixed_model(monkeypatch, emit):
    """fix_model shares every float weight >= SHARE_BYTES (one buffer for all its copies and
    sessions) and puts them back into the result: the fixed model's bytes, verdict and plan are
    those of a run with sharing off, the result holds no reference, the store is released, the
    caller's model is intact."""
    from onnx_fp16_rewrite.fix import fix_model

    model = table_model(rows=300)
    before = model.SerializeToString()
    feeds = [{"ids": np.random.default_rng(1).integers(0, 300, (4, 16)).astype(np.int64)}]
    shared = weights.share(model)
    assert {t.name for t in shared.graph.initializer if weights.is_ref(t)} == {"table", "w"}
    runs = []
    for share_bytes in (weights.SHARE_BYTES, 1 << 62):  # on, then off
        monkeypatch.setattr(weights, "SHARE_BYTES", share_bytes)
        held = len(weights._store)
        res = fix_model(model, [], feeds, auto=True, emit=emit)
        assert not weights.has_refs(res.model)
        assert len(weights._store) == held  # released: a loop over many models does not grow
        runs.append((res.model.SerializeToString(), res.report.fp16_after.passed, res.report.auto.fp32_nodes))
    assert runs[0] == runs[1]
    assert runs[0][2] > 0  # the fix pinned something: the shared weights were read
    assert model.SerializeToString() == before


def test_check_releases_its_shared_weights():
    """check_fp16 shares the caller's weights for its run and releases them after: repeated
    checks give the same numbers and do not grow the store."""
    from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16

    model = table_model(rows=300)
    feeds = [{"ids": np.random.default_rng(1).integers(0, 300, (4, 16)).astype(np.int64)}]
    held = len(weights._store)
    reports = [check_fp16(model, feeds) for _ in range(2)]
    assert len(weights._store) == held
    assert [(o.nan, o.inf, o.rel_l2) for r in reports for o in r.outputs] == \
        [(o.nan, o.inf, o.rel_l2) for o in reports[0].outputs] * 2


@pytest.mark.parametrize("command", ["check", "fix"])
def test_cli_releases_its_shared_weights(tmp_path, capsys, monkeypatch, command):
    """The CLI shares the model's weights as it loads it (before the input model's ORT session,
    which then reads the shared buffers instead of copying each weight out of the proto) and
    releases them at the end: main() run again in-process (an export script, the tests) does not
    grow the store."""
    from onnx_fp16_rewrite.io import model_io

    path = tmp_path / "m.onnx"
    onnx.save_model(table_model(rows=300), str(path))
    sessions = []
    real = model_io.check_input_model
    monkeypatch.setattr(model_io, "check_input_model", lambda m, what: sessions.append(real(m, what)) or sessions[-1])
    codes, held = [], len(weights._store)
    for k in range(2):
        argv = [command, str(path), "-q"] + (["--auto", "-o", str(tmp_path / f"out{k}.onnx")] if command == "fix" else [])
        codes.append(main(argv))
        assert len(weights._store) == held
    assert codes[0] == codes[1] and codes[0] in (0, 4)
    shared, _ = sessions[0]
    assert all(weights.is_ref(t) for t in shared.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    if command == "fix":  # the result holds its weights again
        fixed = onnx.load(str(tmp_path / "out0.onnx"))
        assert not any(weights.is_ref(t) for t in fixed.graph.initializer)
        assert {t.name for t in onnx.load(str(path)).graph.initializer} <= {t.name for t in fixed.graph.initializer}
    capsys.readouterr()


@pytest.mark.parametrize("command", ["check", "fix"])
def test_cli_refusing_its_input_after_loading_releases_the_shared_weights(tmp_path, capsys, command):
    """Exit 2 after the model's weights were shared (inputs of the wrong dtype, refused while
    loading; a --nodes name the model lacks, refused after it): the store is as before. Both
    kept the model's weights in the store before."""
    path = tmp_path / "m.onnx"
    onnx.save_model(table_model(rows=300), str(path))
    bad = tmp_path / "bad.npz"
    np.savez(bad, ids=np.zeros([4, 16], np.float32))  # the model reads int64 ids
    argv = (["check", str(path), "--inputs", str(bad)] if command == "check" else
            ["fix", str(path), "-o", str(tmp_path / "out.onnx"), "--pass", "protect-fp32",
             "--pass-option", "protect-fp32.nodes=no_such_node"])
    held = len(weights._store)
    assert main(argv + ["-q"]) == 2
    assert len(weights._store) == held
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("dtype float32" in err if command == "check" else "no_such_node" in err)
    assert not (tmp_path / "out.onnx").exists()


def test_a_share_never_released_is_not_taken_by_a_later_model():
    """A run that raises never releases its share. Its model must not die while its scope is on
    record: a later model at the same address would take the scope, and releasing that model (the
    fixer releases a share() result that found nothing to move) would drop the weights of every
    share made since."""
    import gc

    earlier = set(weights._store)  # other tests' leftovers are not this test's to judge
    leaked = weights.share(table_model(rows=200))
    address = id(leaked)
    del leaked
    gc.collect()
    # The scope's model is alive (so no other object can have its address) and is the one recorded.
    assert id(weights._share_start[address][1]) == address
    kept = weights.share(table_model(rows=300))  # a share made since: its weights must survive
    held = {k for k in weights._store if k in weights._shared} - earlier
    later = onnx.ModelProto()  # where CPython reuses a freed address, this one would have it
    weights.release(later, None)  # not made by share: nothing to release
    assert held <= set(weights._store)
    weights.release(weights._share_start[address][1], None)
    weights.release(kept, None)
    assert not held & set(weights._store)
