"""The report's facts as tables (header, rows), shared by the Markdown and the HTML renderings."""

from __future__ import annotations

import json
import math

from quest_export.report.gather import ReportData

Table = tuple[list[str], list[list[str]]]
SNAPSHOT_LABELS = {"stage_a": "after Stage A (PTQ)", "finetuned": "after finetuning"}
WORST = 8


def overview(d: ReportData) -> list[tuple[str, str]]:
    m = d.manifest
    t = m.get("target") or {}
    p = m.get("precision") or {}
    rows = [("folder", str(d.path)), ("stage", str(m.get("stage")))]
    if isinstance(t, dict) and t.get("id"):
        rows.append(("target", f"{t.get('id')} ({t.get('description', '')})"))
    if p:
        rows.append(("precision", f"{p.get('mode')} — {p.get('note')}"))
    if m.get("groups"):
        rows.append(("timestep groups", f"{m['groups'].get('count')} ({m.get('scale_mode')} scales)"))
    if m.get("sampler"):
        rows.append(("sampler", json.dumps(m.get("sampler"))))
    rows.append(("recipe fingerprint", str(m.get("recipe_fingerprint"))))
    if m.get("onnx"):
        o = m["onnx"]
        rows.append(("ONNX", f"opset {o.get('opset')}, IR {o.get('ir_version')}, Q/DQ nodes {o.get('qdq_nodes')}"))
    if d.run_dir is not None:
        rows.append(("quantize run dir", str(d.run_dir)))
    elif d.run_dir_note:
        rows.append(("quantize run dir", f"none: {d.run_dir_note}"))
    return rows


def verify_tiers(d: ReportData) -> Table | None:
    if not d.verify:
        return None
    rows = []
    for tier in d.verify.get("tiers", []):
        mark = "skip" if tier["passed"] is None else ("pass" if tier["passed"] else "FAIL")
        rows.append([tier["name"], mark, tier["summary"]])
    return ["tier", "result", "summary"], rows


def files_and_latency(d: ReportData) -> Table | None:
    if not d.files:
        return None
    lat = {r["file"]: r for r in d.latency}
    rows = []
    for f in d.files:
        r = lat.get(f["name"])
        where = (f"{r['ms']:.2f} ms (batch {r['batch']}, median of {r['runs']}, {r['provider']})" if r
                 else "measured on the device (trtexec)" if f["kind"] == "TensorRT engine" or d.stage == "bundle"
                 else "not measured")  # fmt: skip
        rows.append([f["name"], f["kind"], f"{f['bytes'] / 2**20:.2f} MiB", where])
    return ["file", "kind", "size", "latency of one UNet call"], rows


def _fmt_db(v: float) -> str:
    return "exact" if v is None or not math.isfinite(v) else f"{v:.1f}"


def sqnr_by_group(stats: dict) -> Table:
    """Mean and worst layer output SQNR per timestep group, for every snapshot."""
    header = ["snapshot"] + [f"group {g}" for g in range(stats["groups"])]
    rows = []
    for snap, recs in stats["snapshots"].items():
        for what in ("mean", "worst"):
            cells = []
            for g in range(stats["groups"]):
                vals = [r[g]["sqnr_out"] for r in recs.values() if r[g]["sqnr_out"] is not None]
                v = (sum(vals) / len(vals) if what == "mean" else min(vals)) if vals else None
                cells.append(_fmt_db(v))
            rows.append([f"{SNAPSHOT_LABELS.get(snap, snap)}: {what}", *cells])
    return header, rows


def worst_layers(stats: dict, *, limit: int = WORST) -> Table:
    """The layers with the lowest output SQNR (worst group) in the final snapshot, with their bits."""
    final = "finetuned" if "finetuned" in stats["snapshots"] else "stage_a"
    recs = stats["snapshots"][final]
    before = stats["snapshots"].get("stage_a") if final == "finetuned" else None

    def worst(rs):
        vals = [r["sqnr_out"] for r in rs if r["sqnr_out"] is not None]
        return min(vals) if vals else math.inf

    names = sorted(recs, key=lambda n: worst(recs[n]))[:limit]
    header = ["layer", "w/a bits", f"worst-group SQNR {SNAPSHOT_LABELS.get(final, final)} (dB)"]
    header += ["same, after Stage A (dB)"] if before else []
    rows = []
    for n in names:
        info = stats["layers"].get(n, {})
        bits = "/".join("-" if info.get(k) is None else str(info[k]) for k in ("w_bits", "a_bits"))  # -: float/shared
        row = [n, bits, _fmt_db(worst(recs[n]))]
        if before:
            row.append(_fmt_db(worst(before.get(n, []))))
        rows.append(row)
    return header, rows


def layer_bits(d: ReportData) -> Table | None:
    layers = d.manifest.get("layers") or []
    if not layers:
        return None
    rows = [[r["name"], str(r["w_bits"]), str(r["a_bits"]), str(r.get("storage")), str(r.get("a_storage"))]
            for r in layers]  # fmt: skip
    return ["layer", "w bits", "a bits", "weight storage", "activation storage"], rows


def fusion(d: ReportData) -> Table | None:
    f = d.manifest.get("fusion")
    if not f:
        return None
    rows = [[g, lvl, ", ".join(f"{k} {v}" for k, v in counts.items())]
            for g, levels in f["graphs"].items() for lvl, counts in levels.items()]  # fmt: skip
    return ["graph", "level", "fused / Q/DQ op counts"], rows
