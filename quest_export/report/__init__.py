"""The run report of a quantize run dir, an export, an ORT build or a bundle: report.md and report.html.

    write_report(DIR)   # DIR/report.md, DIR/report.html (self-contained), DIR/report-<figure>.png

Jobs, one module each: gather (read what the stages saved; the quantize stage records layer_stats.json,
quest_export.quant.layer_stats), samples (the only torch part: float and fake-quant samples of the run dir from
the same noise, a few images), plots (matplotlib figures), tables, markdown and html (the two renderings).
Importing this package needs neither torch nor matplotlib.
"""

from __future__ import annotations

from pathlib import Path

from quest_export.report.gather import ReportData, gather

FIGURES = ("grid", "histograms", "sqnr")


def figures(d: ReportData, samples: dict | None) -> dict[str, bytes]:
    """{figure key: PNG bytes} of what the data allows (no samples: no grid; no layer stats: no plots)."""
    from quest_export.report import plots

    out = {}
    if samples is not None:
        p = d.manifest.get("precision") or {}
        q = _quant_meta(d)
        title = f"quantized: {q.get('method', '?')} {p.get('mode') or q.get('name', '')}".strip()
        out["grid"] = plots.grid_figure(samples, title=title)
    if d.stats:
        out["histograms"] = plots.histogram_figure(d.stats, plots.hist_layers(d.stats))
        out["sqnr"] = plots.sqnr_figure(d.stats)
    return out


def _quant_meta(d: ReportData) -> dict:
    import json

    if d.run_dir is None:
        return {}
    q = json.loads((d.run_dir / "quant.json").read_text()).get("quant", {})
    return {"method": q.get("method"), "name": f"W{q.get('w_bits')}A{q.get('a_bits')}"}


def write_report(path: str | Path, *, out: str | Path | None = None, images: int = 16, seed: int = 0,
                 device: str = "cpu", latency: bool = True) -> Path:  # fmt: skip
    """Write the Markdown report ``out`` (default DIR/report.md), the HTML page beside it (same name, .html) and
    the figures as PNG (``<stem>-<figure>.png``). ``images`` = 0 skips the sample grid. Returns the HTML path.

    The Markdown is written first: a failed write leaves neither of the others.
    """
    from quest_export_runtime.outputs import check_output, write_bytes_atomic, write_text_atomic

    from quest_export.report import html, markdown

    if images < 0:
        from quest_export.errors import InputError

        raise InputError(f"--images {images}: must be 0 (no sample grid) or more")
    md_path = check_output(out if out else Path(path) / "report.md", "file")
    html_path = check_output(md_path.with_suffix(".html"), "file")
    png = {k: check_output(md_path.with_name(f"{md_path.stem}-{k}.png"), "file") for k in FIGURES}
    d = gather(path, latency=latency)
    samples = None
    if images > 0 and d.run_dir is not None:
        from quest_export.report.samples import float_and_quantized

        samples = float_and_quantized(d.run_dir, n=images, seed=seed, device=device)
    figs = figures(d, samples)
    write_text_atomic(md_path, markdown.render(d, samples=samples, figures={k: png[k].name for k in figs}))
    for k, data in figs.items():
        write_bytes_atomic(png[k], data)
    write_text_atomic(html_path, html.render(d, figures=figs, samples=samples))
    return html_path
