"""report.md: the report's tables in Markdown, with links to the figure PNGs written next to it."""

from __future__ import annotations

from quest_export.report import tables
from quest_export.report.gather import ReportData

FIGURE_TITLES = {"grid": "Samples: float vs quantized, same noise", "histograms": "Activation ranges per timestep group",
                 "sqnr": "Per-layer quantization error (SQNR)"}  # fmt: skip


def _table(t: tables.Table) -> list[str]:
    header, rows = t
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return out + [""]


def render(d: ReportData, *, samples: dict | None = None, figures: dict[str, str] | None = None) -> str:
    """Markdown of ``d``; ``figures`` = {figure key: PNG file name next to the report}."""
    lines = [f"# quest-export report: {d.path.name}", ""]
    lines += [f"- {k}: {v}" for k, v in tables.overview(d)] + [""]
    for key, name in (figures or {}).items():
        lines += [f"## {FIGURE_TITLES.get(key, key)}", "", f"![{key}]({name})", ""]
        if key == "grid" and samples:
            lines += [f"PSNR {samples['psnr']:.2f} dB, SSIM {samples['ssim']:.4f} of the quantized samples against "
                      f"the float model's ({samples['n']} images, seed {samples['seed']})", ""]  # fmt: skip
    if d.stats:
        lines += ["## Layer output SQNR per timestep group (dB)", ""] + _table(tables.sqnr_by_group(d.stats))
        lines += ["## Layers with the lowest SQNR", ""] + _table(tables.worst_layers(d.stats))
    elif d.run_dir_note:
        lines += [f"No activation statistics: {d.run_dir_note}.", ""]
    if t := tables.files_and_latency(d):
        lines += ["## Size and latency", ""] + _table(t)
    if d.manifest.get("build"):
        b = d.manifest["build"]
        lines += ["## TensorRT build (on the device)", "", f"- TensorRT {b.get('trt_version')}, typing {b.get('typing')}, "
                  f"flags `{' '.join(b.get('flags', []))}`", "- run `bash build.sh` on the device", ""]  # fmt: skip
    if t := tables.fusion(d):
        lines += ["## ONNX Runtime fusion audit", ""] + _table(t)
    if t := tables.layer_bits(d):
        lines += ["## Layers", ""] + _table(t)
    if t := tables.verify_tiers(d):
        v = d.verify
        lines += ["## Verification", "", f"runner: {v['runner']} — **{'PASSED' if v['passed'] else 'FAILED'}**", ""]
        lines += _table(t)
        if v.get("bisect") and v["bisect"].get("first_bad_layer"):
            lines += [f"first layer out of tolerance: `{v['bisect']['first_bad_layer']}`", ""]
    return "\n".join(lines).rstrip("\n") + "\n"
