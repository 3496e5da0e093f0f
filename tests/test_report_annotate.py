"""Netron-visible annotations: every node the fixer pinned or a pass rewrote carries a doc_string that
says why; the model metadata names the tool and version next to the plan; producer_name is kept."""

import json
import re

import onnx
import pytest

from onnx_fp16_rewrite.emit.precision_plan import PLAN_KEY, PrecisionPlan
from onnx_fp16_rewrite.report.annotate import TOOL_KEY
from onnx_fp16_rewrite.report.provenance import tool_version
from tests.report_cases import NAMES, case, fixed


def _nodes(model):
    return {n.name: n for n in model.graph.node}


def _saved(model):
    """What Netron reads: the model after a save/load round trip."""
    return onnx.load_from_string(model.SerializeToString())


@pytest.mark.parametrize("emit", ["fp32", "mixed"])
def test_protect_fp32_pins_are_annotated_on_nafnet(emit):
    original = case("nafnet")[0]
    model = _saved(fixed("nafnet", "pass", emit).model)
    plan = PrecisionPlan.from_model(model)
    nodes = _nodes(model)
    assert len(plan) == 26
    for name, reason in plan.fp32_nodes.items():
        doc = nodes[name].doc_string
        assert doc.startswith("FP32 (pinned by protect-fp32): "), (name, doc)
        assert reason in doc
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta[TOOL_KEY]) == {"name": "onnx-fp16-rewrite", "version": tool_version()}
    assert PLAN_KEY in meta
    assert model.producer_name == original.producer_name != ""
    if emit == "mixed":
        casts = [n for n in model.graph.node if n.op_type == "Cast"]
        assert len(casts) == 4
        assert all(n.doc_string.startswith("added by emit-mixed: ") for n in casts)
        fp16 = [n for n in model.graph.node if n.doc_string.startswith("FP16 (emit-mixed): ")]
        assert len(fp16) > 40 and all("FLOAT -> FLOAT16" in n.doc_string for n in fp16)
    else:  # untouched nodes stay as they were
        touched = set(plan.fp32_nodes)
        assert all(not n.doc_string for n in model.graph.node if n.name not in touched)


def test_auto_pins_say_which_site_and_how_large():
    """fix --auto without rewrites pins FP32 regions: 'FP32 (pinned by auto): overflow at ..., |x|max 2.7e+05 > 65504'."""
    result = fixed("nafnet", "pin")
    model = _saved(result.model)
    plan = PrecisionPlan.from_model(model)
    nodes = _nodes(model)
    assert len(plan) == 20
    ranges = {r.tensor: r.absmax for r in result.report.auto.ranges}
    for name in plan.fp32_nodes:
        doc = nodes[name].doc_string
        assert doc.startswith("FP32 (pinned by auto): overflow at "), doc
        m = re.search(r"\|x\|max (\S+) (>|<=) 65504", doc)
        big = max(ranges[t] for t in nodes[name].output if t in ranges)
        assert m and float(m.group(1)) == pytest.approx(big, rel=1e-2)
        assert (m.group(2) == ">") == (big > 65504)
    cumsum = [n for n in plan.fp32_nodes if nodes[n].op_type == "CumSum"]
    assert cumsum and any("> 65504" in nodes[n].doc_string for n in cumsum)


def test_rewritten_nodes_say_which_pass_and_what():
    result = fixed("nafnet", "auto")
    model = _saved(result.model)
    nodes = _nodes(model)
    record = next(r for r in result.report.auto.rewrites_tried if r.name == "rescale-accumulation")
    touched = set(record.changes.added) | set(record.changes.changed)
    assert len(record.changes.added) == 2 and touched
    for name in touched:
        doc = nodes[name].doc_string
        assert doc.startswith("rewritten by rescale-accumulation: "), (name, doc)
    # The node a site names carries that site's own detail (the power of two it scaled by).
    for site in record.rewritten:
        assert re.search(r"scaled by 2\^-\d+", nodes[site.node].doc_string)


@pytest.mark.parametrize("name", NAMES)
def test_every_pinned_and_rewritten_node_is_annotated(name):
    """On every test model and both fixes: no pinned or rewritten node without a doc_string that says so."""
    for how in ("pass", "auto"):
        result = fixed(name, how)
        nodes = _nodes(result.model)
        records = list(result.report.passes.passes)
        if result.report.auto is not None:
            records += [r for r in result.report.auto.rewrites_tried if r.name in result.report.auto.passes_kept]
        for rec in records:
            if rec.status != "kept":
                continue
            for node in set(rec.changes.added) | set(rec.changes.changed):
                if node in nodes:
                    assert f"rewritten by {rec.name}: " in nodes[node].doc_string, (name, how, node)
        for node in PrecisionPlan.from_model(result.model).fp32_nodes:
            assert nodes[node].doc_string.startswith("FP32 (pinned by "), (name, how, node)
        assert any(p.key == TOOL_KEY for p in result.model.metadata_props)
