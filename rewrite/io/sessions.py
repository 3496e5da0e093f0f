"""ORT sessions built once per graph, and runs done once per (graph, sample).

The automatic fixer runs the same emulation graph more than once: its search accepts a plan
with a run, and the final verdict (and ``fix``'s verification) runs that plan's graph again,
on all samples where the search used some. Sessions are cached on a hash of what ORT executes
(the graph, opsets and IR version; metadata such as a stored precision plan is ignored), and
each sample's outputs are kept with the session, so a repeated (graph, sample) costs nothing.
Samples are the same arrays (identity), as the fixer passes them along.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import onnx

from onnx_fp16_rewrite.io.ort_runner import Feed, make_session

logger = logging.getLogger(__name__)

# One graph at a time: the reuse that matters is the last accepted plan's graph run again by the
# verdict; more would keep several copies of the weights alive (peak RSS).
MAX_SESSIONS = 1


class _Entry:
    def __init__(self, session) -> None:
        self.session = session
        self.results: dict[tuple, Feed] = {}
        self.feeds: list[Feed] = []  # the feeds keyed by identity, kept alive so no id is reused


_CACHE: OrderedDict[tuple[str, bool], _Entry] = OrderedDict()
_STATS = {"sessions": 0, "runs": 0, "reused_runs": 0}


def graph_key(model: onnx.ModelProto) -> str:
    """A digest of what ORT executes: graph, opset imports, IR version (not metadata or docs)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(str(model.ir_version).encode())
    for imp in model.opset_import:
        h.update(f"{imp.domain}:{imp.version};".encode())
    h.update(model.graph.SerializeToString(deterministic=True))
    return h.hexdigest()


def _identity(feed: Feed) -> tuple:
    """A feed as the same arrays (hashing their bytes cost more than 5% of a fix on NAFNet)."""
    return tuple((name, id(feed[name]), np.shape(feed[name])) for name in sorted(feed))


def feed_key(feed: Feed) -> str:
    """A digest of a feed's contents (for callers that rebuild equal feeds)."""
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(feed):
        arr = np.ascontiguousarray(feed[name])
        h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
        h.update(arr.tobytes() if arr.dtype != object else repr(arr.tolist()).encode())
    return h.hexdigest()


def cached_session(model: onnx.ModelProto, *, optimize: bool = False, key: str | None = None):
    """The session of ``model`` (built on first use; ``key`` when the caller already has it)."""
    return _entry(model, optimize, key or graph_key(model)).session


def run_cached(
    model: onnx.ModelProto,
    feeds: Sequence[Feed],
    output_names: Sequence[str] | None = None,
    *,
    optimize: bool = False,
    cache: bool = True,
) -> list[Feed]:
    """``run_model`` through the cache: one ``{output: array}`` dict per feed; a (graph, feed)
    pair already run comes back from memory. Callers must not modify the returned arrays.
    ``cache=False``: a session of its own, nothing kept (hashing a graph with its weights costs
    time and a serialized copy in memory; worth it only where a repeat can come)."""
    if not cache:
        session = make_session(model, optimize=optimize)
        _STATS["sessions"] += 1
        _STATS["runs"] += len(feeds)
        run_names = list(output_names) if output_names is not None else [o.name for o in session.get_outputs()]
        return [dict(zip(run_names, session.run(run_names, feed))) for feed in feeds]
    entry = _entry(model, optimize, graph_key(model))
    names = tuple(output_names) if output_names is not None else None
    results = []
    for feed in feeds:
        k = (_identity(feed), names)
        got = entry.results.get(k)
        if got is None:
            run_names = list(names) if names is not None else [o.name for o in entry.session.get_outputs()]
            got = dict(zip(run_names, entry.session.run(run_names, feed)))
            entry.results[k] = got
            entry.feeds.append(feed)
            _STATS["runs"] += 1
        else:
            _STATS["reused_runs"] += 1
        results.append(got)
    return results


def stats() -> dict[str, int]:
    """Sessions built, runs done and runs answered from memory since the process started."""
    return dict(_STATS)


def clear() -> None:
    _CACHE.clear()


def _entry(model: onnx.ModelProto, optimize: bool, key: str) -> _Entry:
    k = (key, optimize)
    entry = _CACHE.get(k)
    if entry is not None:
        _CACHE.move_to_end(k)
        return entry
    entry = _Entry(make_session(model, optimize=optimize))
    _STATS["sessions"] += 1
    _CACHE[k] = entry
    while len(_CACHE) > MAX_SESSIONS:
        _CACHE.popitem(last=False)
    return entry


__all__ = ["MAX_SESSIONS", "cached_session", "clear", "feed_key", "graph_key", "run_cached", "stats"]
