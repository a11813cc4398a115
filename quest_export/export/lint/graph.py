"""The graph index every lint rule reads (``_Graph``), and the constants the spec names (deploy.md section 2).

``_Graph`` indexes one ONNX graph once: producers and consumers of every tensor, initializers and constants,
value types and shapes, the quantized layers of the manifest. The underscore names are the lint package's
internals; rules (``rules.py``) use them, users do not. Imports: numpy and onnx, never torch.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quest_export.recipe.config import TargetProfile

log = logging.getLogger(__name__)

# -- constants named by the spec -------------------------------------------------------------------------------

ORT_MAX_IR_VERSION = 13  # O-1, E-13: onnxruntime 1.31 refuses IR 14 (what onnx 1.23's make_model stamps)
INT4_MIN_OPSET = 21  # E-12: the INT4 type and the block_size attribute are new in opset 21
INT4_BLOCKS = (64, 128)  # E-4: block sizes along K
FP16_MIN_NORMAL = 2.0**-14  # E-6: FP16 scales must be normal numbers
MIN_CHANNELS = 16  # E-19: Conv with Cin or Cout below this gains nothing from INT8
FIRST_LAYER_CHANNEL_MULTIPLE = 8  # E-19: ...except INT8 first layers whose channels are a multiple of 8
GROUPED_CONV_COUT_MULTIPLE = 8  # E-19: grouped Conv needs Cout % 8 == 0
GROUPED_CONV_MIN_KERNEL = 3  # E-19: ...and kernel >= 3
FP8_CONV_MAX_KERNEL_AREA = 32  # E-19: FP8 Conv with kernel area > 32 is slow
MODEL = "<model>"  # the "node" of findings about the whole model (opset, IR version)

QUANTIZE, DEQUANTIZE = "QuantizeLinear", "DequantizeLinear"
QDQ_OPS = (QUANTIZE, DEQUANTIZE)
CONV_OPS = ("Conv", "ConvTranspose")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# ops TensorRT moves Q backwards and DQ forwards through (E-17); the placement walks look through them
COMMUTING_OPS = ("Reshape", "Transpose", "Slice", "Concat", "MaxPool", "Flatten", "Squeeze", "Unsqueeze", "Identity")
TRT_UNSUPPORTED_OPS = {
    "QLinearConv": "operator-oriented quantization",
    "QLinearMatMul": "operator-oriented quantization",
    "ConvInteger": "integer-output convolution",
    "MatMulInteger": "integer-output MatMul",
    "DynamicQuantizeLinear": "dynamic activation quantization (E-2: TensorRT needs build-time-constant scales)",
}
SHAPE_OPS = ("Shape", "Size")  # their output carries no data of their input (E-16 path lengths skip them)
# E-18: ops that stay in high precision; a DQ feeding one of them makes TensorRT run it with reformats
HIGH_PRECISION_OPS = {
    "GroupNormalization": "GroupNorm",
    "InstanceNormalization": "GroupNorm (InstanceNormalization form)",
    "LayerNormalization": "LayerNorm",
    "ReduceMean": "a normalization chain (ReduceMean)",
    "Pow": "a normalization chain (Pow)",
    "Sqrt": "a normalization chain (Sqrt)",
    "Softmax": "Softmax (attention core)",
    "Resize": "Resize",
    "Upsample": "Resize (Upsample)",
    "Sigmoid": "SiLU (Sigmoid)",
    "Gelu": "GELU",
    "Erf": "GELU (Erf)",
    "Tanh": "an activation (Tanh)",
    "Sin": "the timestep embedding (Sin)",
    "Cos": "the timestep embedding (Cos)",
    "Add": "Add",
}
# E-20: layer names NVIDIA's diffusion recipe keeps in high precision, with the expected cost of quantizing them
NAME_EXCLUSIONS = {
    "conv_in": "3-4 latent channels (E-19), negligible FLOPs; INT8 gains nothing, TensorRT may run DQ + FP16 conv",
    "conv_out": "3-4 latent channels (E-19), negligible FLOPs; INT8 gains nothing, TensorRT may run DQ + FP16 conv",
    "time_embedding": "GEMV-shaped (M = batch), negligible FLOPs: the Q/DQ only adds cost",
    "time_emb_proj": "GEMV-shaped (M = batch), negligible FLOPs: the Q/DQ only adds cost",
    "add_embedding": "GEMV-shaped (M = batch), negligible FLOPs: the Q/DQ only adds cost",
    "time_text_embed": "GEMV-shaped (M = batch), negligible FLOPs: the Q/DQ only adds cost",
    "conv_shortcut": "1x1 conv on the skip path, small FLOP share; its error goes straight into the residual stream",
    "proj_out": "entry/exit projection of a transformer block, small FLOP share",
    "norm_out": "entry/exit projection of a transformer block, small FLOP share",
    "pos_embed": "entry/exit projection of a transformer block, small FLOP share",
    "x_embedder": "entry/exit projection of a transformer block, small FLOP share",
    "context_embedder": "entry/exit projection of a transformer block, small FLOP share",
}

# G-2: the UNet interface every runtime of quest-export feeds (the exporter writes these names): input -> rank
UNET_INPUTS = {"sample": 4, "timestep": 1, "encoder_hidden_states": 3}
REQUIRED_INPUTS = ("sample", "timestep")
RATIOS_INPUT = "act_scale_ratios"  # the scale-input mode's per-group activation scale ratios (rank 1)
# G-1: ops that compute in a quantized type without Q/DQ nodes (ONNX's operator-level quantization)
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear")

T = TensorProto
UNSIGNED_TYPES = {T.UINT8, T.UINT4, T.UINT16}
INT4_TYPES = {T.INT4, T.UINT4}
INT16_TYPES = {T.INT16, T.UINT16}
FP8_TYPES = {T.FLOAT8E4M3FN, T.FLOAT8E4M3FNUZ, T.FLOAT8E5M2, T.FLOAT8E5M2FNUZ} | (
    {T.FLOAT8E8M0} if hasattr(T, "FLOAT8E8M0") else set()
)
FP4_TYPES = {T.FLOAT4E2M1} if hasattr(T, "FLOAT4E2M1") else set()
# E-10: manifest storage name -> (initializer type, block-quantized)
STORAGE_TYPES = {
    "int8": (T.INT8, False),
    "int8-container": (T.INT8, False),
    "int4": (T.INT4, False),
    "int4-block": (T.INT4, True),
}


def type_name(elem_type: int | None) -> str:
    """``TensorProto.INT8`` -> ``INT8``; ``None`` (unknown) -> ``unknown``."""
    if elem_type is None:
        return "unknown"
    return helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.")


# -- graph index -----------------------------------------------------------------------------------------------


class _Finding(NamedTuple):
    node: str
    message: str
    fix: str


def _contains_tokens(text: str, tokens: list[str]) -> bool:
    """Whether ``tokens`` appear contiguously in ``text`` split at '.', '/' and ':'."""
    parts = [p for p in re.split(r"[./:]", text) if p]
    n = len(tokens)
    return any(parts[i : i + n] == tokens for i in range(len(parts) - n + 1))


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The value of a Constant node as a TensorProto (value, value_float(s) or value_int(s))."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name in ("value_float", "value_floats"):
            return numpy_helper.from_array(np.asarray(helper.get_attribute_value(attr), np.float32))
        if attr.name in ("value_int", "value_ints"):
            return numpy_helper.from_array(np.asarray(helper.get_attribute_value(attr), np.int64))
    return None


def _value_infos(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, list]]:
    """Element types and shapes of every tensor onnx shape inference can type (declared ones as a fallback)."""
    from quest_export.export.graph import restore, strip

    stash = strip(model)  # shape inference serializes: the weights are lifted out (graphs past 2 GB)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, ValueError) as e:
        log.info("shape inference failed (%s); using the declared value_info only", e)
        inferred = model
    finally:
        restore(model, stash)
    types: dict[str, int] = {}
    shapes: dict[str, list] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return types, shapes


class _Graph:
    """Index of one ONNX graph and its target: producers, consumers, constants, element types and shapes."""

    def __init__(self, model: onnx.ModelProto, target: TargetProfile, layers: list[dict] | None) -> None:
        self.model, self.target, self.layers = model, target, layers or []
        graph = model.graph
        self.nodes = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = {v.name for v in graph.input}
        self.constant_nodes = {n.output[0]: n for n in self.nodes if n.op_type == "Constant" and n.output}
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for n in self.nodes:
            for i, name in enumerate(n.input):
                if name:
                    self.consumers[name].append((n, i))
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        self.types, self.shapes = _value_infos(model)
        self._arrays: dict[str, np.ndarray | None] = {}
        self.memo: dict[int, Any] = {}  # per-node results of costly checks (E-16 path lengths)
        self.qdq_nodes = [n for n in self.nodes if n.op_type in QDQ_OPS]
        self.weighted_nodes = [n for n in self.nodes if self.is_weighted(n)]
        self._layer_nodes = {id(layer): self._match_layer(layer) for layer in self.layers}

    # tensors
    def label(self, node: onnx.NodeProto) -> str:
        return node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"

    def tensor_label(self, name: str) -> str:
        """The node producing ``name``, or the initializer/graph input itself."""
        p = self.producer.get(name)
        return self.label(p) if p is not None else name

    def const_kind(self, name: str) -> str:
        """initializer | initializer-input (overridable) | constant-node | graph-input | computed."""
        if name in self.initializers:
            return "initializer-input" if name in self.graph_inputs else "initializer"
        if name in self.constant_nodes:
            return "constant-node"
        return "graph-input" if name in self.graph_inputs else "computed"

    def is_const(self, name: str) -> bool:
        return self.const_kind(name) in ("initializer", "initializer-input", "constant-node")

    def is_constant_like(self, name: str) -> bool:
        """A constant, or the output of a weight DQ (a dequantized constant)."""
        p = self.producer.get(name)
        return self.is_const(name) or (p is not None and p.op_type == DEQUANTIZE and self.is_weight_qdq(p))

    def array(self, name: str) -> np.ndarray | None:
        """Value of an initializer or Constant output (INT4/FP8 as ml_dtypes arrays); None if not constant."""
        if name not in self._arrays:
            tensor = self.initializers.get(name)
            if tensor is None and name in self.constant_nodes:
                tensor = _constant_tensor(self.constant_nodes[name])
            try:
                self._arrays[name] = None if tensor is None else numpy_helper.to_array(tensor)
            except (ValueError, TypeError, OSError) as e:  # external data not loaded, malformed raw data
                log.info("cannot read tensor %s: %s", name, e)
                self._arrays[name] = None
        return self._arrays[name]

    def dtype(self, name: str) -> int | None:
        if name in self.initializers:
            return self.initializers[name].data_type
        if name in self.constant_nodes:
            tensor = _constant_tensor(self.constant_nodes[name])
            return None if tensor is None else tensor.data_type
        p = self.producer.get(name)
        if p is not None and p.op_type == QUANTIZE:
            return self.q_output_type(p)
        return self.types.get(name)

    def shape(self, name: str) -> list | None:
        if name in self.initializers:
            return list(self.initializers[name].dims)
        arr = self.array(name) if name in self.constant_nodes else None
        return list(arr.shape) if arr is not None else self.shapes.get(name)

    # Q/DQ
    def q_output_type(self, q: onnx.NodeProto) -> int:
        """QuantizeLinear output type: output_dtype (opset 21), else the zero point's type, else UINT8."""
        out = _attr(q, "output_dtype", 0)
        if out:
            return out
        if len(q.input) > 2 and q.input[2]:
            return self.dtype(q.input[2]) or T.UINT8
        return T.UINT8

    def quantized_type(self, node: onnx.NodeProto) -> int | None:
        """The integer/FP8 type a Q produces or a DQ reads."""
        return self.q_output_type(node) if node.op_type == QUANTIZE else self.dtype(node.input[0])

    def zero_point(self, node: onnx.NodeProto) -> str | None:
        return node.input[2] if len(node.input) > 2 and node.input[2] else None

    def is_weight_qdq(self, node: onnx.NodeProto) -> bool:
        """A DQ of a constant (or of Q(constant), the intermediate form), or a Q of a constant."""
        if self.is_const(node.input[0]):
            return True
        p = self.producer.get(node.input[0])
        return node.op_type == DEQUANTIZE and p is not None and p.op_type == QUANTIZE and self.is_const(p.input[0])

    def activation_q(self, dq: onnx.NodeProto) -> onnx.NodeProto | None:
        p = self.producer.get(dq.input[0])
        return p if p is not None and p.op_type == QUANTIZE else None

    def dq_consumers(self, q: onnx.NodeProto) -> list[onnx.NodeProto]:
        return [n for n, _ in self.consumers.get(q.output[0], []) if n.op_type == DEQUANTIZE]

    # weighted ops
    def weight_dq(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """The DequantizeLinear feeding input 1 (the weight) of a Conv/ConvTranspose/Gemm/MatMul."""
        if len(node.input) < 2:
            return None
        p = self.producer.get(node.input[1])
        return p if p is not None and p.op_type == DEQUANTIZE and self.is_weight_qdq(p) else None

    def is_weighted(self, node: onnx.NodeProto) -> bool:
        """Conv/ConvTranspose/Gemm, or a MatMul whose B is a constant or a weight DQ."""
        if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            return True
        return node.op_type == "MatMul" and (self.is_const(node.input[1]) or self.weight_dq(node) is not None)

    def weight_shape(self, node: onnx.NodeProto) -> list | None:
        dq = self.weight_dq(node)
        return self.shape(dq.input[0] if dq is not None else node.input[1])

    def activation_qdq(
        self, node: onnx.NodeProto, index: int = 0
    ) -> tuple[onnx.NodeProto | None, onnx.NodeProto | None]:
        """(Q, DQ) feeding input ``index`` of ``node``, looking back through commuting ops; (None, None) if absent."""
        name, seen = node.input[index], set()
        while name and name not in seen:
            seen.add(name)
            p = self.producer.get(name)
            if p is None:
                break
            if p.op_type == DEQUANTIZE and not self.is_weight_qdq(p):
                return self.activation_q(p), p
            if p.op_type not in COMMUTING_OPS:
                break
            name = p.input[0]
        return None, None

    def downstream(self, name: str) -> list[tuple[onnx.NodeProto, int]]:
        """Consumers of ``name``, looking forward through commuting ops."""
        out, stack, seen = [], [name], set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            for n, i in self.consumers.get(t, []):
                if n.op_type in COMMUTING_OPS:
                    stack.extend(o for o in n.output if o)
                else:
                    out.append((n, i))
        return out

    def upstream(self, name: str) -> tuple[onnx.NodeProto | None, str]:
        """The first producer of ``name`` that is not a commuting op or a bias Add, and the tensor reached."""
        seen = set()
        while name not in seen:
            seen.add(name)
            p = self.producer.get(name)
            if p is None:
                return None, name
            if p.op_type in COMMUTING_OPS:
                name = p.input[0]
            elif p.op_type == "Add" and len(p.input) == 2 and any(self.is_constant_like(i) for i in p.input):
                name = next((i for i in p.input if not self.is_constant_like(i)), p.input[0])  # bias add
            else:
                return p, name
        return None, name

    # quantized_layers
    def _match_layer(self, layer: dict) -> list[onnx.NodeProto]:
        """Weighted nodes of a manifest layer: its 'node' key, else its dotted name inside a node/weight name."""
        if layer.get("node"):
            return [n for n in self.weighted_nodes if n.name == layer["node"]]
        tokens = [t for t in str(layer.get("name", "")).split(".") if t]
        if not tokens:
            return []
        out = []
        for n in self.weighted_nodes:
            dq = self.weight_dq(n)
            names = [n.name, n.input[1]] + ([dq.name, dq.input[0]] if dq is not None else [])
            if any(_contains_tokens(s, tokens) for s in names):
                out.append(n)
        return out

    def layer_nodes(self, layer: dict) -> list[onnx.NodeProto]:
        return self._layer_nodes[id(layer)]

    def layer_names_of(self, node: onnx.NodeProto) -> list[str]:
        return [str(layer.get("name")) for layer in self.layers if node in self.layer_nodes(layer)]

    def has_int4(self) -> bool:
        """Any INT4/UINT4 initializer or Q/DQ, or any block_size attribute (E-12)."""
        if any(t.data_type in INT4_TYPES for t in self.initializers.values()):
            return True
        return any(self.quantized_type(n) in INT4_TYPES or _attr(n, "block_size", 0) for n in self.qdq_nodes)


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _out_channel_axis(node: onnx.NodeProto, rank: int) -> int:
    """E-3: the weight axis that holds the output channels."""
    if node.op_type == "Conv":
        return 0  # [Cout, Cin/g, kh, kw]
    if node.op_type == "ConvTranspose":
        return 1  # [Cin, Cout/g, kh, kw]
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1  # [N, K] with transB=1, else [K, N]
    return rank - 1  # MatMul B: [..., K, N]


def _k_axis(node: onnx.NodeProto, rank: int) -> int:
    """E-4: the weight axis that is reduced (K) in a Gemm/MatMul."""
    if node.op_type == "Gemm":
        return 1 if _attr(node, "transB", 0) else 0
    return rank - 2


def _fmt(x: float) -> str:
    return f"{x:.9g}"
