"""The lint rules, one small function each, and ``RULES``: the table that gives every function its rule id,
its severity and its scope (all targets, or TensorRT targets only; with or without the manifest's layers).

*Errors* are graphs that cannot run correctly on the target (E-1...E-13, the TensorRT parser's unsupported ops,
B-6); *warnings* are graphs that run, but slower than they could (E-14...E-20, INT8/FP8 mixing). Add a rule by
writing one function over ``_Graph`` that yields ``_Finding`` tuples and one table row.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from quest_export.export.lint.graph import (
    CONV_OPS,
    DEQUANTIZE,
    FIRST_LAYER_CHANNEL_MULTIPLE,
    FP4_TYPES,
    FP8_CONV_MAX_KERNEL_AREA,
    FP8_TYPES,
    FP16_MIN_NORMAL,
    GROUPED_CONV_COUT_MULTIPLE,
    GROUPED_CONV_MIN_KERNEL,
    HIGH_PRECISION_OPS,
    INT4_BLOCKS,
    INT4_MIN_OPSET,
    INT4_TYPES,
    INT16_TYPES,
    INTEGER_OPS,
    MIN_CHANNELS,
    MODEL,
    NAME_EXCLUSIONS,
    ORT_MAX_IR_VERSION,
    QUANTIZE,
    RATIOS_INPUT,
    REQUIRED_INPUTS,
    SHAPE_OPS,
    STORAGE_TYPES,
    TRT_UNSUPPORTED_OPS,
    UNET_INPUTS,
    UNSIGNED_TYPES,
    WEIGHTED_OPS,
    T,
    _attr,
    _Finding,
    _fmt,
    _Graph,
    _k_axis,
    _norm_axis,
    _out_channel_axis,
    type_name,
)

# -- errors: the graph cannot run correctly on the target ------------------------------------------------------


def _e12_opset(g: _Graph) -> Iterator[_Finding]:
    t = g.target
    if g.opset is None:
        yield _Finding(
            MODEL,
            "declares no default-domain ('ai.onnx') opset.",
            f"export with opset {t.max_opset} (the cap of {t.id}).",
        )
        return
    int4 = g.has_int4()
    cap = t.int4_opset if int4 and t.int4_opset > t.max_opset else t.max_opset
    if g.opset > cap:
        why = (
            f"{t.id} allows opset {t.int4_opset} only for graphs with INT4 DQ (deploy.md Q7)"
            if t.int4_opset > t.max_opset and not int4
            else f"the parser of {t.software or t.id} reads opset <= {cap}"
        )
        yield _Finding(
            MODEL,
            f"default-domain opset {g.opset} is above the cap {cap} of target '{t.id}': {why}.",
            f"export with opset {t.max_opset} (ExportConfig / target profile max_opset).",
        )
    if int4 and g.opset < INT4_MIN_OPSET:
        yield _Finding(
            MODEL,
            f"the graph holds INT4 tensors or block_size attributes, which need opset "
            f"{INT4_MIN_OPSET}, but declares opset {g.opset} (older checkers fail with "
            "'Unrecognized attribute: block_size').",
            f"raise the default-domain opset to {INT4_MIN_OPSET} and the IR version to 10 (E-10), "
            "or keep W4 in an INT8 container (E-8).",
        )


def _e13_ir_version(g: _Graph) -> Iterator[_Finding]:
    t, ir = g.target, g.model.ir_version
    if ir == 0:
        yield _Finding(
            MODEL, "ir_version is not set.", f"set model.ir_version = {t.ir_version} explicitly after make_model."
        )
        return
    if ir > ORT_MAX_IR_VERSION:
        yield _Finding(
            MODEL,
            f"IR version {ir} is above {ORT_MAX_IR_VERSION}, the newest onnxruntime 1.31 reads "
            "(onnx 1.23's make_model stamps IR 14).",
            f"set model.ir_version = {t.ir_version} explicitly.",
        )
    elif t.is_tensorrt:
        cap = t.ir_version
        if g.has_int4() and t.int4_opset > t.max_opset:
            cap = max(cap, helper.find_min_ir_version_for([helper.make_opsetid("", t.int4_opset)], True))
        if ir > cap:
            yield _Finding(
                MODEL,
                f"IR version {ir} is above {cap}, what target '{t.id}' ({t.software}) reads.",
                f"set model.ir_version = {cap}.",
            )
    if g.opset is not None:
        need = helper.find_min_ir_version_for([helper.make_opsetid("", g.opset)], True)
        if ir < need:
            yield _Finding(
                MODEL,
                f"IR version {ir} is older than opset {g.opset} needs (IR >= {need}).",
                f"set model.ir_version = {need}.",
            )


def _e1_zero_points(g: _Graph) -> Iterator[_Finding]:
    t = g.target
    symmetric = t.is_tensorrt or t.symmetric_only
    for node in g.qdq_nodes:
        zp = g.zero_point(node)
        if zp is None:
            if t.is_tensorrt and node.op_type == QUANTIZE and g.q_output_type(node) == T.UINT8:
                yield _Finding(
                    g.label(node),
                    "QuantizeLinear has no zero point and no output_dtype, so it outputs "
                    "UINT8; TensorRT reads UINT8 as INT8 with only a warning (a silent change of results).",
                    "give it an INT8 zero point of 0 (or output_dtype=INT8 at opset 21).",
                )
            continue
        zp_type = g.dtype(zp)
        if t.is_tensorrt and zp_type in UNSIGNED_TYPES:
            yield _Finding(
                g.label(node),
                f"zero point '{zp}' is {type_name(zp_type)}; TensorRT reads a UINT8 zero "
                "point as INT8 with only a warning (a silent change of results).",
                "export symmetric signed grids (INT8 zero point 0; INT4 zero point 0 or none); unsigned "
                "and asymmetric grids are for --target cpu only.",
            )
        values = g.array(zp)
        if symmetric and values is not None and np.any(values.astype(np.float64) != 0):
            nz = values.astype(np.float64)
            yield _Finding(
                g.label(node),
                f"zero point '{zp}' holds {int(np.count_nonzero(nz))} non-zero value(s) "
                f"(max |z| = {_fmt(float(np.abs(nz).max()))}); target '{t.id}' is symmetric only and "
                "TensorRT rejects non-zero zero points.",
                "quantize symmetrically (QuantRecipe w_symmetric/a_symmetric = true) and re-export.",
            )


def _e1_unsigned_tensors(g: _Graph) -> Iterator[_Finding]:
    """UINT8 anywhere else in the graph (Q/DQ zero points and Q outputs are _e1_zero_points' job)."""
    skip = {g.zero_point(n) for n in g.qdq_nodes} | {n.output[0] for n in g.qdq_nodes if n.op_type == QUANTIZE}
    names = list(g.initializers) + list(g.constant_nodes) + list(g.types)
    for name in dict.fromkeys(names):
        dt = g.dtype(name)
        if name not in skip and dt in UNSIGNED_TYPES:
            yield _Finding(
                g.tensor_label(name),
                f"tensor '{name}' is {type_name(dt)}; no graph for a TensorRT target "
                "may hold unsigned integers (TensorRT reads UINT8 as INT8).",
                "use signed INT8 (or INT4) values, or keep the tensor in floating point.",
            )


def _e2_activation_scales(g: _Graph) -> Iterator[_Finding]:
    t = g.target
    for node in g.qdq_nodes:
        if g.is_weight_qdq(node):
            continue
        scale = node.input[1]
        kind = g.const_kind(scale)
        if kind in ("graph-input", "computed"):
            src = "graph input" if kind == "graph-input" else f"node '{g.tensor_label(scale)}'"
            yield _Finding(
                g.label(node),
                f"activation scale '{scale}' is computed at run time (from {src}); scales "
                "must be build-time constants.",
                "store one constant scale per tensor as an initializer; for per-group scales use the "
                "merged, per-group or scale-input mode (quest.md section 9.2).",
            )
            continue
        values = g.array(scale)
        if t.is_tensorrt and values is not None and values.size != 1:
            yield _Finding(
                g.label(node),
                f"activation scale '{scale}' is per-axis ({values.size} values, axis "
                f"{_attr(node, 'axis', 1)}); TensorRT has only per-tensor activation quantization.",
                "use per-tensor activation scales (QuantRecipe a_granularity = per-tensor, or the pot/"
                "fold options of quest.md section 9.3) and re-evaluate the fake-quant model.",
            )


def _e2_multiply_between_dq_and_op(g: _Graph) -> Iterator[_Finding]:
    """scale-input mode: the multiply by r_g must not sit between a DQ and its Conv/GEMM (TensorRT fusion)."""
    for node in g.weighted_nodes:
        for name in node.input[:2]:
            p = g.producer.get(name)
            if p is None or p.op_type not in ("Mul", "Div"):
                continue
            dqs = [i for i in p.input if (q := g.producer.get(i)) is not None and q.op_type == DEQUANTIZE]
            if dqs:
                yield _Finding(
                    g.label(node),
                    f"{p.op_type} '{g.label(p)}' sits between DequantizeLinear output "
                    f"'{dqs[0]}' and this {node.op_type}; TensorRT fuses a DQ only when it feeds the "
                    "quantized kernel directly.",
                    "move the multiply by r_g past the linear op, before the bias add (scale-input mode, E-2).",
                )


def _e3_weight_axes(g: _Graph) -> Iterator[_Finding]:
    for node in g.weighted_nodes:
        dq = g.weight_dq(node)
        if dq is None or _attr(dq, "block_size", 0):
            continue  # no weight DQ, or block quantization (E-4)
        w_shape, s_shape = g.shape(dq.input[0]), g.shape(dq.input[1])
        if w_shape is None or s_shape is None or int(np.prod(s_shape)) == 1:
            continue  # per-tensor weight scale
        rank = len(w_shape)
        axis, want = _norm_axis(_attr(dq, "axis", 1), rank), _out_channel_axis(node, rank)
        if axis != want:
            yield _Finding(
                g.label(dq),
                f"weight DQ of {node.op_type} '{g.label(node)}' is per-axis along axis "
                f"{axis} of weight {w_shape}; {node.op_type} output channels are axis {want}.",
                f"quantize per output channel and set axis={want} on the DQ (E-3 table).",
            )
        elif list(s_shape) != [w_shape[axis]]:
            yield _Finding(
                g.label(dq),
                f"weight scale '{dq.input[1]}' has shape {list(s_shape)}, but weight "
                f"{w_shape} has {w_shape[axis]} channels on axis {axis}.",
                "export one scale per output channel (length dim[axis]).",
            )
        zp = g.zero_point(dq)
        if zp is not None and g.shape(zp) is not None and list(g.shape(zp)) != list(s_shape):
            yield _Finding(
                g.label(dq),
                f"zero point '{zp}' has shape {g.shape(zp)}, scale has {list(s_shape)}.",
                "give the zero point the scale's shape, or omit it.",
            )


def _block_problems(g: _Graph, dq: onnx.NodeProto, block: int) -> Iterator[str]:
    """What breaks E-4 in one block-quantized DQ (one message per problem)."""
    consumers = [(n, i) for n, i in g.consumers.get(dq.output[0], [])]
    bad = sorted({n.op_type for n, _ in consumers if n.op_type not in ("MatMul", "Gemm")})
    if bad:
        yield f"block quantization feeds {', '.join(bad)}; only MatMul/Gemm weights may be block-quantized"
    if block not in INT4_BLOCKS:
        yield f"block_size {block} is not one of {INT4_BLOCKS}"
    w_shape, s_shape = g.shape(dq.input[0]), g.shape(dq.input[1])
    gemm = next((n for n, i in consumers if n.op_type in ("MatMul", "Gemm") and i == 1), None)
    if gemm is None or w_shape is None or s_shape is None:
        return
    rank = len(w_shape)
    k, axis = _k_axis(gemm, rank), _norm_axis(_attr(dq, "axis", 1), rank)
    if axis != k:
        yield f"blocked along axis {axis} of weight {w_shape}, but K of the {gemm.op_type} is axis {k}"
        return
    if isinstance(w_shape[k], int) and w_shape[k] % block:
        yield f"K = {w_shape[k]} is not divisible by block_size {block}"
    if g.dtype(dq.input[0]) in INT4_TYPES and isinstance(w_shape[-1], int) and w_shape[-1] % 2:
        yield f"last dimension {w_shape[-1]} is odd (INT4 packs two values per byte)"
    want = [d // block if i == k and isinstance(d, int) else d for i, d in enumerate(w_shape)]
    if list(s_shape) != want:
        yield f"scale shape {list(s_shape)} should be {want} (weight rank, dim[K]/block rows)"
    if g.target.is_tensorrt and g.dtype(dq.input[0]) not in INT4_TYPES:
        yield f"block-quantized weight is {type_name(g.dtype(dq.input[0]))}; TensorRT block-quantizes only INT4 weights"


def _e4_int4_blocks(g: _Graph) -> Iterator[_Finding]:
    for dq in g.qdq_nodes:
        block = _attr(dq, "block_size", 0)
        if dq.op_type != DEQUANTIZE or not block:
            continue
        for problem in _block_problems(g, dq, block):
            yield _Finding(
                g.label(dq),
                f"{problem}.",
                f"block-quantize only MatMul/Gemm weights along K with block {INT4_BLOCKS[0]} or "
                f"{INT4_BLOCKS[1]} (ExportConfig int4_block); convolutions stay per output channel (E-9).",
            )


def _e6_scale_values(g: _Graph) -> Iterator[_Finding]:
    seen: set[str] = set()
    for node in g.qdq_nodes:
        scale = node.input[1]
        values = g.array(scale)
        if scale in seen or values is None:
            continue
        seen.add(scale)
        s = values.astype(np.float64)
        bad = ~np.isfinite(s) | (s <= 0)
        if bad.any():
            first = [int(i) for i in np.unravel_index(int(np.argmax(bad)), s.shape)] if s.ndim else []
            yield _Finding(
                g.label(node),
                f"scale '{scale}' has {int(bad.sum())} non-positive or non-finite "
                f"value(s), first {_fmt(float(s[tuple(first)]))} at index {first}.",
                "scales must be positive and finite; a dead channel gets scale 1.0 with an all-zero weight row (E-6).",
            )
        elif g.dtype(scale) == T.FLOAT16 and s.min() < FP16_MIN_NORMAL:
            yield _Finding(
                g.label(node),
                f"FP16 scale '{scale}' has value {_fmt(float(s.min()))} below the FP16 "
                f"normal range ({_fmt(FP16_MIN_NORMAL)}).",
                "clamp FP16 scales to >= 2^-14 before the final evaluation, or export FP32 scales plus "
                "explicit Casts (E-6).",
            )


def _e7_constants_are_initializers(g: _Graph) -> Iterator[_Finding]:
    for node in g.qdq_nodes:
        weight = g.is_weight_qdq(node)
        roles = [(1, "scale"), (2, "zero point")] + (
            [(0, "quantized weight")] if weight and node.op_type == DEQUANTIZE else []
        )
        for idx, role in roles:
            name = node.input[idx] if len(node.input) > idx else ""
            if not name:
                continue
            kind = g.const_kind(name)
            if kind == "constant-node":
                yield _Finding(
                    g.label(node),
                    f"{role} '{name}' comes from Constant node "
                    f"'{g.label(g.constant_nodes[name])}', not from an initializer.",
                    "store it as an initializer (polygraphy surgeon sanitize --fold-constants).",
                )
            elif kind == "initializer-input":
                yield _Finding(
                    g.label(node),
                    f"{role} initializer '{name}' is also listed as a graph input, so a runtime may override it.",
                    "export without keep_initializers_as_inputs (drop it from graph.input).",
                )
            elif weight and kind in ("graph-input", "computed") and idx > 0:
                yield _Finding(
                    g.label(node),
                    f"weight {role} '{name}' is computed in the graph.",
                    "store weight scales and zero points as initializers.",
                )
        p = g.producer.get(node.input[0])
        if node.op_type == DEQUANTIZE and p is not None and p.op_type == QUANTIZE and g.is_const(p.input[0]):
            yield _Finding(
                g.label(node),
                f"the weight is quantized in the graph (QuantizeLinear '{g.label(p)}' of "
                f"float constant '{p.input[0]}' -> DequantizeLinear), an intermediate form only.",
                "fold Q(W) into an integer initializer feeding the DQ (the exporter's fold pass).",
            )


def _e7_conv_weights_constant(g: _Graph) -> Iterator[_Finding]:
    for node in g.weighted_nodes:
        if node.op_type not in CONV_OPS:
            continue
        w = node.input[1]
        kind, p = g.const_kind(w), g.producer.get(w)
        if kind in ("initializer", "initializer-input") or (p is not None and p.op_type == DEQUANTIZE):
            continue  # E-7 checks the DQ's own inputs
        src = (
            "a Constant node"
            if kind == "constant-node"
            else ("a graph input" if kind == "graph-input" else f"node '{g.tensor_label(w)}' ({p.op_type})")
        )
        yield _Finding(
            g.label(node),
            f"{node.op_type} weight '{w}' comes from {src}; TensorRT needs Conv weights "
            "that are initializers or DequantizeLinear of initializers.",
            "fold the weight computation into an initializer before export.",
        )


def _e8_no_int4_conv(g: _Graph) -> Iterator[_Finding]:
    for node in g.weighted_nodes:
        dq = g.weight_dq(node)
        if node.op_type in CONV_OPS and dq is not None and g.dtype(dq.input[0]) in INT4_TYPES | FP4_TYPES:
            yield _Finding(
                g.label(node),
                f"{node.op_type} weight '{dq.input[0]}' is "
                f"{type_name(g.dtype(dq.input[0]))}; TensorRT has no INT4 convolution.",
                "store the 4-bit integers (-8..7) in an INT8 initializer with the 4-bit per-channel scale "
                "(INT8 container; speed = W8A8).",
            )


def _e8_container_range(g: _Graph) -> Iterator[_Finding]:
    for layer in g.layers:
        bits = layer.get("w_bits")
        if not isinstance(bits, int) or bits >= 8:
            continue
        q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        k = layer.get("pts_fold") or 1  # DMQ's PTS factors folded into W_int on TensorRT: up to K times the range
        q_min, q_max = q_min * k, q_max * k
        for node in g.layer_nodes(layer):
            dq = g.weight_dq(node)
            w = None if dq is None or g.dtype(dq.input[0]) != T.INT8 else g.array(dq.input[0])
            if w is None:
                continue
            w = w.astype(np.int64)
            lo, hi = int(w.min()), int(w.max())
            if lo < q_min or hi > q_max:
                out = int(((w < q_min) | (w > q_max)).sum())
                yield _Finding(
                    g.label(node),
                    f"layer '{layer.get('name')}' declares w_bits={bits}, but its INT8 "
                    f"weight '{dq.input[0]}' holds {out} value(s) outside [{q_min}, {q_max}] (range "
                    f"[{lo}, {hi}]).",
                    f"export the stored {bits}-bit integers W_int unchanged (never re-round at export), "
                    "or declare the layer's real bit width.",
                )


def _clip_bounds(g: _Graph, clip: onnx.NodeProto) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(min, max) of a Clip: inputs 1 and 2 from opset 11, attributes before."""
    lo = g.array(clip.input[1]) if len(clip.input) > 1 and clip.input[1] else _attr(clip, "min")
    hi = g.array(clip.input[2]) if len(clip.input) > 2 and clip.input[2] else _attr(clip, "max")
    return (None if lo is None else np.asarray(lo)), (None if hi is None else np.asarray(hi))


def _per_axis_low_bit_bounds(g: _Graph, q: onnx.NodeProto, s: np.ndarray, bits: int, name) -> _Finding | None:
    """A per-axis low-bit Q in an 8-bit container (DMQ's PTS scales s * f_c on ONNX Runtime) needs per-channel
    bounds: Max(Min(x, hi), lo) with lo = (q_min - z) s and hi = (q_max - z) s, channel by channel."""
    z = g.array(q.input[2]) if len(q.input) > 2 else None
    z = np.zeros_like(s) if z is None else z.astype(np.float32)
    unsigned = g.q_output_type(q) == onnx.TensorProto.UINT8
    q_min, q_max = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    lo_want = ((np.float32(q_min) - z.reshape(-1)) * s.reshape(-1)).astype(s.dtype)
    hi_want = ((np.float32(q_max) - z.reshape(-1)) * s.reshape(-1)).astype(s.dtype)
    fix = (f"insert Max(Min(x, hi), lo) with per-channel lo = ({q_min} - z) s and hi = ({q_max} - z) s right before "
           f"QuantizeLinear '{g.label(q)}' (a Clip cannot hold per-channel bounds), or use a per-tensor scale.")  # fmt: skip
    mx = g.producer.get(q.input[0])
    mn = g.producer.get(mx.input[0]) if mx is not None and mx.op_type == "Max" else None
    if mn is None or mn.op_type != "Min":
        return _Finding(g.label(q), f"per-axis INT8 Q of A{bits} layer '{name}' has no per-channel bounds "
                        f"(Max(Min(x, hi), lo)) before it, so the container carries 8-bit activations.", fix)  # fmt: skip
    lo, hi = g.array(mx.input[1]), g.array(mn.input[1])
    if (
        lo is None
        or hi is None
        or lo.size != s.size
        or hi.size != s.size
        or not (np.array_equal(lo.reshape(-1), lo_want) and np.array_equal(hi.reshape(-1), hi_want))
    ):
        return _Finding(g.label(mx), f"per-channel bounds before the INT8 Q of A{bits} layer '{name}' are not exactly "
                        f"[({q_min} - z) s, ({q_max} - z) s].", fix)  # fmt: skip
    return None


def _e9b_low_bit_clip(g: _Graph) -> Iterator[_Finding]:
    for layer in g.layers:
        bits = layer.get("a_bits")
        if not isinstance(bits, int) or bits >= 8:
            continue
        q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        name = layer.get("name")
        for node in g.layer_nodes(layer):
            q, _ = g.activation_qdq(node)
            if q is None:
                yield _Finding(
                    g.label(node),
                    f"layer '{name}' declares a_bits={bits}, but input 0 has no "
                    "QuantizeLinear -> DequantizeLinear, so the low-bit grid is never applied.",
                    "export the layer's input quantizer (E-14).",
                )
                continue
            if g.q_output_type(q) in INT4_TYPES:
                continue  # native low-bit Q (ONNX Runtime); B-6 checks that the target offers it
            s = g.array(q.input[1])
            if s is None:
                continue  # E-2/E-7 report a non-constant scale
            if s.size != 1:
                finding = _per_axis_low_bit_bounds(g, q, s, bits, name)
                if finding is not None:
                    yield finding
                continue
            s = s.reshape(())
            lo_want = float((np.asarray(q_min, s.dtype) * s).astype(s.dtype))
            hi_want = float((np.asarray(q_max, s.dtype) * s).astype(s.dtype))
            fix = (
                f"insert Clip(min={q_min}*s={_fmt(lo_want)}, max={q_max}*s={_fmt(hi_want)}) right before "
                f"QuantizeLinear '{g.label(q)}', computed in the scale's dtype (E-9b, quest.md section 9.8)."
            )
            clip = g.producer.get(q.input[0])
            if clip is None or clip.op_type != "Clip":
                yield _Finding(
                    g.label(q),
                    f"INT8 Q of A{bits} layer '{name}' has no Clip before it, so the INT8 "
                    f"container carries 8-bit activations instead of the {bits}-bit grid.",
                    fix,
                )
                continue
            lo, hi = _clip_bounds(g, clip)
            got = [None if v is None or v.size != 1 else float(v.reshape(())) for v in (lo, hi)]
            if got != [lo_want, hi_want]:
                shown = ", ".join("none" if v is None else _fmt(v) for v in got)
                yield _Finding(
                    g.label(clip),
                    f"Clip before the INT8 Q of A{bits} layer '{name}' has bounds "
                    f"[{shown}], not exactly [{q_min}*s, {q_max}*s] = [{_fmt(lo_want)}, {_fmt(hi_want)}].",
                    fix,
                )


def _e10_declared_storage(g: _Graph) -> Iterator[_Finding]:
    for layer in g.layers:
        storage = layer.get("storage")
        if storage not in STORAGE_TYPES:
            continue
        want_type, want_block = STORAGE_TYPES[storage]
        for node in g.layer_nodes(layer):
            dq = g.weight_dq(node)
            if dq is None:
                continue
            got_type, got_block = g.dtype(dq.input[0]), bool(_attr(dq, "block_size", 0))
            if (got_type, got_block) != (want_type, want_block):
                got = f"{type_name(got_type)}{' block' if got_block else ''}"
                yield _Finding(
                    g.label(node),
                    f"layer '{layer.get('name')}' declares storage '{storage}', but its "
                    f"weight DQ '{g.label(dq)}' reads a {got} initializer.",
                    "make the manifest's storage match the graph (the retype pass, E-10, sets both).",
                )


def _e11_int4_gemm_blocked(g: _Graph) -> Iterator[_Finding]:
    for node in g.weighted_nodes:
        dq = g.weight_dq(node)
        if node.op_type in ("MatMul", "Gemm") and dq is not None and g.dtype(dq.input[0]) in INT4_TYPES:
            if not _attr(dq, "block_size", 0):
                yield _Finding(
                    g.label(node),
                    f"INT4 weight '{dq.input[0]}' is not block-quantized; TensorRT's INT4 "
                    "is block-quantized weight-only GEMM.",
                    f"emit block-{INT4_BLOCKS[0]}/{INT4_BLOCKS[1]} INT4 (--int4-gemm) or keep W4 in the "
                    "INT8 container (the TensorRT default).",
                )


def _e14_unsupported_ops(g: _Graph) -> Iterator[_Finding]:
    for node in g.nodes:
        if node.domain not in ("", "ai.onnx"):
            yield _Finding(
                g.label(node),
                f"op {node.domain}::{node.op_type} is not a standard ONNX op; the TensorRT "
                "parser imports the ai.onnx domain only.",
                "export in QDQ form with standard ops (never from an ORT-optimized model).",
            )
        elif node.op_type in TRT_UNSUPPORTED_OPS:
            yield _Finding(
                g.label(node),
                f"{node.op_type} ({TRT_UNSUPPORTED_OPS[node.op_type]}) is not supported by the TensorRT ONNX parser.",
                "export in QDQ form: Q->DQ on input 0 and DQ on the weight of each quantized op (E-14).",
            )


def _b6_types_in_profile(g: _Graph) -> Iterator[_Finding]:
    t = g.target
    for node in g.qdq_nodes:
        if node.op_type == DEQUANTIZE and g.activation_q(node) is not None:
            continue  # reported at its Q
        qt, weight = g.quantized_type(node), g.is_weight_qdq(node)
        if qt == T.INT8 or qt in UNSIGNED_TYPES:
            continue  # INT8 everywhere; unsigned types are E-1's
        if qt in FP8_TYPES:
            need = ("fp8",)
        elif qt in FP4_TYPES:
            need = ("nvfp4",)
        elif qt in INT4_TYPES and weight:
            convs = [n for n, _ in g.consumers.get(node.output[0], []) if n.op_type in CONV_OPS]
            if t.is_tensorrt and convs:
                continue  # E-8 reports INT4 convolutions on TensorRT
            need = ("int4-weight", "int4-gemm")
        elif qt in INT4_TYPES:
            need = ("int4-act",)
        elif t.is_tensorrt:
            what = "INT16 (TensorRT has no 16-bit integer type)" if qt in INT16_TYPES else type_name(qt)
            yield _Finding(
                g.label(node),
                f"{'weight' if weight else 'activation'} Q/DQ of type {what}; TensorRT "
                "Q/DQ takes INT8, INT4 (weights) and FP8/FP4 only.",
                "quantize to INT8 (softmax_bits = 8, attention_quant = off) and keep biases in floating "
                "point (no INT32 bias DQ).",
            )
            continue
        else:
            continue  # ONNX Runtime runs any Q/DQ type
        if not any(n in t.quantized_types for n in need):
            extra = " (A4 runs in an INT8 container with a Clip, E-9b)" if need == ("int4-act",) else ""
            yield _Finding(
                g.label(node),
                f"{'weight' if weight else 'activation'} Q/DQ of type {type_name(qt)}, but "
                f"target '{t.id}' offers {', '.join(t.quantized_types)}{extra}.",
                f"export a precision mode the target lists (deploy.md section 1), or pick a target that "
                f"offers {' or '.join(need)}.",
            )


# -- warnings: the graph runs, but slower than it could --------------------------------------------------------


def _e7_int8_fp8_mix(g: _Graph) -> Iterator[_Finding]:
    kinds = {n.name or g.label(n): g.quantized_type(n) for n in g.qdq_nodes}
    int8 = [k for k, v in kinds.items() if v == T.INT8]
    fp8 = [k for k, v in kinds.items() if v in FP8_TYPES]
    if int8 and fp8:
        yield _Finding(
            fp8[0],
            f"the graph mixes INT8 Q/DQ ({len(int8)}, e.g. '{int8[0]}') and FP8 Q/DQ ({len(fp8)}); "
            "reported to break TensorRT fusion (unverified).",
            "quantize the whole graph in one format.",
        )


def _e14_incomplete_qdq(g: _Graph) -> Iterator[_Finding]:
    for node in g.weighted_nodes:
        dq_w, (_, dq_a) = g.weight_dq(node), g.activation_qdq(node)
        if dq_w is not None and dq_a is None:
            if g.dtype(dq_w.input[0]) in INT4_TYPES and _attr(dq_w, "block_size", 0):
                continue  # INT4 block weight-only GEMM (W4A16, E-11) is a mode of its own
            yield _Finding(
                g.label(node),
                f"{node.op_type} has a weight DQ but no activation Q->DQ on input 0: "
                "TensorRT dequantizes the weight and runs a float kernel (no INT8 speed-up).",
                "export the layer's input quantizer, or leave the weight in floating point.",
            )
        elif dq_a is not None and dq_w is None and g.is_const(node.input[1]):
            yield _Finding(
                g.label(node),
                f"{node.op_type} has an activation Q->DQ on input 0 but a float weight "
                f"'{node.input[1]}': it runs in floating point and the Q/DQ only adds cost.",
                "quantize the weight (INT8 initializer + per-channel DQ) or drop the activation Q/DQ.",
            )


def _is_output_qdq(g: _Graph, q: onnx.NodeProto) -> bool:
    """E-15: Q reads the output of a weighted op and at least one of its DQs feeds something else."""
    src, _ = g.upstream(q.input[0])
    if src is None or not g.is_weighted(src):
        return False
    uses = [n for dq in g.dq_consumers(q) for n, _ in g.downstream(dq.output[0])]
    return any(n.op_type not in WEIGHTED_OPS for n in uses)


def _nonresidual_input(g: _Graph, add: onnx.NodeProto) -> int | None:
    """E-16: index of the Add input on the longer path from the inputs' lowest common ancestor (ModelOpt rule)."""
    key = id(add)
    if key not in g.memo:
        g.memo[key] = _longer_path_input(g, add)
    return g.memo[key]


def _longer_path_input(g: _Graph, add: onnx.NodeProto) -> int | None:
    if len(add.input) != 2 or any(g.is_constant_like(i) for i in add.input):
        return None  # a bias add

    def distances(start: str) -> dict[str, int]:
        dist, frontier = {start: 0}, [start]
        while frontier:
            nxt = []
            for name in frontier:
                p = g.producer.get(name)
                for i in p.input if p is not None and p.op_type not in SHAPE_OPS else ():
                    if i and i not in dist and not g.is_constant_like(i):
                        dist[i] = dist[name] + 1
                        nxt.append(i)
            frontier = nxt
        return dist

    da, db = distances(add.input[0]), distances(add.input[1])
    common = set(da) & set(db)
    if not common:
        return None
    lca = min(common, key=lambda n: (da[n] + db[n], n))
    if da[lca] == db[lca]:
        return None
    return 0 if da[lca] > db[lca] else 1


def _is_nonresidual_dq(g: _Graph, dq: onnx.NodeProto) -> bool:
    return any(n.op_type == "Add" and _nonresidual_input(g, n) == i for n, i in g.consumers.get(dq.output[0], []))


def _high_precision_uses(g: _Graph, dq: onnx.NodeProto) -> list[tuple[onnx.NodeProto, int]]:
    """(node, input index) of the E-18 ops a DQ feeds, looking forward through commuting ops."""
    return [(n, i) for n, i in g.downstream(dq.output[0]) if n.op_type in HIGH_PRECISION_OPS]


def _activation_pairs(g: _Graph) -> Iterator[tuple[onnx.NodeProto, onnx.NodeProto]]:
    for q in g.qdq_nodes:
        if q.op_type == QUANTIZE and not g.is_weight_qdq(q):
            for dq in g.dq_consumers(q):
                yield q, dq


def _e14_unattached_qdq(g: _Graph) -> Iterator[_Finding]:
    trt = g.target.is_tensorrt
    for q, dq in _activation_pairs(g):
        uses = g.downstream(dq.output[0])
        if any(n.op_type in WEIGHTED_OPS for n, _ in uses):
            continue  # input quantizer of a quantized op (activation x activation MatMul included)
        src, _ = g.upstream(q.input[0])
        if src is not None and g.is_weighted(src):
            continue  # output quantizer (E-22 on ONNX Runtime; E-15 warns on TensorRT)
        if trt and (_high_precision_uses(g, dq) or _is_nonresidual_dq(g, dq)):
            continue  # E-16/E-18 explain it
        shown = ", ".join(sorted({n.op_type for n, _ in uses})) or "nothing"
        yield _Finding(
            g.label(q),
            f"Q/DQ pair '{g.label(q)}' -> '{g.label(dq)}' is not attached to a quantized op "
            f"(its DQ feeds {shown}): it rounds the tensor and costs time, for no integer kernel.",
            "remove the pair, or make sure the fake-quant model has the same quantizer (quest.md section 9).",
        )


def _e14_unmatched_layers(g: _Graph) -> Iterator[_Finding]:
    for layer in g.layers:
        if not g.layer_nodes(layer):
            skipped = [
                r
                for r, key in (("E-8", "w_bits"), ("E-9b", "a_bits"))
                if isinstance(layer.get(key), int) and layer[key] < 8
            ]
            note = f"; {' and '.join(skipped)} not checked for it" if skipped else ""
            yield _Finding(
                str(layer.get("name")),
                f"declared quantized layer '{layer.get('name')}' matches no Conv/ConvTranspose/Gemm/MatMul node{note}.",
                "keep the layer name in the quantized weight's initializer name, or give the layer a "
                "'node' key with the ONNX node name.",
            )


def _e15_output_qdq(g: _Graph) -> Iterator[_Finding]:
    for q in g.qdq_nodes:
        if q.op_type == QUANTIZE and not g.is_weight_qdq(q) and _is_output_qdq(g, q):
            src, _ = g.upstream(q.input[0])
            yield _Finding(
                g.label(q),
                f"Q/DQ on the output of {src.op_type} '{g.label(src)}': TensorRT fuses "
                "Conv + bias + activation itself, and this pair splits that fusion (extra INT8 "
                "reformat per call).",
                "quantize only the inputs of weighted ops; drop this output quantizer from the fake-"
                "quant model and re-evaluate.",
            )


def _e16_residual_add(g: _Graph) -> Iterator[_Finding]:
    for add in g.nodes:
        if add.op_type != "Add":
            continue
        i = _nonresidual_input(g, add)
        dq = g.producer.get(add.input[i]) if i is not None else None
        if dq is None or dq.op_type != DEQUANTIZE:
            continue
        q = g.activation_q(dq)
        if q is not None and _is_output_qdq(g, q):
            continue  # E-15 reports it
        yield _Finding(
            g.label(add),
            f"input {i} ('{add.input[i]}') of the residual Add comes from DQ "
            f"'{g.label(dq)}' on the non-residual branch (the longer path from the inputs' common "
            "ancestor): TensorRT can no longer fuse the Conv/GEMM with this Add.",
            "quantize only the skip input of a residual Add (mode residual-int8), or none (the default).",
        )


def _e17_concat_scales(g: _Graph) -> Iterator[_Finding]:
    for cat in g.nodes:
        if cat.op_type != "Concat":
            continue
        scales = {}
        for name in cat.input:
            p = g.producer.get(name)
            if p is not None and p.op_type == DEQUANTIZE and not g.is_weight_qdq(p):
                s = g.array(p.input[1])
                if s is not None:
                    scales[p.input[1]] = s.astype(np.float64).ravel()
        values = list(scales.values())
        if any(v.shape != values[0].shape or not np.array_equal(v, values[0]) for v in values[1:]):
            shown = ", ".join(f"{k}={_fmt(float(v[0]))}" for k, v in scales.items())
            yield _Finding(
                g.label(cat),
                f"quantized Concat inputs have different scales ({shown}); TensorRT merges "
                "the moved Qs only when their scales are equal.",
                "share one scale (max amax) across the Concat inputs, or keep the skip concat in FP16 "
                "with a Q/DQ on the next conv's input (E-17).",
            )


def _e18_high_precision_ops(g: _Graph) -> Iterator[_Finding]:
    for q, dq in _activation_pairs(g):
        if _is_output_qdq(g, q):
            continue  # E-15 reports it
        for n, i in _high_precision_uses(g, dq):
            if n.op_type == "Add" and _nonresidual_input(g, n) == i and n.input[i] == dq.output[0]:
                continue  # E-16 reports it
            residual = n.op_type == "Add" and _nonresidual_input(g, n) is not None
            note = (
                " on the skip input of a residual add (expected only in residual-int8 mode, E-16)" if residual else ""
            )
            yield _Finding(
                g.label(n),
                f"{HIGH_PRECISION_OPS[n.op_type]} '{g.label(n)}' reads DQ '{g.label(dq)}'"
                f"{note}: it stays in high precision on TensorRT, so the pair adds a reformat.",
                "keep GroupNorm/LayerNorm, SiLU/GELU, Softmax, Resize, residual adds and timestep "
                "embeddings free of Q/DQ (E-18).",
            )
    if not g.target.attention_quant:
        for mm in g.nodes:
            if mm.op_type == "MatMul" and not g.is_weighted(mm):
                dqs = [g.activation_qdq(mm, i)[1] for i in (0, 1)]
                if all(d is not None for d in dqs):
                    yield _Finding(
                        g.label(mm),
                        "attention MatMul with Q/DQ on both operands: INT8 MHA is not "
                        f"supported by TensorRT (target '{g.target.id}' keeps attention in FP16).",
                        "set attention_quant = off for TensorRT recipes and re-evaluate (quest.md 9.4).",
                    )


def _e19_shapes(g: _Graph) -> Iterator[_Finding]:
    for node in g.weighted_nodes:
        dq = g.weight_dq(node)
        w = g.weight_shape(node)
        if dq is None or w is None or not all(isinstance(d, int) for d in w):
            continue
        for problem in _shape_problems(g, node, dq, w):
            yield _Finding(
                g.label(node),
                f"{problem}: INT8 gains nothing here and the Q/DQ only adds cost.",
                "leave this layer in floating point (recipe override quantize = false), or accept the "
                "cost; QuEST keeps first/last layers quantized on purpose (E-19).",
            )


def _shape_problems(g: _Graph, node: onnx.NodeProto, dq: onnx.NodeProto, w: list[int]) -> Iterator[str]:
    if node.op_type in ("MatMul", "Gemm"):
        n_out = w[_out_channel_axis(node, len(w))]
        x = g.shapes.get(node.input[0])  # [..., M, K]
        m_is_batch = x is not None and len(x) == 2 and not isinstance(x[0], int)  # [batch, K], as in time embeddings
        m_is_one = x is not None and len(x) >= 2 and all(d == 1 for d in x[:-1])
        if n_out == 1 or m_is_batch or m_is_one:
            yield f"GEMV-shaped {node.op_type} (N = {n_out}, input {x}, M = batch or 1)"
        return
    group = _attr(node, "group", 1)
    c_out, c_in = (w[0], w[1] * group) if node.op_type == "Conv" else (w[1] * group, w[0])
    aligned = c_in % FIRST_LAYER_CHANNEL_MULTIPLE == 0 and c_out % FIRST_LAYER_CHANNEL_MULTIPLE == 0
    if min(c_in, c_out) < MIN_CHANNELS and not (aligned and _is_first_layer(g, node)):
        yield f"{node.op_type} with Cin={c_in}, Cout={c_out} (below {MIN_CHANNELS})"
    if group > 1 and (c_out % GROUPED_CONV_COUT_MULTIPLE or min(w[2:], default=0) < GROUPED_CONV_MIN_KERNEL):
        yield f"grouped {node.op_type} (group={group}, Cout={c_out}, kernel {w[2:]})"
    if g.dtype(dq.input[0]) in FP8_TYPES and int(np.prod(w[2:])) > FP8_CONV_MAX_KERNEL_AREA:
        yield f"FP8 {node.op_type} with kernel area {int(np.prod(w[2:]))} > {FP8_CONV_MAX_KERNEL_AREA}"


def _is_first_layer(g: _Graph, node: onnx.NodeProto) -> bool:
    """Whether input 0 comes straight from a graph input (through its Q/DQ and commuting ops)."""
    q, _ = g.activation_qdq(node)
    src, name = g.upstream(q.input[0] if q is not None else node.input[0])
    return src is None and name in g.graph_inputs


def _e20_name_exclusions(g: _Graph) -> Iterator[_Finding]:
    for node in g.weighted_nodes:
        dq = g.weight_dq(node)
        if dq is None:
            continue
        names = [node.name, dq.input[0], dq.name] + g.layer_names_of(node)
        hits = [
            k for k in NAME_EXCLUSIONS if any(re.search(rf"(?<![A-Za-z0-9_]){k}(?![A-Za-z0-9_])", s) for s in names)
        ]
        if hits:
            costs = "; ".join(f"{k}: {NAME_EXCLUSIONS[k]}" for k in hits)
            yield _Finding(
                g.label(node),
                f"quantized layer matches NVIDIA's high-precision name list ({costs}).",
                "expected for QuEST's first/last layers (quest.md 2.7); otherwise exclude the layer with a "
                "recipe override quantize = false (E-20).",
            )


# -- the rule table --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One row of the rule table: a check function and where it applies."""

    rule_id: str
    severity: str  # error | warning
    title: str
    check: Callable[[_Graph], Iterable[_Finding]]
    trt_only: bool = False  # TensorRT targets only
    needs_layers: bool = False  # runs only when quantized_layers is given


# -- G: is this a graph the target's rules are about (a quantized UNet with the interface the runtimes feed)? -----


def _g1_quantized(g: _Graph) -> Iterator[_Finding]:
    if g.qdq_nodes or any(n.op_type in INTEGER_OPS for n in g.nodes):
        return
    yield _Finding(MODEL, "the graph has no quantized op (no QuantizeLinear/DequantizeLinear): it is a float graph, "
                   "so the target's quantization rules had nothing to check.",
                   "lint the model.onnx of an export folder (`quest-export export ... --target T`).")  # fmt: skip


def _g2_inputs(g: _Graph) -> Iterator[_Finding]:
    fix = ("export the UNet with `quest-export export`, whose graphs take sample (N, C, H, W), timestep (N,) and, "
           "when conditional, encoder_hidden_states (N, L, D), all float")  # fmt: skip
    inputs = [v for v in g.model.graph.input if v.name not in g.initializers]
    names = [v.name for v in inputs]
    missing = [n for n in REQUIRED_INPUTS if n not in names]
    if missing:
        yield _Finding(MODEL, f"the graph inputs are {names}, not the target's UNet interface: {missing} missing.",
                       f"{fix}.")  # fmt: skip
    cap = 2 * g.target.max_batch  # max_batch images per call, twice that under classifier-free guidance
    for v in inputs:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        rank = UNET_INPUTS.get(v.name, 1 if v.name == RATIOS_INPUT else None)
        if rank is None:
            yield _Finding(v.name, f"input '{v.name}' is not part of the target's UNet interface "
                           f"({', '.join([*UNET_INPUTS, RATIOS_INPUT])}); no runtime of quest-export feeds it.",
                           f"{fix}; weights and scales belong in initializers.")  # fmt: skip
            continue
        if t.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            yield _Finding(v.name, f"input '{v.name}' is {type_name(t.elem_type)}; the runtimes feed float32.",
                           f"{fix}.")  # fmt: skip
        if t.HasField("shape") and len(dims) != rank:
            yield _Finding(v.name, f"input '{v.name}' has rank {len(dims)}, the interface has rank {rank}.", f"{fix}.")
        elif v.name in UNET_INPUTS and dims and dims[0] is not None and dims[0] > cap:
            yield _Finding(v.name, f"input '{v.name}' has a fixed batch of {dims[0]}; target '{g.target.id}' runs "
                           f"at most {g.target.max_batch} images per call ({cap} UNet rows under guidance).",
                           "export with a dynamic or smaller batch.")  # fmt: skip


RULES: tuple[Rule, ...] = (
    Rule("G-1", "warning", "the graph is quantized (has Q/DQ or integer ops)", _g1_quantized),
    Rule("G-2", "warning", "the graph inputs are the UNet interface the target's runtime feeds", _g2_inputs),
    Rule("E-12", "error", "default-domain opset within the target's cap; INT4/block_size need opset 21", _e12_opset),
    Rule("E-13", "error", "IR version set, readable by onnxruntime 1.31 and by the target", _e13_ir_version),
    Rule("E-1", "error", "zero points are zero and signed (INT8/INT4) on TensorRT", _e1_zero_points),
    Rule("E-1", "error", "no unsigned integer tensors on TensorRT targets", _e1_unsigned_tensors, trt_only=True),
    Rule("E-2", "error", "activation scales are constant; per-tensor on TensorRT", _e2_activation_scales),
    Rule("E-2", "error", "no multiply between a DQ and its Conv/GEMM", _e2_multiply_between_dq_and_op, trt_only=True),
    Rule("E-3", "error", "per-channel weight scales on the output-channel axis, length dim[axis]", _e3_weight_axes),
    Rule("E-4", "error", "block quantization on MatMul/Gemm only, block 64/128 along K", _e4_int4_blocks),
    Rule("E-6", "error", "scales positive, finite, FP16 scales normal", _e6_scale_values),
    Rule("E-7", "error", "scales, zero points and quantized weights are initializers", _e7_constants_are_initializers),
    Rule(
        "E-7", "error", "Conv weights are initializers or DQ of initializers", _e7_conv_weights_constant, trt_only=True
    ),
    Rule("E-8", "error", "no INT4 convolution on TensorRT", _e8_no_int4_conv, trt_only=True),
    Rule(
        "E-8",
        "error",
        "low-bit weights in an INT8 container stay on their grid",
        _e8_container_range,
        needs_layers=True,
    ),
    Rule(
        "E-9b",
        "error",
        "low-bit activations in an INT8 container are clipped to the grid",
        _e9b_low_bit_clip,
        needs_layers=True,
    ),
    Rule("E-10", "error", "declared weight storage matches the graph", _e10_declared_storage, needs_layers=True),
    Rule("E-11", "error", "INT4 GEMM weights on TensorRT are block-quantized", _e11_int4_gemm_blocked, trt_only=True),
    Rule("E-14", "error", "no ops the TensorRT parser does not support", _e14_unsupported_ops, trt_only=True),
    Rule("B-6", "error", "quantized types are offered by the target profile", _b6_types_in_profile),
    Rule("E-7", "warning", "INT8 and FP8 Q/DQ not mixed", _e7_int8_fp8_mix),
    Rule("E-14", "warning", "quantized ops have weight DQ and input Q/DQ", _e14_incomplete_qdq, trt_only=True),
    Rule("E-14", "warning", "every Q/DQ pair is attached to a quantized op", _e14_unattached_qdq),
    Rule("E-14", "warning", "every declared quantized layer is in the graph", _e14_unmatched_layers, needs_layers=True),
    Rule("E-15", "warning", "no Q/DQ on outputs of weighted ops", _e15_output_qdq, trt_only=True),
    Rule("E-16", "warning", "residual adds quantize only their skip input", _e16_residual_add, trt_only=True),
    Rule("E-17", "warning", "quantized Concat inputs share one scale", _e17_concat_scales, trt_only=True),
    Rule(
        "E-18",
        "warning",
        "no Q/DQ on GroupNorm, Softmax, Resize, adds, attention core",
        _e18_high_precision_ops,
        trt_only=True,
    ),
    Rule("E-19", "warning", "no Q/DQ on GEMV-shaped or tiny-channel layers", _e19_shapes, trt_only=True),
    Rule("E-20", "warning", "NVIDIA's high-precision layer names", _e20_name_exclusions, trt_only=True),
)
