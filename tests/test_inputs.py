import numpy as np
import pytest

from conftest import parse_named
from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.io.inputs import check_feed, generate_feeds, load_feeds, parse_shapes, save_polygraphy_json

MODEL = parse_named("""<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,H,W] x, int64[2] idx) => (float[1,3,H,W] y) { y = Relu(x) }""")


def test_parse_shapes():
    assert parse_shapes(["x:1x3x8x8", "idx:2"]) == {"x": (1, 3, 8, 8), "idx": (2,)}
    with pytest.raises(BadInputError, match="bad --shape"):
        parse_shapes(["x=1x3"])


def test_generated_feeds_need_dynamic_dims():
    with pytest.raises(BadInputError, match="dynamic dims"):
        generate_feeds(MODEL)
    feed = generate_feeds(MODEL, {"x": (1, 3, 8, 8)})[0]
    assert feed["x"].shape == (1, 3, 8, 8) and feed["x"].dtype == np.float32
    assert 0 <= feed["x"].min() and feed["x"].max() < 1
    assert feed["idx"].dtype == np.int64
    with pytest.raises(BadInputError, match="has shape"):
        generate_feeds(MODEL, {"x": (1, 4, 8, 8)})


def test_npz_and_polygraphy_json_round_trip(tmp_path):
    feeds = [{"x": np.ones((1, 3, 4, 4), np.float32), "idx": np.array([1, 2], np.int64)},
             {"x": np.zeros((1, 3, 4, 4), np.float32), "idx": np.array([0, 0], np.int64)}]
    save_polygraphy_json(feeds, tmp_path / "in.json")
    loaded = load_feeds(tmp_path / "in.json", MODEL)
    assert len(loaded) == 2 and np.array_equal(loaded[1]["x"], feeds[1]["x"])
    np.savez(tmp_path / "a.npz", **feeds[0])
    (tmp_path / "dir").mkdir()
    np.savez(tmp_path / "dir" / "0.npz", **feeds[0])
    np.savez(tmp_path / "dir" / "1.npz", **feeds[1])
    assert len(load_feeds(tmp_path / "a.npz", MODEL)) == 1
    assert len(load_feeds(tmp_path / "dir", MODEL)) == 2


@pytest.mark.parametrize(
    "feed,message",
    [
        ({"x": np.ones((1, 3, 4, 4), np.float32), "idx": np.ones(2, np.int64), "z": np.ones(1)}, "unknown input 'z'"),
        ({"x": np.ones((1, 3, 4, 4), np.float32)}, "missing input 'idx'"),
        ({"x": np.ones((1, 3, 4, 4), np.float64), "idx": np.ones(2, np.int64)}, "dtype float64"),
        ({"x": np.ones((3, 4, 4), np.float32), "idx": np.ones(2, np.int64)}, "has shape"),
    ],
)
def test_bad_inputs_files(tmp_path, feed, message):
    np.savez(tmp_path / "bad.npz", **feed)
    with pytest.raises(BadInputError, match=message):
        load_feeds(tmp_path / "bad.npz", MODEL)


def test_not_an_inputs_file(tmp_path):
    (tmp_path / "in.json").write_text("{not json")
    with pytest.raises(BadInputError, match="cannot read"):
        load_feeds(tmp_path / "in.json", MODEL)
    (tmp_path / "in.txt").write_text("x")
    with pytest.raises(BadInputError, match="must be .npz"):
        load_feeds(tmp_path / "in.txt", MODEL)


DYNAMIC = parse_named("""<ir_version: 8, opset_import: ["" : 17]>
g (float[-1,3,0,W] x, int64[batch,seq] ids, int64[batch,seq] mask) => (float[-1,3,0,W] y) { y = Relu(x) }""")


def test_minus_one_and_zero_dims_accept_any_size():
    feed = {"x": np.ones((1, 3, 48, 192), np.float32), "ids": np.ones((2, 7), np.int64),
            "mask": np.ones((2, 7), np.int64)}
    check_feed(feed, DYNAMIC, "x.npz")
    with pytest.raises(BadInputError, match=r"has shape \[1, 4, 48, 192\], the model wants \[\?,3,\?,W\]"):
        check_feed({**feed, "x": np.ones((1, 4, 48, 192), np.float32)}, DYNAMIC, "x.npz")


def test_named_dims_must_agree_across_inputs():
    feed = {"x": np.ones((1, 3, 4, 4), np.float32), "ids": np.ones((2, 7), np.int64),
            "mask": np.ones((2, 8), np.int64)}
    with pytest.raises(BadInputError, match="'mask' has seq=8 where another input has seq=7"):
        check_feed(feed, DYNAMIC, "x.npz")


def test_shape_hint_covers_every_dynamic_input_and_is_accepted():
    with pytest.raises(BadInputError) as info:
        generate_feeds(DYNAMIC)
    hint = str(info.value).split("give --shape ")[1].split(" ")[0]
    assert hint == "x:1x3x64x64,ids:1x64,mask:1x64"  # one size per dim name
    feed = generate_feeds(DYNAMIC, parse_shapes([hint]))[0]
    assert feed["x"].shape == (1, 3, 64, 64) and feed["mask"].shape == (1, 64)
