"""report.html: one self-contained page (figures embedded as base64 PNG, inline CSS, no script, no link out)."""

from __future__ import annotations

import base64
import html

from quest_export.report import tables
from quest_export.report.gather import ReportData
from quest_export.report.markdown import FIGURE_TITLES

CSS = """body{font-family:sans-serif;margin:24px;max-width:1150px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #bbb;padding:3px 7px;text-align:left}
th{background:#eee}img{max-width:100%;border:1px solid #ddd}.fail{color:#b00;font-weight:bold}.pass{color:#070}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:13px}dt{font-weight:bold}"""


def _table(t: tables.Table) -> str:
    header, rows = t
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)

    def cell(c: str) -> str:
        cls = {"FAIL": ' class="fail"', "pass": ' class="pass"'}.get(c, "")
        return f"<td{cls}>{html.escape(c)}</td>"

    body = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(d: ReportData, *, figures: dict[str, bytes], samples: dict | None = None) -> str:
    """The page; ``figures`` = {figure key: PNG bytes}, embedded in the order given."""
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>quest-export report: {e(d.path.name)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>quest-export report: {e(d.path.name)}</h1>", "<dl>"]  # fmt: skip
    parts += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in tables.overview(d)] + ["</dl>"]
    for key, png in figures.items():
        b64 = base64.b64encode(png).decode("ascii")
        parts += [f"<h2>{e(FIGURE_TITLES.get(key, key))}</h2>",
                  f"<img id='fig-{e(key)}' alt='{e(key)}' src='data:image/png;base64,{b64}'>"]  # fmt: skip
        if key == "grid" and samples:
            parts.append(f"<p>PSNR {samples['psnr']:.2f} dB, SSIM {samples['ssim']:.4f} of the quantized samples "
                         f"against the float model's ({samples['n']} images, seed {samples['seed']}).</p>")  # fmt: skip
        if key == "histograms":
            parts.append("<p>Input of each layer as its activation quantizer sees it, on calibration rows of each "
                         "timestep group; dashed lines: the quantizer's clipping range. The layers shown are those "
                         "whose input range finetuning moved most.</p>")  # fmt: skip
    if d.stats:
        parts += ["<h2>Layer output SQNR per timestep group (dB)</h2>", _table(tables.sqnr_by_group(d.stats)),
                  "<h2>Layers with the lowest SQNR</h2>", _table(tables.worst_layers(d.stats))]  # fmt: skip
    elif d.run_dir_note:
        parts.append(f"<p>No activation statistics: {e(d.run_dir_note)}.</p>")
    if t := tables.files_and_latency(d):
        parts += ["<h2>Size and latency</h2>", _table(t)]
    if t := tables.verify_tiers(d):
        v = d.verify
        verdict = "PASSED" if v["passed"] else "FAILED"
        parts += ["<h2>Verification</h2>", f"<p>runner: {e(str(v['runner']))} — <b>{verdict}</b></p>", _table(t)]
        if v.get("bisect") and v["bisect"].get("first_bad_layer"):
            parts.append(f"<p>first layer out of tolerance: <code>{e(v['bisect']['first_bad_layer'])}</code></p>")
    if t := tables.fusion(d):
        parts += ["<h2>ONNX Runtime fusion audit</h2>", _table(t)]
    if t := tables.layer_bits(d):
        parts += ["<h2>Layers</h2>", _table(t)]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
