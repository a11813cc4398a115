"""Quantizer primitives (quest.md 2.2, deploy.md E-5): bit-identical to ONNX QuantizeLinear/DequantizeLinear,
round half to even, saturating; straight-through gradients; scale rules for dead channels and asymmetric grids."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from quest_export.quant.primitives import (
    asymmetric_params,
    dequantize,
    fake_quant,
    qrange,
    quantize,
    round_ste,
    symmetric_scale,
)

# (name, q_min, q_max, ONNX type); symmetric grids are signed full range, asymmetric ones unsigned
GRIDS = [("int8", -128, 127, TensorProto.INT8), ("uint8", 0, 255, TensorProto.UINT8),
         ("int4", -8, 7, TensorProto.INT4), ("uint4", 0, 15, TensorProto.UINT4)]  # fmt: skip
# 6-bit grids (DMQ's W4A6, quest.md 2.2) have no ONNX type: they are carried in INT8 / UINT8 behind a Clip
GRIDS6 = [("int6", -32, 31, TensorProto.INT8), ("uint6", 0, 63, TensorProto.UINT8)]


def np_quantize_linear(x: np.ndarray, s, z, qmin: int, qmax: int) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(rint(x / s) + z), float32 division, round half to even."""
    x, s = np.asarray(x, np.float32), np.asarray(s, np.float32)
    return np.clip(np.rint(x / s) + np.asarray(z, np.float32), qmin, qmax).astype(np.float32)


def np_dequantize_linear(q: np.ndarray, s, z) -> np.ndarray:
    """ONNX DequantizeLinear: (q - z) * s in float32."""
    return ((q - np.asarray(z, np.float32)) * np.asarray(s, np.float32)).astype(np.float32)


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32)))


def test_qrange():
    assert qrange(8, signed=True) == (-128, 127)
    assert qrange(4, signed=True) == (-8, 7)
    assert qrange(6, signed=True) == (-32, 31)
    assert qrange(8, signed=False) == (0, 255)
    assert qrange(4, signed=False) == (0, 15)
    assert qrange(16, signed=True) == (-32768, 32767)


@pytest.mark.parametrize("name,qmin,qmax,_", GRIDS + GRIDS6)
@pytest.mark.parametrize("scale", [0.25, 0.1, 3.0e-3])
def test_quantize_matches_numpy_reference_on_exact_ties(name, qmin, qmax, _, scale):
    zero = 0 if qmin < 0 else (qmax + 1) // 2
    k = np.arange(qmin - zero - 6, qmax - zero + 6, dtype=np.float32)  # covers the grid and both clamps
    x = np.concatenate([(k + 0.5) * np.float32(scale), (k - 0.5) * np.float32(scale), k * np.float32(scale)])
    x = x.astype(np.float32)
    q = quantize(_t(x), torch.tensor(scale), float(zero), qmin, qmax)
    ref = np_quantize_linear(x, scale, zero, qmin, qmax)
    assert np.array_equal(q.numpy(), ref), f"{(q.numpy() != ref).sum()} codes differ"
    y = fake_quant(_t(x), torch.tensor(scale), float(zero), qmin, qmax)
    assert np.array_equal(y.numpy(), np_dequantize_linear(ref, scale, zero))
    assert torch.equal(dequantize(q, torch.tensor(scale), float(zero)), y)


def test_ties_round_half_to_even_and_saturate():
    s = torch.tensor(0.5)  # power of two: x / s is exact, so every x below is an exact tie or grid point
    v = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 126.5, 127.5, -127.5, -128.5, 1000.0, -1000.0])
    q = quantize(v * s, s, 0.0, -128, 127)
    assert q.tolist() == [0, 2, 2, 4, 0, -2, -2, -4, 126, 127, -128, -128, 127, -128]
    q4 = quantize(torch.tensor([6.5, 7.5, -7.5, -8.5, -9.5, 8.0]) * s, s, 0.0, -8, 7)
    assert q4.tolist() == [6, 7, -8, -8, -8, 7]
    q6 = quantize(torch.tensor([29.5, 30.5, 31.5, -31.5, -32.5, -33.0, 40.0]) * s, s, 0.0, -32, 31)
    assert q6.tolist() == [30, 30, 31, -32, -32, -32, 31]
    qu = quantize(torch.tensor([-3.0, 0.5, 1.5, 254.5, 255.5, 300.0]) * s, s, 3.0, 0, 255)  # z = 3, unsigned
    assert qu.tolist() == [0, 3, 5, 255, 255, 255]


@pytest.mark.parametrize("name,qmin,qmax,_", GRIDS + GRIDS6)
def test_random_tensor_per_axis_matches_numpy(name, qmin, qmax, _):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 5, 3, 3)) * 4).astype(np.float32)
    s = (rng.uniform(0.3, 1.0, (6, 1, 1, 1)) * 15 / (qmax - qmin)).astype(np.float32)  # grid spans 4.5..15 (x std 4)
    z = (rng.integers(0, qmax + 1, (6, 1, 1, 1)) if qmin == 0 else np.zeros((6, 1, 1, 1))).astype(np.float32)
    ref_q = np_quantize_linear(x, s, z, qmin, qmax)
    assert np.array_equal(quantize(_t(x), _t(s), _t(z), qmin, qmax).numpy(), ref_q)
    assert np.array_equal(fake_quant(_t(x), _t(s), _t(z), qmin, qmax).numpy(), np_dequantize_linear(ref_q, s, z))
    assert (ref_q == qmin).any() and (ref_q == qmax).any()  # both clamps were exercised


def _qdq_session(scale: np.ndarray, zero: np.ndarray, elem: int, shape: list[int], axis: int):
    """ONNX Runtime QuantizeLinear -> DequantizeLinear (opset 21), with the integer codes as a second output."""
    z = helper.make_tensor("z", elem, list(zero.shape), zero.reshape(-1).tolist())
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=axis),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=axis)]  # fmt: skip
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
    if elem in (TensorProto.INT8, TensorProto.UINT8):  # numpy has no 4-bit type to return q in
        outs.append(helper.make_tensor_value_info("q", elem, shape))
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)], outs,
                              initializer=[numpy_helper.from_array(scale, "s"), z])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name,qmin,qmax,elem", GRIDS)
@pytest.mark.parametrize("per_axis", [False, True], ids=["per-tensor", "per-axis"])
def test_bit_exact_with_onnxruntime(name, qmin, qmax, elem, per_axis):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((8, 32, 16, 16)) * 3).astype(np.float32)
    signed = qmin < 0
    if per_axis:
        s = rng.uniform(0.005, 0.3, 8).astype(np.float32)
        s[0] = 0.125
        z = (np.zeros(8) if signed else rng.integers(0, qmax + 1, 8)).astype(np.int64)
        ts, tz = _t(s).view(8, 1, 1, 1), _t(z).view(8, 1, 1, 1)
    else:
        s = np.array(0.125 if signed else 0.037, np.float32)
        z = np.array(0 if signed else (qmax + 1) // 2, np.int64)
        ts, tz = torch.tensor(float(s)), float(z)
    # (near-)ties: (k + 0.5) * s in float32, exact where s is a power of two (0.125), else within an ulp of the
    # tie, where x / s and x * (1 / s) can round to different codes
    k = np.arange(-128, 128, dtype=np.float32) + np.float32(0.5)
    x[:, 1] = (k[None, :] * np.broadcast_to(s, (8,))[:, None]).astype(np.float32).reshape(8, 16, 16)
    outs = _qdq_session(s, z, elem, list(x.shape), axis=0).run(None, {"x": x})
    y_fq = fake_quant(_t(x), ts, tz, qmin, qmax).numpy()
    assert int((y_fq != outs[0]).sum()) == 0
    if len(outs) > 1:  # the integer codes too
        assert int((quantize(_t(x), ts, tz, qmin, qmax).numpy() != outs[1].astype(np.float32)).sum()) == 0


@pytest.mark.parametrize("name,qmin,qmax,elem", GRIDS6)
@pytest.mark.parametrize("per_axis", [False, True], ids=["per-tensor", "per-axis"])
def test_six_bit_in_an_int8_container_is_exact_with_onnxruntime(name, qmin, qmax, elem, per_axis):
    """Clip(x, (q_min - z) s, (q_max - z) s) -> QuantizeLinear(INT8 / UINT8) -> DequantizeLinear = 6-bit fake quant.

    The clip bounds are grid points, so the 8-bit Q of a clipped value lands on a 6-bit code (deploy.md E-9b).
    """
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((8, 32, 16, 16)) * 3).astype(np.float32)
    signed = qmin < 0
    shape = (8, 1, 1, 1) if per_axis else ()
    s = (rng.uniform(0.02, 0.2, shape) if per_axis else np.array(0.0625)).astype(np.float32)
    z = (np.zeros(shape) if signed else rng.integers(0, qmax + 1, shape)).astype(np.float32)
    k = np.arange(-128, 128, dtype=np.float32) + np.float32(0.5)  # (near-)ties of the 6-bit grid and beyond it
    x[:, 1] = (k[None, :] * np.broadcast_to(s.reshape(-1), (8,))[:, None]).astype(np.float32).reshape(8, 16, 16)
    lo, hi = ((np.float32(qmin) - z) * s).astype(np.float32), ((np.float32(qmax) - z) * s).astype(np.float32)
    axis = {"axis": 0} if per_axis else {}
    zt = helper.make_tensor("z", elem, [8] if per_axis else [], z.reshape(-1).astype(np.int64).tolist())
    inits = [numpy_helper.from_array(s.reshape(-1) if per_axis else s, "s"), zt,
             numpy_helper.from_array(lo if not per_axis else lo.reshape(8, 1, 1, 1), "lo"),
             numpy_helper.from_array(hi if not per_axis else hi.reshape(8, 1, 1, 1), "hi")]  # fmt: skip
    # Clip takes scalar bounds only, so a per-channel clip is Max(Min(x, hi), lo) (same values)
    nodes = [helper.make_node("Min", ["x", "hi"], ["c1"]), helper.make_node("Max", ["c1", "lo"], ["c"]),
             helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"], **axis),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **axis)]  # fmt: skip
    if not per_axis:
        nodes[:2] = [helper.make_node("Clip", ["x", "lo", "hi"], ["c"])]
    graph = helper.make_graph(nodes, "qdq6", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape)),
                               helper.make_tensor_value_info("q", elem, list(x.shape))], initializer=inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    y, q = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    ts, tz = (_t(s), _t(z)) if per_axis else (torch.tensor(float(s)), float(z))
    assert int((fake_quant(_t(x), ts, tz, qmin, qmax).numpy() != y).sum()) == 0
    assert int((quantize(_t(x), ts, tz, qmin, qmax).numpy() != q.astype(np.float32)).sum()) == 0
    assert q.min() == qmin and q.max() == qmax  # both 6-bit clamps were exercised, never the 8-bit ones


# -- gradients -----------------------------------------------------------------------------------------------------


def test_straight_through_gradient_for_x():
    s = torch.tensor(0.1)
    x = torch.tensor([-20.0, -12.9, -0.26, 0.0, 0.04, 3.33, 12.69, 20.0], requires_grad=True)  # range [-12.8, 12.7]
    fake_quant(x, s, 0.0, -128, 127).sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # identity inside the range, 0 where clamped
    r = torch.tensor([0.4, 2.5, -3.7], requires_grad=True)
    round_ste(r).sum().backward()
    assert r.grad.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("x,z,qmin,qmax,expected", [
    (0.23, 0.0, -128, 127, -0.3),  # inside: round(x/s) - x/s = 2 - 2.3
    (0.27, 0.0, -128, 127, 0.3),  # 3 - 2.7
    (-0.23, 0.0, -128, 127, 0.3),  # -2 - (-2.3)
    (-0.27, 0.0, -128, 127, -0.3),  # -3 - (-2.7)
    (100.0, 0.0, -128, 127, 127.0),  # clamped above: q_max - z
    (-100.0, 0.0, -128, 127, -128.0),  # clamped below: q_min - z
    (100.0, 3.0, 0, 255, 252.0),  # unsigned grid with a zero point
    (-100.0, 3.0, 0, 255, -3.0),
])  # fmt: skip
def test_scale_gradient(x, z, qmin, qmax, expected):
    """LSQ-style scale gradient through plain autograd, no gradient-scale factor (quest.md 2.4)."""
    s = torch.tensor(0.1, requires_grad=True)
    fake_quant(torch.tensor(x), s, z, qmin, qmax).backward()
    assert s.grad.item() == pytest.approx(expected, abs=1e-5)
    assert np.sign(s.grad.item()) == np.sign(expected)


# -- scale rules ---------------------------------------------------------------------------------------------------


def test_symmetric_scale_dead_channel_gets_one():
    amax = torch.tensor([0.0, 1.27, 2.54, 0.0])
    s8 = symmetric_scale(amax, 8)
    assert s8.tolist() == [1.0, torch.tensor(1.27 / 127).item(), torch.tensor(2.54 / 127).item(), 1.0]
    assert symmetric_scale(torch.tensor([7.0, 0.0]), 4).tolist() == [1.0, 1.0]  # amax / 7, and the dead channel
    # a dead channel quantizes to all-zero codes, never NaN
    w = torch.zeros(3)
    assert torch.equal(fake_quant(w, symmetric_scale(w.abs().amax().reshape(1), 8), 0.0, -128, 127), w)


def test_asymmetric_params_range_always_includes_zero():
    g = torch.Generator().manual_seed(0)
    lo = torch.randn(200, generator=g) * 3
    hi = lo + torch.rand(200, generator=g) * 5  # some ranges entirely positive, some entirely negative
    lo[:3], hi[:3] = torch.tensor([2.0, -5.0, 0.0]), torch.tensor([5.0, -2.0, 0.0])
    assert (lo > 0).any() and (hi < 0).any()
    for bits in (8, 6, 4):
        s, z = asymmetric_params(lo, hi, bits)
        qmax = 2**bits - 1
        assert torch.equal(z, torch.round(z)) and (z >= 0).all() and (z <= qmax).all()
        assert (s > 0).all()
        # zero is exactly representable: it quantizes to z and dequantizes to 0
        assert torch.equal(fake_quant(torch.zeros(200), s, z, 0, qmax), torch.zeros(200))
        # the grid spans [min(lo, 0), max(hi, 0)] up to the half step lost by rounding z
        assert ((0 - z) * s <= torch.minimum(lo, torch.zeros(200)) + s / 2 + 1e-6).all()
        assert ((qmax - z) * s >= torch.maximum(hi, torch.zeros(200)) - s / 2 - 1e-6).all()
    s, z = asymmetric_params(torch.tensor([2.0]), torch.tensor([5.0]), 8)
    assert z.item() == 0 and s.item() == pytest.approx(5.0 / 255)  # all positive: anchored at 0
    s, z = asymmetric_params(torch.tensor([-5.0]), torch.tensor([-2.0]), 8)
    assert z.item() == 255 and s.item() == pytest.approx(5.0 / 255)  # all negative: 0 at the top
    s, z = asymmetric_params(torch.tensor([0.0]), torch.tensor([0.0]), 8)
    assert (s.item(), z.item()) == (1.0, 0.0)  # empty range: scale 1


def _autograd_fake_quant(x, s, z, qmin, qmax):
    """The same mathematics through plain autograd (the form fake_quant had before its hand-written backward)."""
    q = torch.clamp(round_ste(x / s) + z, qmin, qmax)
    return (q - z) * s


@pytest.mark.parametrize("grid", GRIDS[:2], ids=lambda g: g[0])
@pytest.mark.parametrize("per_channel", [False, True])
def test_hand_written_backward_equals_autograd(grid, per_channel):
    """Training uses a fused autograd Function: same forward values, same x and scale gradients as plain autograd."""
    _, qmin, qmax, _ = grid
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 6, 5, 5, generator=g) * 3
    shape = (1, 6, 1, 1) if per_channel else (1,)
    s0 = torch.rand(shape, generator=g) * 0.05 + 0.01  # small scales: many values clamp at both ends
    z = 0.0 if qmin < 0 else torch.full(shape, 100.0)
    w = torch.randn(x0.shape, generator=g)  # a non-uniform upstream gradient
    out = {}
    for name, fn in (("fused", fake_quant), ("autograd", _autograd_fake_quant)):
        x, s = x0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        y = fn(x, s, z, qmin, qmax)
        (y * w).sum().backward()
        out[name] = (y.detach(), x.grad, s.grad)
    (yf, gxf, gsf), (ya, gxa, gsa) = out["fused"], out["autograd"]
    assert torch.equal(yf, ya)
    clamped = ((x0 / s0).round() + z < qmin) | ((x0 / s0).round() + z > qmax)
    assert clamped.any() and (~clamped).any()
    assert torch.equal(gxf, torch.where(clamped, 0.0, w))  # exactly the straight-through mask
    torch.testing.assert_close(gxf, gxa, rtol=1e-6, atol=1e-6)
    assert gsf.shape == s0.shape
    torch.testing.assert_close(gsf, gsa, rtol=1e-4, atol=1e-4)
    # with no gradient needed, the no-autograd path gives the same values
    with torch.no_grad():
        assert torch.equal(fake_quant(x0, s0, z, qmin, qmax), yf)
