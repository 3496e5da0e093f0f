"""Large weights referenced, not copied: ModelProtos stay small, whatever the model's size.

A tensor at least ``LARGE_TENSOR_BYTES`` large never sits in a ModelProto's ``raw_data`` inside
the tool. It is an external-data *reference*: either to the input model's own data file (read
through a read-only memory map or chunked reads) or to an array held in this process (weights the
tool derives, such as FP16-rounded copies). So copying, serialising, snapshotting and shape
inference of a model cost its graph, not its weights, and protobuf's 2 GiB limit never applies.

- ``tensor_array(t)``: the values of any tensor (reference or not), without a copy where possible.
- ``make_tensor(arr, name)``: a TensorProto; a large array becomes an in-process reference.
- ``derive(t, op, fn, name)``: ``fn`` applied to a weight, chunk by chunk, cached per (weight, op),
  so repeated emulation builds share one rounded copy.
- ``skeleton(model)``: a weight-less copy for ORT (weights given through ``add_initializer``:
  ORT uses our buffers directly, no copy) and for shape inference.
Writing a model with references is ``model_io.write_model_files`` (streams each weight).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_fp16_rewrite.io import fp16_cast
from onnx_fp16_rewrite.fp16_limits import FP16_MAX

logger = logging.getLogger(__name__)

# Tensors this large stay out of ModelProtos (a parameter of load_model / make_tensor; tests use less).
LARGE_TENSOR_BYTES = 16 << 20
# Chunk size for reading and deriving weights (bounded temporaries).
CHUNK_BYTES = 16 << 20
# ``share``: float weights at least this large become in-process references for the analysis
# (fix, check), so its many model copies, snapshots and ORT sessions share one buffer per weight.
SHARE_BYTES = 4096
_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}

_PREFIX = "@onnx-fp16-rewrite/"
_FILE = _PREFIX + "file:"
_MEM = _PREFIX + "mem:"

# Sub-byte types are packed in raw_data; they stay in the proto.
_PACKED = {TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT4E2M1, TensorProto.STRING,
           getattr(TensorProto, "INT2", -1), getattr(TensorProto, "UINT2", -1)}

_store: dict[int, np.ndarray] = {}
_maps: dict[tuple, np.ndarray] = {}  # data file (path, identity) -> its one read-only mapping
_views: dict[int, tuple] = {}  # id(array tensor_array returned) -> (weakref, source key)
_fp16_of: dict[int, tuple] = {}  # id(FP16 array clamp_to_fp16 made) -> (weakref, source key)
_derived: dict[tuple, int] = {}
_ids = itertools.count(1)


def is_ref(t: TensorProto) -> bool:
    """Whether ``t`` is one of our references (its data is not in the proto)."""
    return t.data_location == TensorProto.EXTERNAL and _info(t).get("location", "").startswith(_PREFIX)


def has_refs(model: onnx.ModelProto) -> bool:
    return any(is_ref(t) for t in all_tensors(model))


def all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto of the model: initializers and tensor attributes, subgraphs and functions
    included (what onnx.external_data_helper's walk yields, in another order and a fraction of its
    time: emulation graphs have thousands of nodes, walked for every session and shape inference)."""
    yield from _graph_tensors(model.graph)
    for f in model.functions:
        yield from _node_tensors(f.node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    yield from _node_tensors(graph.node)


_TENSOR, _TENSORS = onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS
_GRAPH, _GRAPHS = onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS


def _node_tensors(nodes) -> Iterator[TensorProto]:
    for node in nodes:
        for a in node.attribute:  # inline, not a generator a node: most attributes are ints and floats
            kind = a.type
            if kind == _TENSOR:
                yield a.t
            elif kind == _TENSORS:
                yield from a.tensors
            elif kind == _GRAPH:
                yield from _graph_tensors(a.g)
            elif kind == _GRAPHS:
                for g in a.graphs:
                    yield from _graph_tensors(g)


def file_ref(t: TensorProto, path: str, offset: int, length: int) -> None:
    """Turn external tensor ``t`` into a reference to ``length`` bytes of ``path`` at ``offset``."""
    _set_location(t, _FILE + os.path.realpath(path), offset, length)


def detach_large(model: onnx.ModelProto, *, large_bytes: int | None = None) -> None:
    """Move the model's large in-proto tensors into this process's store (in place): from
    here on copies and snapshots of ``model`` do not copy them."""
    limit = LARGE_TENSOR_BYTES if large_bytes is None else large_bytes
    for t in all_tensors(model):
        if not is_ref(t) and t.HasField("raw_data") and len(t.raw_data) >= limit and t.data_type not in _PACKED:
            arr = np.frombuffer(t.raw_data, dtype=_np_dtype(t)).reshape(tuple(t.dims))
            _set_location(t, f"{_MEM}{_keep(arr)}", 0, arr.nbytes)


_shared: set[int] = set()  # store keys share() made (unshare puts those back into the proto)


def share(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each float initializer of at least ``SHARE_BYTES`` in its proto moved into
    this process's store (a copy built field by field; the caller's model is untouched), or
    ``model`` itself when it has none. Copies, snapshots, hashes and shape inference of the result
    then cost its graph only, and ORT sessions read the stored buffers (``add_initializer``), so
    the analysis holds each weight once however many graphs it builds. Non-float tensors (shapes,
    indices) stay in the proto: shape inference and constant folding read their values.
    ``unshare`` undoes it on a result before it leaves the tool."""
    if not any(shareable(t) for t in model.graph.initializer):
        return model
    out = onnx.ModelProto()
    _share_start[id(out)] = (next(_ids), out)
    _copy_fields(out, model, skip="graph")
    _copy_fields(out.graph, model.graph, skip="initializer")
    for t in model.graph.initializer:
        s = out.graph.initializer.add()
        if not shareable(t):
            s.CopyFrom(t)
            continue
        _copy_fields(s, t, skip="raw_data")
        arr = np.frombuffer(t.raw_data, dtype=_np_dtype(t)).reshape(tuple(t.dims))
        key = _keep(arr)
        _shared.add(key)
        _set_location(s, f"{_MEM}{key}", 0, arr.nbytes)
    return out


def unshare(model: onnx.ModelProto) -> onnx.ModelProto:
    """Put back into ``model`` (in place; returned) the weights ``share`` moved out, and every
    in-process reference smaller than ``LARGE_TENSOR_BYTES`` (derived from a shared weight):
    the model then holds references exactly where it would have without ``share``."""
    for t in all_tensors(model):
        key = _mem_key(t) if is_ref(t) else None
        if key is not None:
            if key in _shared or nbytes(t) < LARGE_TENSOR_BYTES:
                inline(t)
    return model


# id(model share made) -> (the first store key of its scope, that model). Holding the model keeps its id
# from being reused while the entry lives: an entry never released (a run that raised) would otherwise
# be taken by a later model at the same address, whose release then dropped others' weights.
_share_start: dict[int, tuple[int, onnx.ModelProto]] = {}


def release(shared: onnx.ModelProto, given: onnx.ModelProto) -> None:
    """Drop what ``share(given) -> shared`` put in the store since, and what was derived from it
    (rounded copies, a pass's new weights, FP16 copies): call once no model holding those
    references is used again (the caller's result unshared). A no-op when ``shared is given``."""
    if shared is given:  # share found nothing to move: what it returned is the caller's own
        return
    entry = _share_start.pop(id(shared), None)
    if entry is None:
        return
    start = entry[0]
    dropped = {k for k in _shared if k >= start}
    for (source, _op), key in list(_derived.items()):
        if _key_of_location(source[0]) in dropped:
            dropped.add(key)
    for (source, op), key in list(_derived.items()):
        if key in dropped or _key_of_location(source[0]) in dropped:
            del _derived[(source, op)]
    for k in dropped:
        _store.pop(k, None)
        _shared.discard(k)


def shares_model(fn: Callable) -> Callable:
    """Decorator: ``fn(model, ...)`` runs on ``share(model)``, released when it returns (for
    functions whose results hold no model, e.g. ``check_fp16``)."""
    import functools

    @functools.wraps(fn)
    def wrapper(model: onnx.ModelProto, *args, **kwargs):
        shared = share(model)
        try:
            return fn(shared, *args, **kwargs)
        finally:
            release(shared, model)

    return wrapper


def shareable(t: TensorProto) -> bool:
    """Whether ``share`` moves ``t`` out of the proto: a float tensor of ``SHARE_BYTES`` or more in it."""
    # Sized from the dims: reading raw_data would copy it.
    return (t.data_type in _FLOATS and not is_ref(t) and t.HasField("raw_data")
            and math.prod(t.dims) * _np_dtype(t).itemsize >= SHARE_BYTES)


def make_tensor(arr: np.ndarray, name: str, *, large_bytes: int | None = None) -> TensorProto:
    """``numpy_helper.from_array``, except that a large array is kept here and referenced."""
    limit = LARGE_TENSOR_BYTES if large_bytes is None else large_bytes
    entry = _fp16_of.get(id(arr))
    source = entry[1] if entry is not None and entry[0]() is arr else None
    # The FP16 copy of a shared weight (mixed emission inside fix) is shared too; unshare
    # puts it back into the result's proto.
    from_shared = source is not None and _key_of_location(source[0]) in _shared and arr.nbytes >= SHARE_BYTES
    if arr.nbytes < limit and not from_shared:
        return numpy_helper.from_array(arr, name)
    t = _mem_tensor(np.ascontiguousarray(arr), name)
    if from_shared:
        _shared.add(_mem_key(t))
    _fp16_of.pop(id(arr), None)
    if source is not None and (source, "round16") in _derived:
        _derived[(_source_key(t), "f32")] = _derived[(source, "round16")]
    return t


def tensor_array(t: TensorProto) -> np.ndarray:
    """The tensor's values; a file reference is a read-only memory map (no copy)."""
    if not is_ref(t):
        return numpy_helper.to_array(t)
    info = _info(t)
    loc = info["location"]
    dtype, shape = _np_dtype(t), tuple(t.dims)
    if loc.startswith(_MEM):
        view = _store[int(loc[len(_MEM):])].view()
        view.flags.writeable = False
    else:
        length = int(info.get("length", 0))
        if length == 0:
            return np.zeros(shape, dtype)
        offset = int(info.get("offset", 0))
        view = np.asarray(_file_map(loc[len(_FILE):])[offset:offset + length]).view(dtype).reshape(shape)
    _views[id(view)] = (weakref.ref(view), _source_key(t))
    return view


def _file_map(path: str) -> np.ndarray:
    """One read-only mapping per data file, shared by every tensor and ORT session reading it (a
    page mapped twice would count twice in RSS). MADV_RANDOM: weights are read where a Gather
    points, and the kernel's readahead would otherwise map a whole table for a few rows."""
    import mmap

    st = os.stat(path)
    key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)  # a file replaced since is a new map
    arr = _maps.get(key)
    if arr is None:
        arr = _maps[key] = np.memmap(path, dtype=np.uint8, mode="r")
        mm = getattr(arr, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_RANDOM"):
            try:
                mm.madvise(mmap.MADV_RANDOM)
            except (OSError, ValueError):
                pass
    return arr


def iter_chunks(t: TensorProto, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """The tensor's values as flat chunks; file references are read with plain reads, so the
    pages read do not stay mapped into this process (peak memory stays one chunk)."""
    dtype = _np_dtype(t)
    n = math.prod(t.dims)
    step = max(1, chunk_bytes // max(dtype.itemsize, 1))
    if is_ref(t) and _info(t)["location"].startswith(_FILE):
        info = _info(t)
        with open(info["location"][len(_FILE):], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            for start in range(0, n, step):
                count = min(step, n - start)
                yield np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype, count=count)
        return
    flat = tensor_array(t).reshape(-1)
    for start in range(0, n, step):
        yield flat[start:start + step]


_SMALL_BYTES = 8 << 10  # at most 2048 entries of 8 KiB (and their results): 32 MiB
_SMALL_ENTRIES = 2048
_small_derived: dict[tuple, np.ndarray] = {}


def derive(t: TensorProto, op: str, fn: Callable[[np.ndarray], np.ndarray], name: str,
           *, large_bytes: int | None = None) -> TensorProto:
    """A new tensor ``name`` holding ``fn(values of t)``; ``fn`` must be elementwise.

    For a referenced weight, ``fn`` runs chunk by chunk into one new array, cached per
    (weight, op): the emulation rebuilt ten times still holds one rounded copy."""
    if not is_ref(t):
        # Small in-proto weights (biases, norm scales: hundreds in a transformer) are derived
        # again by every emulation built; keyed by their bytes, each is computed once.
        small = (op, t.data_type, tuple(t.dims), t.raw_data) if t.HasField("raw_data") and \
            len(t.raw_data) <= _SMALL_BYTES else None
        out = _small_derived.get(small) if small is not None else None
        if out is None:
            out = np.asarray(fn(numpy_helper.to_array(t)))
            if small is not None:
                if len(_small_derived) >= _SMALL_ENTRIES:
                    _small_derived.pop(next(iter(_small_derived)))
                _small_derived[small] = out
        return make_tensor(out, name, large_bytes=large_bytes)
    key = (_source_key(t), op)
    if key not in _derived:
        out = None
        pos = 0
        for chunk in iter_chunks(t):
            res = np.asarray(fn(chunk))
            if out is None:
                out = np.empty(math.prod(t.dims), res.dtype)
            out[pos:pos + res.size] = res
            pos += res.size
        if out is None:  # an empty tensor
            out = np.asarray(fn(np.zeros((0,), _np_dtype(t)))).reshape(-1)
        _derived[key] = _keep(out.reshape(tuple(t.dims)))
    return _ref_tensor(_derived[key], name)


def _round16(a: np.ndarray) -> np.ndarray:
    return fp16_cast.round_fp16(np.asarray(a, np.float32), clamp=True)


def _to16(a: np.ndarray) -> np.ndarray:
    return fp16_cast.to_fp16(np.asarray(a, np.float32), clamp=True)


def rounded_fp16(t: TensorProto, name: str) -> TensorProto:
    """FP32 weight ``t`` as an FP16 engine holds it: clamped to the FP16 range, rounded to FP16,
    widened back to FP32 (one shared copy per weight)."""
    return derive(t, "round16", _round16, name)


def as_fp16(t: TensorProto, name: str) -> TensorProto:
    """Weight ``t`` stored as FP16 (clamped to the FP16 range)."""
    return derive(t, "fp16", _to16, name)


def clamp_to_fp16(arr: np.ndarray) -> tuple[np.ndarray, int, float]:
    """``arr`` as FP16 with finite values past ±65504 clamped (±inf kept: masks use it), chunk by
    chunk; returns (fp16 array, values clamped, largest clamped magnitude). A memory-mapped
    input's pages are dropped as they are read, so peak memory is the FP16 copy."""
    out = np.empty(arr.shape, np.float16)
    src, dst = arr.reshape(-1), out.reshape(-1)
    step = max(1, CHUNK_BYTES // 4)
    clamped, worst, has_inf = 0, 0.0, False
    for start in range(0, src.size, step):
        c = np.asarray(src[start:start + step], np.float32)
        over = np.isfinite(c) & (np.abs(c) > FP16_MAX)
        k = int(over.sum())
        if k:
            clamped += k
            worst = max(worst, float(np.abs(c[over]).max()))
            c = np.where(over, np.clip(c, -FP16_MAX, FP16_MAX), c)
        dst[start:start + step] = fp16_cast.to_fp16(c)
        has_inf = has_inf or bool(np.isinf(c).any())
        _drop_pages(arr)
    src_entry = _views.get(id(arr))
    if src_entry is not None and src_entry[0]() is arr and not has_inf:
        # Without infinities, widening this FP16 copy back to FP32 gives exactly the emulation's
        # rounded copy of the same weight (clamp, round): make_tensor/derive share it.
        _fp16_of[id(out)] = (weakref.ref(out), src_entry[1])
    return out, clamped, worst


def _drop_pages(arr: np.ndarray) -> None:
    """Let the kernel reclaim the pages of a read-only file mapping we have read."""
    import mmap

    base = arr
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    mm = getattr(base, "_mmap", None) if base is not None else None
    if mm is not None and hasattr(mm, "madvise"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def skeleton(model: onnx.ModelProto, placeholder: str = "placeholder",
             *, large_bytes: int | None = None) -> tuple[onnx.ModelProto, dict[str, TensorProto]]:
    """A weight-less copy of ``model`` for ORT and shape inference: each referenced or large
    top-level initializer points at ``placeholder`` (an empty file ORT checks exists) and is
    returned by name (the caller's own TensorProto) for ``SessionOptions.add_initializer``; so is
    every float weight ``share`` would take (shape inference needs no float values, and ORT
    given the array holds no second copy parsed from serialized bytes).
    Built field by field, so the caller's large weights are never copied. References in
    subgraphs or attributes (rare) are inlined into the copy."""
    limit = LARGE_TENSOR_BYTES if large_bytes is None else large_bytes
    out = onnx.ModelProto()
    _copy_fields(out, model, skip="graph")
    _copy_fields(out.graph, model.graph, skip="initializer")
    stripped: dict[str, TensorProto] = {}
    for t in model.graph.initializer:
        if is_ref(t) or (t.HasField("raw_data") and (nbytes(t) >= limit or shareable(t))):
            s = out.graph.initializer.add()
            s.name, s.data_type = t.name, t.data_type
            s.dims.extend(t.dims)
            _set_location(s, placeholder, 0, nbytes(t))
            stripped[t.name] = t
        else:
            out.graph.initializer.add().CopyFrom(t)
    top = {id(t) for t in out.graph.initializer}
    for t in all_tensors(out):
        if id(t) not in top and is_ref(t):
            inline(t)
    return out, stripped


def import_graph(model: onnx.ModelProto):
    """``gs.import_onnx`` whose referenced constants load through ``tensor_array`` (graphsurgeon's
    own loader cannot read references); ``keep_refs`` before export puts them back."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and _is_lazy(t._values) and is_ref(t._values.tensor):
            t._values = _ref_values(t._values.tensor)
            # graphsurgeon would mark new values a pass sets (``c.values = ...``) external too.
            t.data_location = None
    return graph


def load_refs(graph) -> None:
    """Referenced constants of a graphsurgeon graph as their arrays (views of the store, no copy):
    graphsurgeon exports a lazy constant as its TensorProto, which ORT cannot read when it is a
    reference; ``keep_refs`` turns the arrays back into references before the graph's export."""
    import onnx_graphsurgeon as gs

    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and _is_lazy(t._values) and is_ref(t._values.tensor):
            t._values = t._values.load()


def keep_refs(graph) -> None:
    """Before ``gs.export_onnx``: a referenced constant whose values a pass only read (graphsurgeon
    caches them as an array) is exported as its reference again, not inlined into the proto."""
    import onnx_graphsurgeon as gs

    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    shared = False
    for t in constants:
        if isinstance(t._values, np.ndarray):
            entry = _loaded.get(id(t._values))
            if entry is not None and entry[0]() is t._values:
                t._values = _ref_values(entry[1])
        if _is_lazy(t._values) and is_ref(t._values.tensor):
            shared = shared or _mem_key(t._values.tensor) in _shared
    if not shared:
        return
    # A shared model's new weights (a pass scaled one) are shared too: not copied with every
    # snapshot and emulation graph; unshare puts them back into the result's proto.
    for t in constants:
        arr = t._values
        if (isinstance(arr, np.ndarray) and arr.nbytes >= SHARE_BYTES
                and arr.dtype in (np.float32, np.float16, np.float64)
                and (t.export_dtype is None or _onnx_dtype(t.export_dtype) == _onnx_dtype(arr.dtype))):
            key = _keep(np.ascontiguousarray(arr))
            _shared.add(key)
            t._values = _ref_values(_ref_tensor(key, t.name))


def _mem_key(t: TensorProto) -> int | None:
    return _key_of_location(_info(t).get("location", ""))


def _key_of_location(loc: str) -> int | None:
    return int(loc[len(_MEM):]) if loc.startswith(_MEM) else None


def _onnx_dtype(dtype) -> int:
    return dtype if isinstance(dtype, int) else helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


_loaded: dict[int, tuple] = {}  # id(array a reference loaded to) -> (weakref to it, the tensor)


def _is_lazy(values) -> bool:
    from onnx_graphsurgeon.ir.tensor import LazyValues

    return isinstance(values, LazyValues)


def _ref_values(tensor: TensorProto):
    import weakref

    from onnx_graphsurgeon.ir.tensor import LazyValues

    class _RefValues(LazyValues):
        def load(self):
            arr = tensor_array(self.tensor)
            _loaded[id(arr)] = (weakref.ref(arr), self.tensor)
            return arr

    return _RefValues(tensor)


def _copy_fields(dst, src, *, skip: str) -> None:
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def inline(t: TensorProto) -> None:
    """Put a referenced tensor's data into the proto (only for small ones or rare places)."""
    data = np.ascontiguousarray(tensor_array(t)).tobytes()
    del t.external_data[:]
    t.ClearField("data_location")  # not set to DEFAULT: the tensor serialises as one never detached
    t.raw_data = data


def nbytes(t: TensorProto) -> int:
    """Bytes of the tensor's data, wherever it is."""
    if t.data_location == TensorProto.EXTERNAL:
        return int(_info(t).get("length", 0))
    if t.HasField("raw_data"):
        if t.data_type in _FLOATS or t.data_type in _FIXED_WIDTH:
            # From the dims: reading raw_data copies it (950 copies of T5's weights per check).
            return math.prod(t.dims) * _np_dtype(t).itemsize
        return len(t.raw_data)
    return t.ByteSize()


def _mem_tensor(arr: np.ndarray, name: str) -> TensorProto:
    return _ref_tensor(_keep(arr), name)


def _keep(arr: np.ndarray) -> int:
    key = next(_ids)
    _store[key] = arr
    return key


def _ref_tensor(key: int, name: str) -> TensorProto:
    arr = _store[key]
    t = TensorProto()
    t.name = name
    t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
    t.dims.extend(arr.shape)
    _set_location(t, f"{_MEM}{key}", 0, arr.nbytes)
    return t


def _source_key(t: TensorProto) -> tuple:
    info = _info(t)
    loc = info["location"]
    ident: tuple = ()
    if loc.startswith(_FILE):  # a file replaced since is another source
        st = os.stat(loc[len(_FILE):])
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return (loc, *ident, int(info.get("offset", 0)), int(info.get("length", 0)), t.data_type)


def _set_location(t: TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v


def _info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


_FIXED_WIDTH = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32,
                TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64, TensorProto.BOOL}


def _np_dtype(t: TensorProto) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
