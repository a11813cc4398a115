"""Turn a build folder's manifest and verify.json into report.md. Reads what the stages saved; no torch."""

from __future__ import annotations

import json
from pathlib import Path

from quest_export_runtime.manifest import read_manifest


def render(path: str | Path) -> str:
    path = Path(path)
    m = read_manifest(path)
    lines = [f"# quest-export report: {path.name}", ""]
    t = m.get("target", {})
    p = m.get("precision", {})
    lines += [f"- stage: `{m['stage']}`, target `{t.get('id')}` ({t.get('description', '')})",
              f"- precision: **{p.get('mode')}** — {p.get('note')}",
              f"- timestep groups: {m.get('groups', {}).get('count')} ({m.get('scale_mode')} scales)",
              f"- sampler: {json.dumps(m.get('sampler'))}",
              f"- recipe fingerprint: `{m.get('recipe_fingerprint')}`",
              f"- ONNX: opset {m.get('onnx', {}).get('opset')}, IR {m.get('onnx', {}).get('ir_version')}, "
              f"Q/DQ nodes {m.get('onnx', {}).get('qdq_nodes')}", ""]  # fmt: skip
    if m.get("build"):
        b = m["build"]
        lines += ["## TensorRT build (on the device)", "", f"- TensorRT {b.get('trt_version')}, typing {b.get('typing')}, "
                  f"flags `{' '.join(b.get('flags', []))}`", "- run `bash build.sh` on the device", ""]  # fmt: skip
    if m.get("fusion"):
        lines += ["## ONNX Runtime fusion audit", "", "| graph | level | fused / Q/DQ op counts |", "|---|---|---|"]
        for g, levels in m["fusion"]["graphs"].items():
            for lvl, counts in levels.items():
                lines.append(f"| {g} | {lvl} | {', '.join(f'{k} {v}' for k, v in counts.items())} |")
        lines.append("")
    layers = m.get("layers", [])
    if layers:
        lines += [
            "## Layers",
            "",
            "| layer | w bits | a bits | weight storage | activation storage |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['name']} | {r['w_bits']} | {r['a_bits']} | {r['storage']} | {r['a_storage']} |" for r in layers
        ]
        lines.append("")
    vpath = path / "verify.json"
    if vpath.is_file():
        v = json.loads(vpath.read_text())
        lines += ["## Verification", "", f"runner: {v['runner']} — **{'PASSED' if v['passed'] else 'FAILED'}**", "",
                  "| tier | result | summary |", "|---|---|---|"]  # fmt: skip
        for tier in v["tiers"]:
            mark = "skip" if tier["passed"] is None else ("pass" if tier["passed"] else "FAIL")
            lines.append(f"| {tier['name']} | {mark} | {tier['summary']} |")
        if v.get("bisect") and v["bisect"].get("first_bad_layer"):
            lines.append(f"\nfirst layer out of tolerance: `{v['bisect']['first_bad_layer']}`")
    return "\n".join(lines) + "\n"


def write_report(path: str | Path, *, out: str | Path | None = None) -> Path:
    from quest_export_runtime.outputs import check_output, write_text_atomic

    out = check_output(out if out else Path(path) / "report.md", "file")
    return write_text_atomic(out, render(path))
