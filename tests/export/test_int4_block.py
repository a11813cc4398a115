"""INT4 block-quantized MatMul weights for TensorRT targets (deploy.md E-4, E-11): the rewrite of a per-channel
W4 weight into block form leaves the numbers unchanged and follows the block rules."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from quest_export.export.graph import blockify_int4_weights
from quest_export.export.lint import lint_model
from quest_export.recipe import load_target


def _matmul_graph(k: int, n: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.integers(-8, 8, (k, n)).astype(np.int8)  # 4-bit levels in an INT8 container, B = W^T (K, N)
    name = "unet.blk.ff.weight_quantizer"
    inits = [nh.from_array(w, f"{name}.export_w"), nh.from_array(rng.uniform(0.01, 0.1, n).astype(np.float32),
             f"{name}.export_scale"), nh.from_array(np.zeros(n, np.int8), f"{name}.export_zp"),
             nh.from_array(np.array(0.05, np.float32), "xs"), nh.from_array(np.array(0, np.int8), "xz")]  # fmt: skip
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", [f"{name}.export_w", f"{name}.export_scale", f"{name}.export_zp"],
                              ["wd"], axis=1, name="blk.ff.weight_quantizer/DequantizeLinear"),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="/unet/blk/ff/MatMul")]  # fmt: skip
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])], inits)  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def _run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("block", [64, 128])
def test_block_form_is_numerically_identical(block):
    m = _matmul_graph(256, 32)
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    before = _run(m, x)
    assert blockify_int4_weights(m, ["blk.ff"], block) == ["blk.ff"]
    inits = {i.name: i for i in m.graph.initializer}
    w = inits["unet.blk.ff.weight_quantizer.export_w"]
    assert w.data_type == TensorProto.INT4
    assert list(inits["unet.blk.ff.weight_quantizer.export_scale"].dims) == [256 // block, 32]
    dq = next(n for n in m.graph.node if n.input[0] == w.name)
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": block}
    np.testing.assert_array_equal(_run(m, x), before)  # same numbers, exactly
    onnx.checker.check_model(m, full_check=True)
    assert not [v for v in lint_model(m, load_target("gpu")).errors if v.rule_id in ("E-4", "E-3", "E-11")]


def test_ineligible_shapes_keep_the_int8_container():
    m = _matmul_graph(96, 32)  # K = 96 is not a multiple of 64
    assert blockify_int4_weights(m, ["blk.ff"], 64) == []
    m = _matmul_graph(128, 31)  # odd N cannot be packed two per byte
    assert blockify_int4_weights(m, ["blk.ff"], 64) == []
    w = next(i for i in m.graph.initializer if i.name.endswith("export_w"))
    assert w.data_type == TensorProto.INT8
