"""``quest-export lint`` / ``python -m quest_export.export.lint MODEL --target T``: print (and save) a lint report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from quest_export_runtime.outputs import check_output, write_text_atomic

from quest_export.errors import InputError, QuestExportError
from quest_export.export.lint import lint_model


def _read_layers(path: str | None) -> list[dict] | None:
    """A JSON list of layers, or a manifest whose 'layers' key holds it."""
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(
            f"cannot read quantized layers from {path} ({e}); pass a JSON list or a manifest.json."
        ) from None
    layers = data.get("layers") if isinstance(data, dict) else data
    if not isinstance(layers, list):
        raise InputError(f"{path} holds no layer list; pass a JSON list or a manifest.json with a 'layers' key.")
    return layers


def main(argv: list[str] | None = None) -> int:
    """``python -m quest_export.export.lint MODEL --target T [--json OUT] [--quantized-layers FILE]``.

    Returns:
        int: 0 when no hard rule is broken, 2 when one is (or on a user error).
    """
    from quest_export.recipe.targets import list_targets, load_target

    parser = argparse.ArgumentParser(prog="quest-export lint", description="Check a QDQ ONNX graph against a target.")
    parser.add_argument("model", help="the .onnx file")
    parser.add_argument("--target", required=True, help=f"target id: {', '.join(list_targets())}, or jetson")
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT")
    parser.add_argument("--quantized-layers", metavar="FILE", help="JSON layer list or export manifest.json")
    args = parser.parse_args(argv)
    try:
        if args.json:
            check_output(args.json, "file")
        report = lint_model(args.model, load_target(args.target), quantized_layers=_read_layers(args.quantized_layers))
        sys.stdout.write(report.format_text() + "\n")
        if args.json:
            write_text_atomic(args.json, report.to_json() + "\n")
    except QuestExportError as e:
        sys.stderr.write(f"error: {e}\n")
        return e.exit_code
    return 0 if report.ok else 2
