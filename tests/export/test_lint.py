"""Target rule checker (quest_export.export.lint): every rule fires on a small bad graph, and a correct
UNet-like QDQ graph passes for every target profile and really loads and runs in ONNX Runtime."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quest_export.errors import ExportError, InputError
from quest_export.export import lint
from quest_export.export.lint import RULES, LintReport, Violation, lint_model
from quest_export.export.lint.cli import main
from quest_export.recipe import list_targets, load_target

TARGETS = list_targets()
TRT_TARGETS = [t for t in TARGETS if load_target(t).is_tensorrt]
INT4_TARGETS = [t for t in TARGETS if {"int4-weight", "int4-gemm"} & set(load_target(t).quantized_types)]
CHANNELS = 64  # a multiple of the INT4 block (64) so the MatMul's K fits E-4
SIDE = 4  # latent height = width
BATCH = 2
GROUPS = 8
ACT_SCALE = 0.05
INT4_BLOCK = 64

# -- a small UNet-like QDQ graph per target ----------------------------------------------------------------------


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}.out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def act_qdq(self, x: str, prefix: str, *, scale: float = ACT_SCALE) -> str:
        """Per-tensor INT8 activation Q -> DQ (E-2), zero point 0 (E-1)."""
        s = self.init(f"{prefix}.input_scale", np.float32(scale))
        z = self.init(f"{prefix}.input_zp", np.int8(0))
        q = self.node("QuantizeLinear", [x, s, z], f"{prefix}.input_q")
        return self.node("DequantizeLinear", [q, s, z], f"{prefix}.input_dq")

    def weight_dq(self, prefix: str, w_int: np.ndarray, scale: np.ndarray, *, axis: int, block: int = 0) -> str:
        """Integer initializer -> DequantizeLinear (E-7); INT4 without zero point, INT8 with zeros."""
        w = self.init(f"{prefix}.weight", w_int)
        s = self.init(f"{prefix}.weight_scale", scale.astype(np.float32))
        inputs = [w, s]
        if w_int.dtype == np.int8:
            inputs.append(self.init(f"{prefix}.weight_zp", np.zeros(scale.shape, np.int8)))
        attrs = {"axis": axis} | ({"block_size": block} if block else {})
        return self.node("DequantizeLinear", inputs, f"{prefix}.weight_dq", **attrs)


def _weights(rng: np.random.Generator, shape: tuple[int, ...], *, bits: int, int4: bool) -> np.ndarray:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    w = rng.integers(lo, hi + 1, size=shape).astype(np.int8)
    return w.astype(ml_dtypes.int4) if int4 else w


def build_unet(
    target_id: str,
    *,
    int4: bool = False,
    w4: bool = False,
    a4: bool = False,
    channels: int = CHANNELS,
    time_linear: bool = False,
) -> tuple[onnx.ModelProto, list[dict]]:
    """A correct QDQ graph for ``target_id`` and its manifest layer list (formats.md graph contract).

    sample -> Q/DQ -> Conv(down.conv1) -> + time embedding -> GroupNorm -> SiLU -> [Clip] -> Q/DQ -> Conv(down.conv2)
    -> + sample -> Reshape/Transpose -> Q/DQ -> MatMul(mid.proj, const weight) + bias -> back -> + skip -> noise_pred.
    GroupNorm, SiLU and the adds stay unquantized (E-18).

    Args:
        int4: true INT4 weights (cpu: per-channel convs + block MatMul; TensorRT: INT8 container convs + block
            INT4 MatMul, E-8/E-11), at opset 21 / IR 10.
        w4: 4-bit weights in INT8 containers (E-8). a4: A4 on down.conv2 with the E-9b Clip.
        time_linear: a quantized Gemm (transB=1) in the time embedding, GEMV-shaped (E-19).
    """
    target = load_target(target_id)
    cpu_int4 = int4 and not target.is_tensorrt
    opset = target.int4_opset if int4 else target.max_opset
    ir = max(target.ir_version, helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))
    rng = np.random.default_rng(0)
    c, b = channels, _GraphBuilder()
    w_bits = 4 if (int4 or w4) else 8

    def conv(x: str, prefix: str) -> str:
        w = _weights(rng, (c, c, 3, 3), bits=w_bits, int4=cpu_int4)
        wq = b.weight_dq(prefix, w, rng.uniform(1e-3, 1e-2, c), axis=0)  # E-3: Conv axis 0
        bias = b.init(f"{prefix}.bias", rng.normal(0, 0.1, c).astype(np.float32))
        return b.node("Conv", [x, wq, bias], prefix, pads=[1, 1, 1, 1])

    h1 = conv(b.act_qdq("sample", "down.conv1"), "down.conv1")
    # time embedding (FP): timestep [batch] -> sin(t * f) [batch, C] -> [batch, C, 1, 1]
    t = b.node("Unsqueeze", ["timestep", b.init("time.axes1", np.array([1], np.int64))], "time.unsqueeze")
    t = b.node("Mul", [t, b.init("time.freq", rng.uniform(0, 1, (1, c)).astype(np.float32))], "time.mul")
    t = b.node("Sin", [t], "time.sin")
    if time_linear:
        wq = b.weight_dq("time.linear", _weights(rng, (c, c), bits=8, int4=False), rng.uniform(1e-3, 1e-2, c), axis=0)
        bias = b.init("time.linear.bias", np.zeros(c, np.float32))
        t = b.node("Gemm", [b.act_qdq(t, "time.linear"), wq, bias], "time.linear", transB=1)  # E-3: [N, K], axis 0
    t = b.node("Unsqueeze", [t, b.init("time.axes23", np.array([2, 3], np.int64))], "time.unsqueeze2")
    h2 = b.node("Add", [h1, t], "down.temb_add")
    # GroupNorm: GroupNormalization-21 at opset 21; below, the InstanceNormalization form torch exports
    # (GroupNormalization-18 is deprecated, and TensorRT imports GroupNormalization only from 10.9)
    if opset >= 21:
        gn_s = b.init("down.norm.scale", np.ones(c, np.float32))
        gn_b = b.init("down.norm.bias", np.zeros(c, np.float32))
        h3 = b.node("GroupNormalization", [h2, gn_s, gn_b], "down.norm", num_groups=GROUPS, epsilon=1e-5)
    else:
        g = b.node("Reshape", [h2, b.init("down.norm.grouped", np.array([0, GROUPS, -1], np.int64))], "down.norm.r1")
        ones, zeros = np.ones(GROUPS, np.float32), np.zeros(GROUPS, np.float32)
        g = b.node("InstanceNormalization", [g, b.init("down.norm.s", ones), b.init("down.norm.b", zeros)], "down.norm")
        h3 = b.node("Reshape", [g, b.init("down.norm.back", np.array([0, c, SIDE, SIDE], np.int64))], "down.norm.r2")
    h4 = b.node("Mul", [h3, b.node("Sigmoid", [h3], "down.act.sigmoid")], "down.act")
    if a4:  # E-9b: Clip to [-8 s, 7 s] before the INT8 Q with the 4-bit scale
        s = np.float32(ACT_SCALE)
        lo, hi = b.init("down.conv2.clip_min", np.float32(-8) * s), b.init("down.conv2.clip_max", np.float32(7) * s)
        h4 = b.node("Clip", [h4, lo, hi], "down.conv2.input_clip")
    h5 = conv(b.act_qdq(h4, "down.conv2"), "down.conv2")
    h6 = b.node("Add", [h5, "sample"], "down.residual")
    # a linear layer on the sequence view [batch, H*W, C]: MatMul with constant B [K, N]
    x = b.node("Reshape", [h6, b.init("mid.seq_shape", np.array([0, c, -1], np.int64))], "mid.to_seq.reshape")
    x = b.node("Transpose", [x], "mid.to_seq", perm=[0, 2, 1])
    if int4:  # E-4: INT4 block 64 along K (axis 0 of [K, N]); scale [K / block, N]
        w = _weights(rng, (c, c), bits=4, int4=True)
        wq = b.weight_dq("mid.proj", w, rng.uniform(1e-3, 1e-2, (c // INT4_BLOCK, c)), axis=0, block=INT4_BLOCK)
    else:
        w = _weights(rng, (c, c), bits=w_bits, int4=False)
        wq = b.weight_dq("mid.proj", w, rng.uniform(1e-3, 1e-2, c), axis=1)  # E-3: MatMul axis 1
    x = b.node("MatMul", [b.act_qdq(x, "mid.proj"), wq], "mid.proj")
    x = b.node("Add", [x, b.init("mid.proj.bias", np.zeros(c, np.float32))], "mid.proj.bias_add")
    x = b.node("Transpose", [x], "mid.from_seq", perm=[0, 2, 1])
    x = b.node("Reshape", [x, b.init("mid.img_shape", np.array([0, c, SIDE, SIDE], np.int64))], "mid.from_seq.reshape")
    b.nodes.append(helper.make_node("Add", [x, h6], ["noise_pred"], name="mid.residual"))

    graph = helper.make_graph(
        b.nodes,
        f"unet_{target_id}",
        [
            helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", c, SIDE, SIDE]),
            helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"]),
        ],
        [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, ["batch", c, SIDE, SIDE])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir  # E-13: explicit, never make_model's 14
    conv_storage = "int4" if cpu_int4 else ("int8-container" if w_bits == 4 else "int8")
    layers = [
        {"name": "down.conv1", "kind": "conv", "w_bits": w_bits, "a_bits": 8, "storage": conv_storage},
        {
            "name": "down.conv2",
            "kind": "conv",
            "w_bits": w_bits,
            "a_bits": 4 if a4 else 8,
            "storage": conv_storage,
            "a_storage": "int8-clip" if a4 else "int8",
        },
        {
            "name": "mid.proj",
            "kind": "linear",
            "w_bits": w_bits,
            "a_bits": 8,
            "storage": "int4-block" if int4 else conv_storage,
        },
    ]
    return model, layers


# -- graph surgery for the bad graphs ----------------------------------------------------------------------------


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def set_init(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    tensors = model.graph.initializer
    idx = next(i for i, t in enumerate(tensors) if t.name == name)
    tensors[idx].CopyFrom(numpy_helper.from_array(np.asarray(array), name))


def add_init(model: onnx.ModelProto, name: str, array: np.ndarray) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    return name


def set_attr(n: onnx.NodeProto, name: str, value) -> None:
    keep = [a for a in n.attribute if a.name != name]
    del n.attribute[:]
    n.attribute.extend(keep + ([helper.make_attribute(name, value)] if value is not None else []))


def insert_before(model: onnx.ModelProto, consumer: str, *new: onnx.NodeProto) -> None:
    """Insert nodes right before ``consumer`` (keeps the node list topologically sorted)."""
    idx = next(i for i, n in enumerate(model.graph.node) if n.name == consumer)
    for k, n in enumerate(new):
        model.graph.node.insert(idx + k, n)


def rewire(model: onnx.ModelProto, consumer: str, old: str, new: str) -> None:
    n = node(model, consumer)
    for i, name in enumerate(n.input):
        if name == old:
            n.input[i] = new


def insert_qdq(model: onnx.ModelProto, tensor: str, consumer: str, prefix: str, *, scale: float = ACT_SCALE) -> None:
    """Q -> DQ on the edge ``tensor`` -> ``consumer``."""
    s, z = add_init(model, f"{prefix}.s", np.float32(scale)), add_init(model, f"{prefix}.z", np.int8(0))
    q = helper.make_node("QuantizeLinear", [tensor, s, z], [f"{prefix}.q.out"], name=f"{prefix}.q")
    dq = helper.make_node("DequantizeLinear", [f"{prefix}.q.out", s, z], [f"{prefix}.dq.out"], name=f"{prefix}.dq")
    insert_before(model, consumer, q, dq)
    rewire(model, consumer, tensor, f"{prefix}.dq.out")


def run_lint(model: onnx.ModelProto, target_id: str, layers: list[dict] | None = None) -> LintReport:
    return lint_model(model, load_target(target_id), quantized_layers=layers)


def hits(report: LintReport, rule_id: str, *, severity: str = "error") -> list[Violation]:
    found = report.errors if severity == "error" else report.warnings
    return [v for v in found if v.rule_id == rule_id]


def assert_fires(report: LintReport, rule_id: str, node_name: str, *, severity: str = "error", text: str = "") -> None:
    found = [v for v in hits(report, rule_id, severity=severity) if v.node == node_name]
    assert found, f"{rule_id} ({severity}) did not fire at {node_name}:\n{report.format_text()}"
    assert all(rule_id in str(v) and node_name in str(v) and v.fix for v in found)
    if text:
        assert any(text in v.message for v in found), f"no {rule_id} message contains {text!r}: {found}"


def assert_silent(report: LintReport, rule_id: str, *, severity: str = "error") -> None:
    assert not hits(report, rule_id, severity=severity), report.format_text()


# -- correct graphs pass, and are real graphs ----------------------------------------------------------------------

GOOD_VARIANTS = (
    [(t, {}) for t in TARGETS]
    + [(t, {"int4": True}) for t in INT4_TARGETS]
    + [(t, {"w4": True, "a4": True}) for t in TARGETS]
)


def _variant_id(v: tuple[str, dict]) -> str:
    return "-".join([v[0], *v[1]]) if v[1] else v[0]


@pytest.mark.parametrize("variant", GOOD_VARIANTS, ids=_variant_id)
def test_good_graph_passes_every_rule(variant):
    target_id, knobs = variant
    model, layers = build_unet(target_id, **knobs)
    report = run_lint(model, target_id, layers)
    assert report.ok and not report.warnings, report.format_text()


@pytest.mark.parametrize("variant", GOOD_VARIANTS, ids=_variant_id)
def test_good_graph_runs_in_onnxruntime(variant):
    target_id, knobs = variant
    model, _ = build_unet(target_id, **knobs)
    onnx.checker.check_model(model, full_check=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        model.SerializeToString(),
        so,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=["QDQPropagationTransformer"],
    )
    rng = np.random.default_rng(1)
    feed = {
        "sample": rng.normal(size=(BATCH, CHANNELS, SIDE, SIDE)).astype(np.float32),
        "timestep": np.array([999.0, 1.0], np.float32),
    }
    (out,) = sess.run(["noise_pred"], feed)
    assert out.shape == (BATCH, CHANNELS, SIDE, SIDE) and np.isfinite(out).all()


def test_good_int4_graph_really_holds_int4():
    model, _ = build_unet("cpu", int4=True)
    assert init(model, "down.conv1.weight").dtype == ml_dtypes.int4
    assert init(model, "mid.proj.weight").dtype == ml_dtypes.int4
    assert model.opset_import[0].version == 21 and model.ir_version == 10


# -- E-12 / E-13: opset and IR version ---------------------------------------------------------------------------


def test_E12_opset_above_target_cap():
    model, _ = build_unet("jetson-orin-jp51")
    model.opset_import[0].version = 18
    assert_fires(run_lint(model, "jetson-orin-jp51"), "E-12", lint.MODEL, text="above the cap 17")


def test_E12_jp61_allows_opset21_only_with_int4():
    model, _ = build_unet("jetson-orin-jp61")
    model.opset_import[0].version, model.ir_version = 21, 10
    assert_fires(run_lint(model, "jetson-orin-jp61"), "E-12", lint.MODEL, text="only for graphs with INT4 DQ")
    int4_model, _ = build_unet("jetson-orin-jp61", int4=True)
    assert_silent(run_lint(int4_model, "jetson-orin-jp61"), "E-12")
    assert_silent(run_lint(int4_model, "jetson-orin-jp61"), "E-13")


def test_E12_int4_needs_opset21():
    model, _ = build_unet("cpu", int4=True)
    model.opset_import[0].version, model.ir_version = 20, 9
    assert_fires(run_lint(model, "cpu"), "E-12", lint.MODEL, text="need opset 21")


def test_E12_missing_default_domain_opset():
    model, _ = build_unet("cpu")
    model.opset_import[0].domain = "com.example"
    assert_fires(run_lint(model, "cpu"), "E-12", lint.MODEL, text="no default-domain")


@pytest.mark.parametrize(
    ("target_id", "ir", "text"),
    [
        ("cpu", 0, "not set"),
        ("cpu", 14, "above 13"),
        ("gpu", 14, "above 13"),
        ("jetson-orin-jp51", 9, "above 8"),
        ("jetson-orin-jp61", 10, "above 9"),
        ("cpu", 9, "older than opset 21"),
    ],
)
def test_E13_ir_version(target_id, ir, text):
    model, _ = build_unet(target_id)
    model.ir_version = ir
    assert_fires(run_lint(model, target_id), "E-13", lint.MODEL, text=text)


# -- E-1: symmetric, signed ----------------------------------------------------------------------------------------


def test_E1_nonzero_zero_point_on_tensorrt_only():
    model, _ = build_unet("gpu")
    zp = init(model, "down.conv1.weight_zp").copy()
    zp[3] = 2
    set_init(model, "down.conv1.weight_zp", zp)
    assert_fires(run_lint(model, "gpu"), "E-1", "down.conv1.weight_dq", text="1 non-zero value")
    assert_silent(run_lint(model, "cpu"), "E-1")  # asymmetric grids are allowed on ONNX Runtime


@pytest.mark.parametrize("target_id", TRT_TARGETS)
def test_E1_uint8_zero_point_on_tensorrt(target_id):
    model, _ = build_unet(target_id)
    set_init(model, "down.conv2.input_zp", np.uint8(0))
    report = run_lint(model, target_id)
    assert_fires(report, "E-1", "down.conv2.input_q", text="UINT8")
    assert_fires(report, "E-1", "down.conv2.input_dq", text="UINT8")


def test_E1_uint8_zero_point_is_fine_on_cpu():
    model, _ = build_unet("cpu")
    set_init(model, "down.conv2.input_zp", np.uint8(128))
    assert_silent(run_lint(model, "cpu"), "E-1")


def test_E1_quantize_without_zero_point_outputs_uint8():
    model, _ = build_unet("jetson-orin-jp60")
    del node(model, "mid.proj.input_q").input[2]
    assert_fires(run_lint(model, "jetson-orin-jp60"), "E-1", "mid.proj.input_q", text="outputs UINT8")


def test_E1_unsigned_tensor_elsewhere():
    model, _ = build_unet("gpu")
    cast = helper.make_node("Cast", ["down.residual.out"], ["debug.u8"], name="debug.to_u8", to=TensorProto.UINT8)
    model.graph.node.append(cast)
    assert_fires(run_lint(model, "gpu"), "E-1", "debug.to_u8", text="UINT8")
    assert_silent(run_lint(model, "cpu"), "E-1")


# -- E-2: activation scales ----------------------------------------------------------------------------------------


def test_E2_per_axis_activation_scale_on_tensorrt_only():
    model, _ = build_unet("gpu")
    set_init(model, "down.conv1.input_scale", np.full(CHANNELS, ACT_SCALE, np.float32))
    set_init(model, "down.conv1.input_zp", np.zeros(CHANNELS, np.int8))
    for name in ("down.conv1.input_q", "down.conv1.input_dq"):
        set_attr(node(model, name), "axis", 1)
    report = run_lint(model, "gpu")
    assert_fires(report, "E-2", "down.conv1.input_q", text="per-axis")
    assert_fires(report, "E-2", "down.conv1.input_dq", text="per-axis")
    assert_silent(run_lint(model, "cpu"), "E-2")  # per-channel A4 is an ONNX Runtime option


@pytest.mark.parametrize("source", ["graph-input", "computed"])
def test_E2_scale_computed_at_run_time(source):
    model, _ = build_unet("jetson-orin-jp61")
    model.graph.input.append(helper.make_tensor_value_info("act_scale_ratios", TensorProto.FLOAT, [1]))
    scale = "act_scale_ratios"
    if source == "computed":
        base = add_init(model, "s_ref", np.float32(ACT_SCALE))
        mul = helper.make_node("Mul", ["act_scale_ratios", base], ["s_dyn"], name="scale.mul")
        insert_before(model, "down.conv2.input_q", mul)
        scale = "s_dyn"
    node(model, "down.conv2.input_q").input[1] = scale
    text = "graph input" if source == "graph-input" else "scale.mul"
    assert_fires(run_lint(model, "jetson-orin-jp61"), "E-2", "down.conv2.input_q", text=text)
    assert_fires(run_lint(model, "cpu"), "E-2", "down.conv2.input_q", text=text)


def test_E2_multiply_between_dq_and_conv():
    model, _ = build_unet("gpu")
    r = add_init(model, "r_g", np.float32(1.5))
    mul = helper.make_node("Mul", ["down.conv2.input_dq.out", r], ["scaled"], name="down.conv2.ratio")
    insert_before(model, "down.conv2", mul)
    rewire(model, "down.conv2", "down.conv2.input_dq.out", "scaled")
    assert_fires(run_lint(model, "gpu"), "E-2", "down.conv2", text="down.conv2.ratio")


# -- E-3: weight axes -------------------------------------------------------------------------------------------


def test_E3_conv_weight_dq_without_axis_defaults_to_axis1():
    model, _ = build_unet("jetson-thor-jp7")
    set_attr(node(model, "down.conv1.weight_dq"), "axis", None)
    assert_fires(run_lint(model, "jetson-thor-jp7"), "E-3", "down.conv1.weight_dq", text="axis 1")


def test_E3_scale_length_differs_from_channels():
    model, _ = build_unet("cpu")
    set_init(model, "down.conv2.weight_scale", np.full(CHANNELS // 2, 0.01, np.float32))
    set_init(model, "down.conv2.weight_zp", np.zeros(CHANNELS // 2, np.int8))
    assert_fires(run_lint(model, "cpu"), "E-3", "down.conv2.weight_dq", text="channels on axis 0")


def test_E3_matmul_weight_axis():
    model, _ = build_unet("gpu")
    set_attr(node(model, "mid.proj.weight_dq"), "axis", 0)
    assert_fires(run_lint(model, "gpu"), "E-3", "mid.proj.weight_dq", text="output channels are axis 1")


def test_E3_gemm_transb_axis():
    model, _ = build_unet("cpu", time_linear=True)
    assert_silent(run_lint(model, "cpu"), "E-3")
    set_attr(node(model, "time.linear.weight_dq"), "axis", 1)
    assert_fires(run_lint(model, "cpu"), "E-3", "time.linear.weight_dq", text="output channels are axis 0")


# -- E-4: INT4 blocks ---------------------------------------------------------------------------------------------


def _reblock(model: onnx.ModelProto, block: int, scale_shape: tuple[int, ...]) -> None:
    set_attr(node(model, "mid.proj.weight_dq"), "block_size", block)
    set_attr(node(model, "mid.proj.weight_dq"), "axis", 0)
    set_init(model, "mid.proj.weight_scale", np.full(scale_shape, 0.01, np.float32))


def test_E4_block_quantized_conv():
    model, _ = build_unet("cpu", int4=True)
    set_attr(node(model, "down.conv1.weight_dq"), "block_size", 64)
    assert_fires(run_lint(model, "cpu"), "E-4", "down.conv1.weight_dq", text="feeds Conv")


@pytest.mark.parametrize(
    ("edit", "text"),
    [
        (lambda m: _reblock(m, 32, (2, CHANNELS)), "block_size 32"),
        (lambda m: _reblock(m, 128, (1, CHANNELS)), "not divisible"),
        (lambda m: _reblock(m, 64, (CHANNELS, 1)), "scale shape"),
        (lambda m: set_attr(node(m, "mid.proj.weight_dq"), "axis", 1), "blocked along axis 1"),
    ],
    ids=["block32", "k-not-divisible", "scale-shape", "axis-not-k"],
)
def test_E4_block_rules(edit, text):
    model, _ = build_unet("gpu", int4=True)
    edit(model)
    assert_fires(run_lint(model, "gpu"), "E-4", "mid.proj.weight_dq", text=text)


def test_E4_odd_last_dimension():
    model, _ = build_unet("cpu", int4=True)
    set_init(model, "mid.proj.weight", np.zeros((CHANNELS, CHANNELS - 1), ml_dtypes.int4))
    set_init(model, "mid.proj.weight_scale", np.full((1, CHANNELS - 1), 0.01, np.float32))
    assert_fires(run_lint(model, "cpu"), "E-4", "mid.proj.weight_dq", text="odd")


def test_E4_int8_block_on_tensorrt():
    model, _ = build_unet("gpu")
    _reblock(model, 64, (1, CHANNELS))
    assert_fires(run_lint(model, "gpu"), "E-4", "mid.proj.weight_dq", text="only INT4")
    assert_silent(run_lint(model, "cpu"), "E-4")


# -- E-6: scale values -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -0.01, np.inf, np.nan])
def test_E6_scale_not_positive_finite(bad):
    model, _ = build_unet("jetson-orin-jp60")
    s = init(model, "down.conv2.weight_scale").copy()
    s[5] = bad
    set_init(model, "down.conv2.weight_scale", s)
    assert_fires(run_lint(model, "jetson-orin-jp60"), "E-6", "down.conv2.weight_dq", text="at index [5]")


def test_E6_fp16_scale_below_normal_range():
    model, _ = build_unet("jetson-thor-jp7")
    set_init(model, "down.conv1.input_scale", np.float16(1e-6))
    assert_fires(run_lint(model, "jetson-thor-jp7"), "E-6", "down.conv1.input_q", text="FP16 normal range")
    set_init(model, "down.conv1.input_scale", np.float16(2.0**-14))
    assert_silent(run_lint(model, "jetson-thor-jp7"), "E-6")


# -- E-7: constants are initializers --------------------------------------------------------------------------------


def test_E7_scale_from_constant_node():
    model, _ = build_unet("cpu")
    const = helper.make_node(
        "Constant", [], ["c_scale"], name="c_scale_node", value=numpy_helper.from_array(np.float32(ACT_SCALE))
    )
    insert_before(model, "down.conv1.input_q", const)
    node(model, "down.conv1.input_q").input[1] = "c_scale"
    assert_fires(run_lint(model, "cpu"), "E-7", "down.conv1.input_q", text="Constant node 'c_scale_node'")


def test_E7_weight_quantized_in_graph():
    model, _ = build_unet("gpu")
    w = init(model, "down.conv2.weight").astype(np.float32) * 0.01
    add_init(model, "down.conv2.weight_float", w)
    q = helper.make_node(
        "QuantizeLinear",
        ["down.conv2.weight_float", "down.conv2.weight_scale", "down.conv2.weight_zp"],
        ["w_q"],
        name="down.conv2.weight_q",
        axis=0,
    )
    insert_before(model, "down.conv2.weight_dq", q)
    node(model, "down.conv2.weight_dq").input[0] = "w_q"
    assert_fires(run_lint(model, "gpu"), "E-7", "down.conv2.weight_dq", text="intermediate form")


def test_E7_initializer_listed_as_graph_input():
    model, _ = build_unet("cpu")
    model.graph.input.append(helper.make_tensor_value_info("down.conv1.weight_scale", TensorProto.FLOAT, [CHANNELS]))
    assert_fires(run_lint(model, "cpu"), "E-7", "down.conv1.weight_dq", text="graph input")


def test_E7_conv_weight_computed_on_tensorrt():
    model, _ = build_unet("jetson-orin-jp61")
    ident = helper.make_node("Identity", ["down.conv2.weight_dq.out"], ["w_copy"], name="down.conv2.weight_copy")
    insert_before(model, "down.conv2", ident)
    rewire(model, "down.conv2", "down.conv2.weight_dq.out", "w_copy")
    assert_fires(run_lint(model, "jetson-orin-jp61"), "E-7", "down.conv2", text="down.conv2.weight_copy")
    assert_silent(run_lint(model, "cpu"), "E-7")


def _fp8_matmul_weight(model: onnx.ModelProto) -> None:
    w = init(model, "mid.proj.weight").astype(np.float32)
    set_init(model, "mid.proj.weight", w.astype(ml_dtypes.float8_e4m3fn))
    set_init(model, "mid.proj.weight_zp", np.zeros(CHANNELS, ml_dtypes.float8_e4m3fn))


def test_E7_int8_and_fp8_mixed_warns():
    model, _ = build_unet("gpu")
    _fp8_matmul_weight(model)
    report = run_lint(model, "gpu")
    assert_fires(report, "E-7", "mid.proj.weight_dq", severity="warning", text="mixes INT8")
    assert_silent(report, "B-6")  # gpu offers fp8


# -- E-8 / E-9b / E-10 / E-11: 4-bit containers and INT4 ------------------------------------------------------------


@pytest.mark.parametrize("target_id", ["gpu", "jetson-orin-jp61", "jetson-thor-jp7"])
def test_E8_int4_convolution_on_tensorrt(target_id):
    model, _ = build_unet(target_id, int4=True)
    w = init(model, "down.conv1.weight")
    set_init(model, "down.conv1.weight", w.astype(ml_dtypes.int4))
    set_init(model, "down.conv1.weight_zp", np.zeros(CHANNELS, ml_dtypes.int4))
    assert_fires(run_lint(model, target_id), "E-8", "down.conv1", text="no INT4 convolution")


def test_E8_container_values_outside_4bit_grid():
    model, layers = build_unet("jetson-orin-jp60", w4=True)
    w = init(model, "down.conv2.weight").copy()
    w[0, 0, 0, 0] = 9
    set_init(model, "down.conv2.weight", w)
    assert_fires(run_lint(model, "jetson-orin-jp60", layers), "E-8", "down.conv2", text="outside [-8, 7]")
    assert_silent(run_lint(model, "jetson-orin-jp60"), "E-8")  # needs the manifest's w_bits


def test_E9b_a4_without_clip():
    model, layers = build_unet("gpu", a4=True)
    node(model, "down.conv2.input_q").input[0] = "down.act.out"
    assert_fires(run_lint(model, "gpu", layers), "E-9b", "down.conv2.input_q", text="no Clip")


@pytest.mark.parametrize("bound", ["min", "max"])
def test_E9b_clip_bounds_must_be_exact(bound):
    model, layers = build_unet("jetson-orin-jp61", a4=True)
    name = f"down.conv2.clip_{bound}"
    v = init(model, name)
    set_init(model, name, np.nextafter(v, np.float32(0)))  # one ULP off
    assert_fires(run_lint(model, "jetson-orin-jp61", layers), "E-9b", "down.conv2.input_clip", text="not exactly")


def test_E9b_a4_layer_without_activation_qdq():
    model, layers = build_unet("gpu", a4=True)
    rewire(model, "down.conv2", "down.conv2.input_dq.out", "down.conv2.input_clip.out")
    assert_fires(run_lint(model, "gpu", layers), "E-9b", "down.conv2", text="a_bits=4")


def test_E10_declared_storage_differs_from_graph():
    model, layers = build_unet("gpu")
    layers[2]["storage"] = "int4-block"
    assert_fires(run_lint(model, "gpu", layers), "E-10", "mid.proj", text="'int4-block'")


def test_E11_int4_gemm_without_blocks_on_tensorrt():
    model, _ = build_unet("gpu", int4=True)
    set_attr(node(model, "mid.proj.weight_dq"), "block_size", None)
    set_attr(node(model, "mid.proj.weight_dq"), "axis", 1)
    set_init(model, "mid.proj.weight_scale", np.full(CHANNELS, 0.01, np.float32))
    assert_fires(run_lint(model, "gpu"), "E-11", "mid.proj", text="not block-quantized")
    assert_silent(run_lint(model, "cpu"), "E-11")


# -- E-14: op set and Q/DQ form ------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", sorted(lint.TRT_UNSUPPORTED_OPS))
def test_E14_ops_the_tensorrt_parser_lacks(op):
    model, _ = build_unet("jetson-orin-jp60")
    model.graph.node.append(helper.make_node(op, ["noise_pred"], ["extra"], name=f"bad.{op}"))
    assert_fires(run_lint(model, "jetson-orin-jp60"), "E-14", f"bad.{op}", text="not supported")
    assert_silent(run_lint(model, "cpu"), "E-14")


def test_E14_contrib_domain_op_on_tensorrt():
    model, _ = build_unet("gpu")
    model.graph.node.append(
        helper.make_node("QGemm", ["noise_pred"], ["extra"], name="bad.qgemm", domain="com.microsoft")
    )
    assert_fires(run_lint(model, "gpu"), "E-14", "bad.qgemm", text="com.microsoft::QGemm")


def test_E14_weight_dq_without_activation_qdq_warns():
    model, _ = build_unet("jetson-orin-jp51")
    rewire(model, "down.conv2", "down.conv2.input_dq.out", "down.act.out")
    report = run_lint(model, "jetson-orin-jp51")
    assert report.ok
    assert_fires(report, "E-14", "down.conv2", severity="warning", text="no activation Q->DQ")


def test_E14_activation_qdq_with_float_weight_warns():
    model, _ = build_unet("gpu")
    add_init(model, "w_float", np.zeros((CHANNELS, CHANNELS, 3, 3), np.float32))
    rewire(model, "down.conv2", "down.conv2.weight_dq.out", "w_float")
    assert_fires(run_lint(model, "gpu"), "E-14", "down.conv2", severity="warning", text="float weight")


def test_E14_unattached_qdq_pair_warns():
    model, _ = build_unet("cpu")
    insert_qdq(model, "time.sin.out", "time.unsqueeze2", "stray")
    assert_fires(run_lint(model, "cpu"), "E-14", "stray.q", severity="warning", text="not attached")
    # on TensorRT the same pair is explained by E-18 (a DQ into the timestep-embedding add)
    gpu, _ = build_unet("gpu")
    insert_qdq(gpu, "time.sin.out", "time.unsqueeze2", "stray")
    report = run_lint(gpu, "gpu")
    assert_silent(report, "E-14", severity="warning")
    assert_fires(report, "E-18", "down.temb_add", severity="warning")


def test_E14_unmatched_declared_layer_warns():
    model, layers = build_unet("gpu")
    layers.append({"name": "up_blocks.0.resnets.0.conv1", "kind": "conv", "w_bits": 4, "a_bits": 8})
    report = run_lint(model, "gpu", layers)
    assert_fires(report, "E-14", "up_blocks.0.resnets.0.conv1", severity="warning", text="E-8 not checked")


# -- B-6: types the profile offers ---------------------------------------------------------------------------------


def test_B6_int4_on_int8_only_target():
    model, _ = build_unet("jetson-thor-jp7", int4=True)
    report = run_lint(model, "jetson-orin-jp51")
    assert_fires(report, "B-6", "mid.proj.weight_dq", text="offers int8")


def test_B6_fp8_on_orin():
    model, _ = build_unet("jetson-orin-jp61")
    _fp8_matmul_weight(model)
    assert_fires(run_lint(model, "jetson-orin-jp61"), "B-6", "mid.proj.weight_dq", text="FLOAT8E4M3FN")


def test_B6_int4_activation_on_tensorrt_only():
    model, _ = build_unet("gpu", int4=True)
    set_init(model, "down.conv2.input_zp", np.zeros((), ml_dtypes.int4))
    assert_fires(run_lint(model, "gpu"), "B-6", "down.conv2.input_q", text="INT8 container")
    cpu_model, _ = build_unet("cpu", int4=True)
    set_init(cpu_model, "down.conv2.input_zp", np.zeros((), ml_dtypes.int4))
    assert run_lint(cpu_model, "cpu").ok  # native A4 on ONNX Runtime


def test_B6_int16_qdq_on_tensorrt():
    model, _ = build_unet("gpu")
    set_init(model, "mid.proj.input_zp", np.int16(0))
    assert_fires(run_lint(model, "gpu"), "B-6", "mid.proj.input_q", text="16-bit")


# -- warnings E-15 ... E-20 --------------------------------------------------------------------------------------


def test_E15_qdq_on_conv_output():
    model, _ = build_unet("jetson-orin-jp61")
    insert_qdq(model, "down.conv1.out", "down.temb_add", "conv1_out")
    report = run_lint(model, "jetson-orin-jp61")
    assert_fires(report, "E-15", "conv1_out.q", severity="warning", text="down.conv1")
    assert len(report.warnings) == 1, report.format_text()  # not repeated as E-14/E-16/E-18
    cpu, _ = build_unet("cpu")
    insert_qdq(cpu, "down.conv1.out", "down.temb_add", "conv1_out")
    assert not run_lint(cpu, "cpu").warnings  # output Q/DQ is the ort-int8-fused placement (E-22)


def _scale_after_conv2(model: onnx.ModelProto) -> None:
    """conv2 -> Mul(r) -> residual Add, as in scale-input mode."""
    r = add_init(model, "down.conv2.r", np.float32(1.0))
    mul = helper.make_node("Mul", ["down.conv2.out", r], ["down.conv2.scaled"], name="down.conv2.rescale")
    insert_before(model, "down.residual", mul)
    rewire(model, "down.residual", "down.conv2.out", "down.conv2.scaled")


def test_E16_dq_on_conv_branch_of_residual_add():
    model, _ = build_unet("gpu")
    _scale_after_conv2(model)
    insert_qdq(model, "down.conv2.scaled", "down.residual", "branch")
    report = run_lint(model, "gpu")
    assert_fires(report, "E-16", "down.residual", severity="warning", text="non-residual branch")
    assert_silent(report, "E-18", severity="warning")


def test_E16_skip_input_only_is_residual_int8_mode():
    model, _ = build_unet("gpu")
    _scale_after_conv2(model)
    insert_qdq(model, "sample", "down.residual", "skip")
    report = run_lint(model, "gpu")
    assert_silent(report, "E-16", severity="warning")
    assert_fires(report, "E-18", "down.residual", severity="warning", text="residual-int8 mode")


@pytest.mark.parametrize(("second_scale", "fires"), [(0.07, True), (ACT_SCALE, False)])
def test_E17_concat_inputs_with_different_scales(second_scale, fires):
    model, _ = build_unet("jetson-thor-jp7")
    cat = helper.make_node("Concat", ["a.dq.out", "b.dq.out"], ["cat"], name="up.concat", axis=1)
    conv_w = add_init(model, "up.w", np.zeros((CHANNELS, 2 * CHANNELS, 1, 1), np.float32))
    conv = helper.make_node("Conv", ["cat", conv_w], ["up.out"], name="up.conv_float")
    model.graph.node.extend([cat, conv])
    insert_qdq(model, "down.residual.out", "up.concat", "a")
    insert_qdq(model, "sample", "up.concat", "b", scale=second_scale)
    report = run_lint(model, "jetson-thor-jp7")
    if fires:
        assert_fires(report, "E-17", "up.concat", severity="warning", text="different scales")
    else:
        assert_silent(report, "E-17", severity="warning")


def test_E18_dq_into_groupnorm():
    model, _ = build_unet("gpu")
    insert_qdq(model, "down.temb_add.out", "down.norm", "gn_in")
    assert_fires(run_lint(model, "gpu"), "E-18", "down.norm", severity="warning", text="GroupNorm")


def test_E18_attention_matmul_on_tensorrt():
    model, _ = build_unet("jetson-thor-jp7")
    qk = helper.make_node("MatMul", ["q.dq.out", "k.dq.out"], ["scores"], name="attn.qk")
    model.graph.node.append(qk)
    insert_qdq(model, "mid.to_seq.out", "attn.qk", "q")
    tr = helper.make_node("Transpose", ["mid.to_seq.out"], ["k_t"], name="attn.k_t", perm=[0, 2, 1])
    insert_before(model, "attn.qk", tr)
    node(model, "attn.qk").input[1] = "k_t"
    insert_qdq(model, "k_t", "attn.qk", "k")
    assert_fires(run_lint(model, "jetson-thor-jp7"), "E-18", "attn.qk", severity="warning", text="INT8 MHA")
    assert_silent(run_lint(model, "cpu"), "E-14", severity="warning")  # attached to a quantized op on ORT


def test_E19_small_channel_convs():
    model, _ = build_unet("gpu", channels=8)
    report = run_lint(model, "gpu")
    assert_fires(report, "E-19", "down.conv2", severity="warning", text="Cin=8, Cout=8")
    assert not [v for v in hits(report, "E-19", severity="warning") if v.node == "down.conv1"]  # first layer, % 8


def test_E19_gemv_shaped_linear():
    model, _ = build_unet("jetson-orin-jp61", time_linear=True)
    assert_fires(run_lint(model, "jetson-orin-jp61"), "E-19", "time.linear", severity="warning", text="GEMV")


def test_E20_name_exclusions():
    model, layers = build_unet("gpu")
    layers[0]["name"] = "conv_in"
    for n in model.graph.node:
        n.name = n.name.replace("down.conv1", "conv_in")
    report = run_lint(model, "gpu", layers)
    assert_fires(report, "E-20", "conv_in", severity="warning", text="latent channels")
    layers[0]["name"] = "conv_inner"
    for n in model.graph.node:
        n.name = n.name.replace("conv_in", "conv_inner")
    assert_silent(run_lint(model, "gpu", layers), "E-20", severity="warning")


# -- report, API and CLI -----------------------------------------------------------------------------------------


def _bad_gpu_model() -> onnx.ModelProto:
    model, _ = build_unet("gpu")
    set_init(model, "down.conv2.input_zp", np.uint8(0))
    return model


def test_report_json_and_text():
    report = run_lint(_bad_gpu_model(), "gpu")
    data = json.loads(report.to_json())
    assert data["ok"] is False and data["target"] == "gpu"
    assert {"rule": "E-1", "severity": "error", "node": "down.conv2.input_q"}.items() <= data["errors"][0].items()
    text = report.format_text()
    assert re.search(r"error\s+E-1\s+down\.conv2\.input_q: zero point", text) and "fix: " in text


def test_raise_for_errors_names_rule_and_node():
    with pytest.raises(ExportError, match=r"E-1 \[down\.conv2\.input_q\]"):
        run_lint(_bad_gpu_model(), "gpu").raise_for_errors()
    good, _ = build_unet("gpu")
    run_lint(good, "gpu").raise_for_errors()


def test_lint_model_reads_files(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_bad_gpu_model(), path)
    report = lint_model(path, load_target("gpu"))
    assert report.model == str(path) and hits(report, "E-1")
    with pytest.raises(InputError, match="does not exist"):
        lint_model(tmp_path / "missing.onnx", load_target("gpu"))
    (tmp_path / "junk.onnx").write_bytes(b"\x0a\xff\xff not onnx")
    with pytest.raises(InputError, match="not a readable ONNX model"):
        lint_model(tmp_path / "junk.onnx", load_target("gpu"))
    with pytest.raises(InputError, match="has no 'name'"):
        lint_model(path, load_target("gpu"), quantized_layers=[{"w_bits": 4}])


def test_main_exit_codes_json_and_layers(tmp_path, capsys):
    good, layers = build_unet("jetson-orin-jp61", w4=True)
    onnx.save(good, tmp_path / "good.onnx")
    assert main([str(tmp_path / "good.onnx"), "--target", "jetson"]) == 0
    assert "OK: no hard rule" in capsys.readouterr().out
    # the same graph with a weight off the 4-bit grid: caught only with the manifest's layers
    w = init(good, "down.conv1.weight").copy()
    w[1, 0, 0, 0] = -20
    set_init(good, "down.conv1.weight", w)
    onnx.save(good, tmp_path / "bad.onnx")
    (tmp_path / "manifest.json").write_text(json.dumps({"layers": layers}))
    out_json = tmp_path / "lint.json"
    argv = [str(tmp_path / "bad.onnx"), "--target", "jetson-orin-jp61", "--json", str(out_json)]
    assert main(argv + ["--quantized-layers", str(tmp_path / "manifest.json")]) == 2
    assert "E-8" in capsys.readouterr().out
    assert json.loads(out_json.read_text())["errors"][0]["rule"] == "E-8"
    assert main(argv) == 0


def test_main_user_errors_exit_2(tmp_path, capsys):
    model, _ = build_unet("cpu")
    onnx.save(model, tmp_path / "m.onnx")
    assert main([str(tmp_path / "m.onnx"), "--target", "jetsn"]) == 2
    assert "did you mean 'jetson'" in capsys.readouterr().err
    (tmp_path / "layers.json").write_text('{"no": "layers"}')
    assert main([str(tmp_path / "m.onnx"), "--target", "cpu", "--quantized-layers", str(tmp_path / "layers.json")]) == 2


def test_module_runs_as_script_without_torch(tmp_path):
    model, _ = build_unet("cpu")
    onnx.save(model, tmp_path / "m.onnx")
    code = (
        "import sys; sys.modules['torch'] = None; from quest_export.export.lint.cli import main; "
        f"sys.exit(main([{str(tmp_path / 'm.onnx')!r}, '--target', 'cpu']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    argv = [sys.executable, "-m", "quest_export.export.lint", str(tmp_path / "m.onnx"), "--target", "jetson-orin-jp60"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 2 and "E-12" in proc.stdout and "E-13" in proc.stdout, proc.stdout + proc.stderr


def test_rule_table_is_well_formed():
    assert all(re.fullmatch(r"[EBG]-\d+b?", r.rule_id) for r in RULES)  # G: is the graph in scope at all
    assert all(r.severity in ("error", "warning") and r.title for r in RULES)
    assert len({r.check for r in RULES}) == len(RULES)
    errors = {r.rule_id for r in RULES if r.severity == "error"}
    assert {"E-1", "E-2", "E-3", "E-4", "E-7", "E-8", "E-9b", "E-12", "E-13"} <= errors
    warnings = {r.rule_id for r in RULES if r.severity == "warning"}
    assert {"E-14", "E-15", "E-16", "E-17", "E-18", "E-19", "E-20"} <= warnings
