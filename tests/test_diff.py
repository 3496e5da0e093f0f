"""onnx-rewrite diff ORIGINAL FIXED: nodes added, removed, retyped or pinned, grouped by who did it
(read back from the fixed model's annotations), and the same diff in the JSON report."""

import json

import onnx

from onnx_fp16_rewrite.cli import main
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.report.graph_diff import diff_models, node_changes
from tests.report_cases import case, fixed


def test_diff_of_protect_fp32_mixed_on_nafnet(tmp_path, capsys):
    original = case("nafnet")[0]
    result = fixed("nafnet", "pass", "mixed")
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(original, str(a))
    onnx.save(result.model, str(b))
    out_json = tmp_path / "diff.json"
    assert main(["diff", str(a), str(b), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    plan = PrecisionPlan.from_model(result.model)
    casts = [n.name for n in result.model.graph.node if n.op_type == "Cast"]
    assert len(plan) == 26 and len(casts) == 4
    assert f"{len(casts)} added, 0 removed" in text and f"{len(plan)} pinned" in text
    assert f"pinned by protect-fp32: {len(plan)} nodes" in text
    assert f"emit-mixed: {len(casts)} nodes" in text
    data = json.loads(out_json.read_text())
    assert sorted(data["added"]) == sorted(casts)
    assert sorted(data["pinned"]) == sorted(plan.fp32_nodes)
    assert sorted(data["by_origin"]["pinned by protect-fp32"]) == sorted(plan.fp32_nodes)
    assert data["ops_added"] == {"Cast": 4} and data["ops_removed"] == {}
    # Every FP16 node of the mixed model is retyped FLOAT -> FLOAT16, and attributed to the emitter.
    fp16_nodes = set(result.report.mixed.fp16_nodes)
    retyped = set(data["retyped"])
    assert retyped and retyped <= fp16_nodes
    assert all("FLOAT -> FLOAT16" in line for lines in data["retyped"].values() for line in lines)
    assert set(data["by_origin"]["emit-mixed (retyped to FP16)"]) == retyped - set(plan.fp32_nodes)
    assert data["passes"] == ["protect-fp32"]


def test_diff_attributes_rewritten_nodes_to_their_pass():
    original = case("nafnet")[0]
    result = fixed("nafnet", "auto")
    diff = diff_models(original, result.model)
    record = next(r for r in result.report.auto.rewrites_tried if r.name == "rescale-accumulation")
    group = diff.by_origin["pass rescale-accumulation"]
    assert set(group) == set(record.changes.added) | set(record.changes.changed)
    assert diff.ops_added == {"Mul": 2} and diff.changes.pinned == []
    assert not diff.changes.removed


def test_node_changes_sees_op_attribute_and_plan_changes(window_model):
    after = onnx.ModelProto()
    after.CopyFrom(window_model)
    nodes = {n.name: n for n in after.graph.node}
    nodes["cumsum1"].attribute.extend([onnx.helper.make_attribute("reverse", 1)])
    nodes["div11"].op_type = "Mul"
    del after.graph.node[[n.name for n in after.graph.node].index("sub9")]
    PrecisionPlan({"slice7": "test"}).store_in(after)
    ch = node_changes(window_model, after, types=False)
    assert sorted(ch.changed) == ["cumsum1", "div11"]
    assert ch.removed == ["sub9"] and ch.added == [] and ch.pinned == ["slice7"]
