"""Target rule checker for exported QDQ graphs (``quest-export lint MODEL.onnx --target T``).

Checks one ONNX graph against the rules of one target profile (deploy.md section 2, "Graph check") without
TensorRT and without torch. *Errors* are graphs that cannot run correctly on the target: E-1...E-13, the
TensorRT parser's unsupported ops (filed under E-14, the Q/DQ form), Conv weights that are not initializers,
per-channel scale lengths, INT4 block rules, opset/IR and quantized types against the profile (B-6); the
exporter refuses to write a model with any of them. *Warnings* are graphs that run, but slower than they
could: Q/DQ placement (E-14...E-20) and INT8/FP8 mixing, each with its expected cost. Two warnings say the graph
is not one the target's rules are about, and the report's last line then reads "NOT CHECKED" instead of "OK":
G-1, no quantized op at all (a float graph), and G-2, inputs that are not the UNet interface the runtimes feed.

The package: ``graph`` (the ``_Graph`` index and the spec's constants), ``rules`` (one function per rule and
the ``RULES`` table), ``report`` (``Violation``, ``LintReport``), ``cli`` (``python -m quest_export.export.lint``),
and here ``lint_model``, which runs the rules of a target over one graph.

Usage::

    report = lint_model("model.onnx", load_target("jetson"), quantized_layers=manifest["layers"])
    report.raise_for_errors()        # ExportError naming every broken rule and node
    python -m quest_export.export.lint model.onnx --target jetson [--json lint.json] [--quantized-layers manifest.json]
"""

from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from quest_export.errors import InputError
from quest_export.export.lint.graph import MODEL, TRT_UNSUPPORTED_OPS, _Graph
from quest_export.export.lint.report import LintReport, Violation
from quest_export.export.lint.rules import RULES, Rule
from quest_export.recipe.config import TargetProfile

# -- API -------------------------------------------------------------------------------------------------------


def _load(model: onnx.ModelProto | str | Path) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "model"
    path = Path(model)
    if not path.is_file():
        raise InputError(f"ONNX model {path} does not exist; pass the model.onnx of an export folder.")
    try:
        return onnx.load(str(path)), str(path)
    except DecodeError as e:
        raise InputError(f"{path} is not a readable ONNX model ({e}); re-export it.") from None


def _check_layers(quantized_layers: list[dict] | None) -> list[dict]:
    layers = list(quantized_layers or [])
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or not layer.get("name"):
            raise InputError(
                f"quantized_layers[{i}] = {layer!r} has no 'name'; pass the manifest's 'layers' list "
                "(formats.md: name, kind, w_bits, a_bits, storage, a_storage)."
            )
    return layers


def lint_model(
    model: onnx.ModelProto | str | Path, target: TargetProfile, *, quantized_layers: list[dict] | None = None
) -> LintReport:
    """Check an exported QDQ graph against the hard rules and placement advice of one target.

    Args:
        model: the graph, or the path of an .onnx file (external data is loaded from beside it).
        target: the target profile (``quest_export.recipe.load_target``).
        quantized_layers: the export manifest's ``layers`` list; enables the per-layer checks (E-8 container
            range, E-9b A4 clip, E-10 storage). A layer is found through its ``node`` key, else through its
            dotted name inside a node or weight-initializer name.

    Returns:
        LintReport: errors (hard rules) and warnings (speed), each naming the node and the fix.

    Raises:
        InputError: the file is missing or not ONNX, or a quantized layer has no name.
    """
    proto, name = _load(model)
    g = _Graph(proto, target, _check_layers(quantized_layers))
    report = LintReport(target=target.id, model=name)
    for rule in RULES:
        if (rule.trt_only and not target.is_tensorrt) or (rule.needs_layers and not g.layers):
            continue
        for f in rule.check(g):
            v = Violation(rule.rule_id, f.node, f.message, f.fix, rule.severity)
            (report.errors if rule.severity == "error" else report.warnings).append(v)
    return report


__all__ = ["MODEL", "RULES", "TRT_UNSUPPORTED_OPS", "LintReport", "Rule", "Violation", "lint_model"]
