"""The layer audit of a built engine (deploy.md H-5): did every quantized layer get an INT8 (or FP8) kernel?

Reads TensorRT's layer information at DETAILED verbosity (``trtexec --exportLayerInfo`` or ``IEngineInspector``).
Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from quest_export_runtime.errors import ArtifactError

_COMPUTE = re.compile(r"conv|gemm|matrixmultiply|matmul|fullyconnected|myelin", re.I)
_QUANT_TYPE = re.compile(r"(?<![a-z0-9])(int8|fp8|float8)(?![0-9])", re.I)
_QUANT_TACTIC = re.compile(r"i8i8|imma|int8|fp8|e4m3", re.I)
_UNFUSED_QDQ = re.compile(r"^(scale|quantize|dequantize)$", re.I)


@dataclass(frozen=True)
class LayerFinding:
    """One engine layer the audit flags."""

    name: str
    layer_type: str
    input_types: tuple[str, ...]
    tactic: str
    reason: str


@dataclass(frozen=True)
class AuditReport:
    """H-5: did every quantized Conv/Gemm/MatMul get an INT8 (or FP8) kernel, and is nothing left over?"""

    checked: tuple[str, ...]  # quantized layers expected in the engine
    quantized: tuple[str, ...]  # those that run an INT8/FP8 kernel
    not_int8: tuple[LayerFinding, ...] = ()  # quantized layers on a float kernel
    missing: tuple[str, ...] = ()  # expected layers no engine layer names
    stray: tuple[LayerFinding, ...] = ()  # unfused Q/DQ (Scale) layers and inner reformat layers

    @property
    def ok(self) -> bool:
        return not (self.not_int8 or self.missing or self.stray)

    def summary(self) -> str:
        """One line: '12/12 quantized layers run INT8/FP8 kernels; 1 stray Scale/reformat layers'."""
        parts = [f"{len(self.quantized)}/{len(self.checked)} quantized layers run INT8/FP8 kernels"]
        if self.not_int8:
            parts.append(f"{len(self.not_int8)} on float kernels ({', '.join(f.name for f in self.not_int8[:3])})")
        if self.missing:
            parts.append(f"{len(self.missing)} not found in the engine ({', '.join(self.missing[:3])})")
        if self.stray:
            parts.append(f"{len(self.stray)} stray Scale/reformat layers")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    @classmethod
    def from_dict(cls, d: dict) -> AuditReport:
        def findings(key: str) -> tuple[LayerFinding, ...]:
            return tuple(LayerFinding(**{**f, "input_types": tuple(f["input_types"])}) for f in d.get(key, []))

        return cls(tuple(d["checked"]), tuple(d["quantized"]), findings("not_int8"), tuple(d.get("missing", [])),
                   findings("stray"))  # fmt: skip


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[^A-Za-z0-9_]+", text) if t]


def _names(layer: dict, expected: str) -> bool:
    """Whether the layer's Name or ONNX metadata mentions ``expected`` as a whole run of name tokens."""
    want = _tokens(expected)
    have = _tokens(f"{layer.get('Name', '')} {layer.get('Metadata', '')}")
    return bool(want) and any(have[i : i + len(want)] == want for i in range(len(have) - len(want) + 1))


def _types(layer: dict) -> tuple[str, ...]:
    return tuple(str(t.get("Format/Datatype", "")) for t in layer.get("Inputs", []) if isinstance(t, dict))


def _finding(layer: dict, reason: str) -> LayerFinding:
    return LayerFinding(str(layer.get("Name", "")), str(layer.get("LayerType", "")), _types(layer),
                        str(layer.get("TacticName", "")), reason)  # fmt: skip


def _runs_quantized(layer: dict) -> bool:
    return any(_QUANT_TYPE.search(t) for t in _types(layer)) or bool(
        _QUANT_TACTIC.search(str(layer.get("TacticName", "")))
    )


def audit_layers(layer_info: dict, expected_quantized: list[str]) -> AuditReport:
    """Check an engine's layer information against the layers that should run quantized (H-5).

    Args:
        layer_info: TensorRT's layer-information JSON at DETAILED verbosity (``trtexec --exportLayerInfo``
            or ``IEngineInspector``): {"Layers": [{"Name", "LayerType", "Inputs": [{"Format/Datatype"}],
            "Outputs", "TacticName", "Metadata", ...}], "Bindings": [...]}.
        expected_quantized: ONNX node names (or module names) of the quantized Conv/Gemm/MatMul layers;
            a name matches an engine layer whose name or ONNX metadata contains it as whole tokens.

    Returns:
        An ``AuditReport``: layers on float kernels, layers not found, and stray Scale layers (unfused
        Q/DQ) or reformat layers that do not touch an engine input or output.

    Raises:
        ArtifactError: the layer information was exported without ``--profilingVerbosity=detailed``.
    """
    layers = layer_info.get("Layers", []) if isinstance(layer_info, dict) else layer_info
    if any(not isinstance(layer, dict) for layer in layers):
        raise ArtifactError("layer information holds only names; rebuild with --profilingVerbosity=detailed (B-12)")
    bindings = set(layer_info.get("Bindings", [])) if isinstance(layer_info, dict) else set()
    quantized, not_int8, missing = [], [], []
    for name in expected_quantized:
        hits = [layer for layer in layers if _names(layer, name)]
        compute = [layer for layer in hits if _COMPUTE.search(str(layer.get("LayerType", "")))] or hits
        if not hits:
            missing.append(name)
        elif any(_runs_quantized(layer) for layer in compute):
            quantized.append(name)
        else:
            not_int8.append(_finding(compute[0], f"'{name}' is quantized in the graph but runs a float kernel"))
    stray = []
    for layer in layers:
        kind = str(layer.get("LayerType", ""))
        if _UNFUSED_QDQ.match(kind):
            stray.append(_finding(layer, "unfused Q/DQ runs as its own layer"))
        elif kind.lower() == "reformat":
            io = {t.get("Name") for t in layer.get("Inputs", []) + layer.get("Outputs", []) if isinstance(t, dict)}
            if not io & bindings:
                stray.append(_finding(layer, "reformat copy inside the network"))
    return AuditReport(tuple(expected_quantized), tuple(quantized), tuple(not_int8), tuple(missing), tuple(stray))
