"""NewInitializers: the name index an analysis-graph build asks instead of scanning its list."""

import numpy as np
from onnx import numpy_helper

from onnx_fp16_rewrite.emulation.new_initializers import NewInitializers, find


def _t(name, v):
    return numpy_helper.from_array(np.array([v], np.int64), name)


def test_every_way_of_adding_is_indexed_and_the_first_of_a_name_is_found():
    inits = NewInitializers([_t("a", 1)])
    inits.append(_t("b", 2))
    inits.extend([_t("c", 3)])
    inits += [_t("d", 4), _t("a", 5)]
    assert [i.name for i in inits] == ["a", "b", "c", "d", "a"]
    assert [int(numpy_helper.to_array(find(inits, n))[0]) for n in "abcd"] == [1, 2, 3, 4]
    assert find(inits, "e") is None


def test_a_plain_list_is_scanned_alike():
    plain = [_t("a", 1), _t("b", 2), _t("a", 3)]
    assert int(numpy_helper.to_array(find(plain, "a"))[0]) == 1 and find(plain, "z") is None
