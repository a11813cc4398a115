"""ONNX post-processing of a traced QDQ graph: names, opset/IR, INT4 retyping, shared weights.

Never computes in-graph constants and never folds a DQ into float weights (deploy.md E-7, E-23).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from quest_export_runtime.outputs import atomic_file

INT4 = {"int4": TensorProto.INT4, "uint4": TensorProto.UINT4}


def fix_opset17(model: onnx.ModelProto) -> None:
    """Split-18's ``num_outputs`` attribute is unknown to opset 17: equal splits need no attribute."""
    for node in model.graph.node:
        if node.op_type == "Split":
            attrs = [a for a in node.attribute if a.name != "num_outputs"]
            if len(attrs) != len(node.attribute):
                del node.attribute[:]
                node.attribute.extend(attrs)


def inline_identity_initializers(model: onnx.ModelProto) -> int:
    """Undo the TorchScript exporter's de-duplication of equal initializers (``Identity(init)``).

    Equal scales of different quantizers (siblings reading the same tensor) otherwise reach their
    Q/DQ through an Identity node, which is not a build-time constant for TensorRT (E-2, E-7).
    """
    inits = {i.name: i for i in model.graph.initializer}
    keep, n = [], 0
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
            n += 1
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return n


def set_versions(model: onnx.ModelProto, *, opset: int, ir_version: int) -> None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    model.ir_version = ir_version  # always explicit (deploy.md E-13)


def retype_int4(model: onnx.ModelProto, names: dict[str, str]) -> list[str]:
    """Convert initializers (int8/uint8 holding 4-bit values) to INT4/UINT4 (deploy.md E-10, E-24).

    Args:
        names: initializer name -> "int4" | "uint4".
    Returns:
        the names converted. Raises ValueError naming a tensor whose values leave the 4-bit range.
    """
    import ml_dtypes

    done = []
    for i, init in enumerate(model.graph.initializer):
        kind = names.get(init.name)
        if kind is None:
            continue
        arr = numpy_helper.to_array(init)
        lo, hi = (-8, 7) if kind == "int4" else (0, 15)
        if arr.size and (arr.min() < lo or arr.max() > hi):
            raise ValueError(f"{init.name}: values {arr.min()}..{arr.max()} do not fit {kind}")
        np_dtype = ml_dtypes.int4 if kind == "int4" else ml_dtypes.uint4
        new = numpy_helper.from_array(arr.astype(np_dtype), init.name)
        model.graph.initializer[i].CopyFrom(new)
        done.append(init.name)
    if done:
        del model.graph.value_info[:]  # Q outputs change type with their zero point; let runtimes re-infer
    return done


def widen_int4_weights(model: onnx.ModelProto, names: set[str]) -> int:
    """Put a ``Cast`` to INT8 (UINT4: UINT8) between each INT4 weight initializer in ``names`` (and its zero point)
    and its DequantizeLinear: the file keeps 4-bit storage, and ONNX Runtime folds the Cast into an INT8
    initializer when it loads the graph (constant folding, BASIC), so the weight DQ then matches its QDQ fusion
    selectors (QLinearConv, QGemm, MatMulIntegerToFloat), which take 8-bit weights only (issue 17). Exact: the
    cast widens the same integers, the DQ scale is unchanged. Returns the number of Cast nodes added."""
    inits = {i.name: i for i in model.graph.initializer}
    wide = {TensorProto.INT4: TensorProto.INT8, TensorProto.UINT4: TensorProto.UINT8}
    casts: dict[str, str] = {}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in names:
            for j in (0, 2):
                src = node.input[j] if j < len(node.input) else ""
                init = inits.get(src)
                if init is None or init.data_type not in wide:
                    continue
                if src not in casts:
                    casts[src] = f"{src}.widened"
                    nodes.append(onnx.helper.make_node("Cast", [src], [casts[src]], to=wide[init.data_type],
                                                       name=f"{src}.widen"))  # fmt: skip
                node.input[j] = casts[src]
        nodes.append(node)
    if casts:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return len(casts)


def blockify_int4_weights(model: onnx.ModelProto, layers: list[str], block: int) -> list[str]:
    """Rewrite per-channel W4 MatMul weights as INT4 block-quantized weight-only DQ (deploy.md E-4, E-11).

    A per-output-channel 4-bit grid is a block quantization whose blocks along K all share their column's
    scale, so the numerics do not change: B (K, N) int8 holding [-8, 7] becomes INT4, the scale (N,) becomes
    (K / block, N), the zero point an all-zero INT4 tensor of that shape, and the DQ gets axis=0 and
    ``block_size``. Layers with K not divisible by ``block`` or an odd N keep the INT8 container.

    Returns:
        the layer names rewritten.
    """
    import ml_dtypes

    inits = {i.name: i for i in model.graph.initializer}
    dq_of = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    done = []
    for name in layers:
        wname = f"unet.{name}.weight_quantizer.export_w"
        node = dq_of.get(wname)
        if node is None or wname not in inits:
            continue
        w = numpy_helper.to_array(inits[wname])  # (K, N)
        k, n = w.shape
        if k % block or n % 2 or w.min() < -8 or w.max() > 7:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]]).reshape(1, n)
        rows = k // block
        repl = {wname: numpy_helper.from_array(w.astype(ml_dtypes.int4), wname),
                node.input[1]: numpy_helper.from_array(np.repeat(scale, rows, 0).astype(np.float32), node.input[1]),
                node.input[2]: numpy_helper.from_array(np.zeros((rows, n), ml_dtypes.int4), node.input[2])}  # fmt: skip
        for i, init in enumerate(model.graph.initializer):
            if init.name in repl:
                model.graph.initializer[i].CopyFrom(repl[init.name])
        attrs = [a for a in node.attribute if a.name not in ("axis", "block_size")]
        del node.attribute[:]
        node.attribute.extend(
            attrs + [onnx.helper.make_attribute("axis", 0), onnx.helper.make_attribute("block_size", block)]
        )
        done.append(name)
    if done:
        del model.graph.value_info[:]
    return done


def name_qdq_nodes(model: onnx.ModelProto) -> None:
    """Name each Q/DQ node after its scale initializer: '<quantizer>/QuantizeLinear' (readable in lint and TRT logs)."""
    seen: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 1:
            base = node.input[1].removesuffix(".export_scale").removeprefix("unet.")
            name = f"{base}/{node.op_type}"
            k = seen.get(name, 0)
            seen[name] = k + 1
            node.name = name if k == 0 else f"{name}_{k}"


def set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=str(v))


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return dict(sorted(out.items()))


def write_shared_weights(models: list[onnx.ModelProto], out_dir: Path, files: list[str], weights: str) -> None:
    """Save graphs that share their identical initializers through one external data file.

    An initializer whose name and bytes are equal in every graph is written once to ``weights``
    and referenced by offset from each graph; the rest (per-group scales) stay inline.
    """
    first = {i.name: i for i in models[0].graph.initializer}
    shared = set(first)
    for m in models[1:]:
        here = {i.name: i.raw_data or i.SerializeToString() for i in m.graph.initializer}
        shared &= {n for n in here if n in first and here[n] == (first[n].raw_data or first[n].SerializeToString())}
    offsets: dict[str, tuple[int, int]] = {}
    wpath = out_dir / weights
    with atomic_file(wpath) as tmp, open(tmp, "wb") as f:
        for name in sorted(shared):
            data = numpy_helper.to_array(first[name]) if not first[name].raw_data else None
            raw = first[name].raw_data if data is None else _raw(first[name])
            pad = (-f.tell()) % 64  # 64-byte alignment, as onnx's own writer
            f.write(b"\0" * pad)
            offsets[name] = (f.tell(), len(raw))
            f.write(raw)
    for m, fname in zip(models, files):
        for init in m.graph.initializer:
            if init.name in offsets:
                if not init.raw_data:
                    init.raw_data = _raw(init)
                    _clear_typed(init)
                off, length = offsets[init.name]
                del init.external_data[:]
                init.data_location = TensorProto.EXTERNAL
                for k, v in (("location", weights), ("offset", str(off)), ("length", str(length))):
                    init.external_data.add(key=k, value=v)
                init.ClearField("raw_data")
        onnx.save_model(m, str(out_dir / fname))


def _raw(init: TensorProto) -> bytes:
    if init.raw_data:
        return init.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(init)).raw_data


def _clear_typed(init: TensorProto) -> None:
    for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        init.ClearField(f)


def load_with_external(path: str | Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def to_numpy_feed(arrays: dict) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v) for k, v in arrays.items()}


# -- graphs past protobuf's 2 GB limit (issue 15) ------------------------------------------------------------------
# A ModelProto can hold more than 2 GB in memory, but protobuf cannot serialize it: onnx's checker, shape inference
# and version converter, and an ONNX Runtime session made from bytes, all serialize. Their inputs are lifted out of
# the large initializers first (``strip``) and the bytes are put back afterwards (``restore``); files past
# EXTERNAL_DATA_AUTO keep their initializers in ``<file>.data`` beside them (``save_graph``).

EXTERNAL_DATA_AUTO = 256 << 20  # initializer bytes above which `export.external_data=auto` writes <file>.data
STRIP_MIN = 4096  # initializers at least this large are lifted out by strip(); shape constants stay inline
_STRIPPED = "__quest_export_stripped__"


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers held in the proto (raw or typed fields; external ones not counted)."""
    total = 0
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            continue
        if init.raw_data:
            total += len(init.raw_data)
        else:
            total += int(np.prod(init.dims, dtype=np.int64)) * 4
    return total


def strip(model: onnx.ModelProto, min_bytes: int = STRIP_MIN) -> dict[str, bytes]:
    """Lift the bytes of every initializer of at least ``min_bytes`` out of ``model`` (in place); returns them.

    The lifted tensors are marked external (location ``__quest_export_stripped__``), so the proto stays valid for
    the checker, shape inference and the version converter, which read dims and types only.
    """
    stash: dict[str, bytes] = {}
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            continue
        if not init.raw_data and int(np.prod(init.dims, dtype=np.int64)) * 4 >= min_bytes:
            init.raw_data = _raw(init)
            _clear_typed(init)
        if len(init.raw_data) >= min_bytes:
            stash[init.name] = init.raw_data
            init.ClearField("raw_data")
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            init.external_data.add(key="location", value=_STRIPPED)
    return stash


def restore(model: onnx.ModelProto, stash: dict[str, bytes]) -> None:
    """Put back what ``strip`` lifted out (``model`` may be a converted copy of the stripped proto)."""
    found = set()
    for init in model.graph.initializer:
        if init.name in stash and any(e.key == "location" and e.value == _STRIPPED for e in init.external_data):
            del init.external_data[:]
            init.ClearField("data_location")
            init.raw_data = stash[init.name]
            found.add(init.name)
    missing = set(stash) - found
    if missing:  # internal: a pass dropped or renamed an initializer it should not touch
        raise RuntimeError(f"initializers lost while their data was lifted out: {sorted(missing)[:5]}")


def convert_version_large(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """onnx's version converter on a graph of any size (the weights are lifted out around it)."""
    from onnx import version_converter

    stash = strip(model)
    try:
        out = version_converter.convert_version(model, opset)
    finally:
        restore(model, stash)
    restore(out, stash)
    return out


def check_model_large(model: onnx.ModelProto, *, limit: int = EXTERNAL_DATA_AUTO) -> None:
    """onnx.checker.check_model(full_check=True) on a graph of any size: past ``limit`` initializer bytes, on a
    copy written with external data (the checker reads that file's tensors by path, never the proto's bytes)."""
    import tempfile

    if initializer_bytes(model) <= limit:
        onnx.checker.check_model(model, full_check=True)
        return
    with tempfile.TemporaryDirectory(prefix="quest-check-") as td:
        save_graph(model, Path(td) / "check.onnx", external=True)
        onnx.checker.check_model(str(Path(td) / "check.onnx"), full_check=True)


def save_graph(model: onnx.ModelProto, path: str | Path, *, external: bool) -> str | None:
    """Write ``model`` to ``path``; with ``external``, its initializers (>= 1 KiB) go to ``<name>.data`` beside it.

    Returns the data file's name, or None. ``model`` is left as it was (the writer works on a copy's data).
    """
    path = Path(path)
    if not external:
        onnx.save_model(model, str(path))
        return None
    location = path.name + ".data"
    stash = strip(model, min_bytes=1024)
    offsets: dict[str, tuple[int, int]] = {}
    with atomic_file(path.parent / location) as tmp, open(tmp, "wb") as f:
        for name, raw in stash.items():
            f.write(b"\0" * ((-f.tell()) % 64))  # 64-byte alignment, as onnx's own writer
            offsets[name] = (f.tell(), len(raw))
            f.write(raw)
    try:
        for init in model.graph.initializer:
            if init.name in offsets:
                del init.external_data[:]
                off, length = offsets[init.name]
                for k, v in (("location", location), ("offset", str(off)), ("length", str(length))):
                    init.external_data.add(key=k, value=v)
        onnx.save_model(model, str(path))
    finally:
        for init in model.graph.initializer:
            if init.name in stash:
                del init.external_data[:]
                init.ClearField("data_location")
                init.raw_data = stash[init.name]
    return location


def session_source(model: onnx.ModelProto, workdir: str | Path) -> str | bytes:
    """What an ONNX Runtime session is made from: the bytes, or (past EXTERNAL_DATA_AUTO) a file with external
    data written under ``workdir``."""
    if initializer_bytes(model) <= EXTERNAL_DATA_AUTO:
        return model.SerializeToString()
    path = Path(workdir) / "session.onnx"
    save_graph(model, path, external=True)
    return str(path)
