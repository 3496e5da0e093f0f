"""trtexec command lines: exact strings, trtexec's own parsing rules, shell round trips."""

import shlex

import pytest

from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.emit.trtexec import (
    LayerNameError,
    format_command,
    layer_name_problem,
    layer_precision_spec,
    parse_layer_precision_spec,
    trtexec_command,
    unexpressible_layer_names,
)

SCA = "/encoders.0/encoders.0.0/sca/sca.0"
NAFNET_PLAN = PrecisionPlan({
    f"{SCA}/CumSum_1": "FP16 overflow",
    f"{SCA}/CumSum": "FP16 overflow",
    f"{SCA}/Div": "after an FP32 producer",
})
NAFNET_SPEC = (f"{SCA}/CumSum:fp32,{SCA}/CumSum_1:fp32,{SCA}/Div:fp32")


def test_spec_is_sorted_and_exact():
    assert layer_precision_spec(NAFNET_PLAN) == NAFNET_SPEC


def test_spec_does_not_depend_on_insertion_order():
    reordered = PrecisionPlan(dict(reversed(list(NAFNET_PLAN.fp32_nodes.items()))))
    assert layer_precision_spec(reordered) == NAFNET_SPEC


def test_spec_round_trips_through_trtexec_parsing():
    assert parse_layer_precision_spec(NAFNET_SPEC) == {name: "fp32" for name in NAFNET_PLAN.fp32_nodes}


def test_colons_use_the_last_colon_rule_unquoted():
    plan = PrecisionPlan({"ns::CumSum:0": "r", "/a/b:c/ReduceMean": "r"})
    spec = layer_precision_spec(plan)
    assert spec == "/a/b:c/ReduceMean:fp32,ns::CumSum:0:fp32"
    assert parse_layer_precision_spec(spec) == {"ns::CumSum:0": "fp32", "/a/b:c/ReduceMean": "fp32"}


def test_names_with_spaces_equals_and_double_quotes_are_expressible():
    plan = PrecisionPlan({'/blk 0/sca "x"=1/CumSum': "r"})
    assert layer_precision_spec(plan) == '/blk 0/sca "x"=1/CumSum:fp32'


def test_parser_reads_the_quoted_form_like_trtexec():
    assert parse_layer_precision_spec("'a:b:c':fp16,d:fp32") == {"a:b:c": "fp16", "d": "fp32"}
    with pytest.raises(ValueError, match="2 single quotes"):
        parse_layer_precision_spec("it's:fp32")
    with pytest.raises(ValueError, match="invalid precision"):
        parse_layer_precision_spec("a,b:fp32")  # what a name "a,b" would turn into


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("/sca/Concat_a,b", "','"),
        ("/sca/it's", "quote"),
        ("/sca/*", "wildcard"),
        ("", "node_of_"),
        ("a\x00b", "NUL"),
    ],
)
def test_unexpressible_names_are_refused(name, reason):
    assert reason in layer_name_problem(name)
    plan = PrecisionPlan({name: "r", f"{SCA}/CumSum": "r"})
    with pytest.raises(LayerNameError) as info:
        layer_precision_spec(plan)
    assert len(info.value.problems) == 1 and reason in info.value.problems[0]
    assert isinstance(info.value, BadInputError)
    with pytest.raises(LayerNameError):
        trtexec_command("m.onnx", plan, mode="weak")


def test_unexpressible_layer_names_lists_all_without_raising():
    plan = PrecisionPlan({"b,c": "r", "a'": "r", f"{SCA}/CumSum": "r"})
    warnings = unexpressible_layer_names(plan)
    assert [w.split(":")[0] for w in warnings] == ['"a\'"', "'b,c'"]
    assert unexpressible_layer_names(NAFNET_PLAN) == []


def test_weak_command_exact():
    argv = trtexec_command("nafnet.onnx", NAFNET_PLAN, mode="weak", engine_path="nafnet.plan")
    assert argv == [
        "trtexec",
        "--onnx=nafnet.onnx",
        "--fp16",
        "--precisionConstraints=obey",
        f"--layerPrecisions={NAFNET_SPEC}",
        "--saveEngine=nafnet.plan",
    ]
    assert format_command(argv) == (
        "trtexec --onnx=nafnet.onnx --fp16 --precisionConstraints=obey "
        f"--layerPrecisions={NAFNET_SPEC} --saveEngine=nafnet.plan"
    )


def test_weak_command_with_empty_plan_has_no_layer_precisions():
    argv = trtexec_command("m.onnx", PrecisionPlan(), mode="weak")
    assert argv == ["trtexec", "--onnx=m.onnx", "--fp16", "--precisionConstraints=obey"]


def test_strong_command_exact():
    argv = trtexec_command("mixed.onnx", NAFNET_PLAN, mode="strong", extra=["--verbose"])
    assert argv == ["trtexec", "--onnx=mixed.onnx", "--stronglyTyped", "--verbose"]


@pytest.mark.parametrize("flag", ["--fp16", "--best", "--layerPrecisions=a:fp32", "--precisionConstraints=obey"])
def test_strong_mode_refuses_weak_typing_flags(flag):
    with pytest.raises(BadInputError, match="stronglyTyped"):
        trtexec_command("m.onnx", PrecisionPlan(), mode="strong", extra=[flag])


@pytest.mark.parametrize(("mode", "flag"), [("weak", "--stronglyTyped"), ("weak", "--fp16"),
                                            ("strong", "--onnx=x.onnx"), ("weak", "--saveEngine=e")])
def test_extra_cannot_repeat_or_contradict_our_flags(mode, flag):
    with pytest.raises(BadInputError):
        trtexec_command("m.onnx", PrecisionPlan(), mode=mode, extra=[flag])


def test_bad_arguments():
    with pytest.raises(BadInputError):
        trtexec_command("", PrecisionPlan(), mode="weak")
    with pytest.raises(BadInputError):
        trtexec_command("m.onnx", PrecisionPlan(), mode="fast")  # type: ignore[arg-type]
    with pytest.raises(BadInputError):
        layer_precision_spec(NAFNET_PLAN, precision="float32")


def test_format_command_round_trips_awkward_names_and_paths():
    plan = PrecisionPlan({
        f"{SCA}/CumSum": "r",
        "/blk 0/sca:attn/CumSum": "r",
        'ns::Mul "q"': "r",
        "$HOME/`x`;rm -rf/Div": "r",
    })
    argv = trtexec_command(
        "/tmp/my models/it's.onnx", plan, mode="weak", engine_path="out dir/e \"1\".plan",
        extra=["--shapes=input:1x3x64x64", "--exportLayerInfo=a b.json"],
    )
    line = format_command(argv)
    assert shlex.split(line) == argv
    spec = argv[4].split("=", 1)[1]
    assert parse_layer_precision_spec(spec) == {name: "fp32" for name in plan.fp32_nodes}
    assert "\n" not in line


def test_format_command_quotes_only_what_needs_quoting():
    assert format_command(["trtexec", "--layerPrecisions=/a/b:c:fp32,/d:fp32"]) == (
        "trtexec --layerPrecisions=/a/b:c:fp32,/d:fp32")
    assert format_command(["trtexec", "--layerPrecisions=/blk 0/x:fp32"]) == (
        "trtexec '--layerPrecisions=/blk 0/x:fp32'")


def test_shape_flags_one_shape_or_a_range():
    from onnx_fp16_rewrite.emit.trtexec import shape_flags

    same = {"x": ((1, 3, 64, 64),) * 3, "mask": ((1, 77),) * 3}
    assert shape_flags(same) == ["--shapes=mask:1x77,x:1x3x64x64"]
    ranged = {"x": ((1, 3, 32), (1, 3, 32), (2, 3, 64))}
    assert shape_flags(ranged) == ["--minShapes=x:1x3x32", "--optShapes=x:1x3x32", "--maxShapes=x:2x3x64"]
    # trtexec reads each entry's name as everything before the last ':' (like --layerPrecisions).
    (flag,) = shape_flags({"in:0": ((2, 4),) * 3})
    name, _, dims = flag.split("=", 1)[1].rpartition(":")
    assert (name, dims) == ("in:0", "2x4")
    for bad in ("a,b", "it's", ""):
        with pytest.raises(BadInputError, match="cannot be written in trtexec --shapes"):
            shape_flags({bad: ((1,),) * 3})
    assert shape_flags({}) == []


def test_command_carries_shapes_in_both_modes():
    shapes = {"x": ((2, 3, 64),) * 3}
    strong = trtexec_command("m.onnx", PrecisionPlan({}), mode="strong", shapes=shapes, engine_path="m.plan")
    assert strong == ["trtexec", "--onnx=m.onnx", "--stronglyTyped", "--shapes=x:2x3x64", "--saveEngine=m.plan"]
    weak = trtexec_command("m.onnx", NAFNET_PLAN, mode="weak", shapes=shapes)
    assert weak[-1] == "--shapes=x:2x3x64" and weak[2:4] == ["--fp16", "--precisionConstraints=obey"]
    with pytest.raises(BadInputError, match="written by trtexec_command itself"):
        trtexec_command("m.onnx", PrecisionPlan({}), mode="strong", shapes=shapes, extra=["--shapes=x:1"])


def test_dynamic_inputs():
    import onnx.parser

    from onnx_fp16_rewrite.emit.trtexec import dynamic_inputs

    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3] a, float[2, 3] b, float[2, M] c) => (float[N, 3] y) { y = Identity(a) }
    """)
    assert dynamic_inputs(model) == ["a", "c"]
