"""The report's figures as PNG bytes (matplotlib, Agg backend): image grids, activation histograms, SQNR.

Inputs are plain data: layer_stats.json (quest_export.quant.layer_stats) and sample arrays; nothing is re-run.
"""

from __future__ import annotations

import io
import math

import numpy as np

SNAPSHOT_LABELS = {"stage_a": "after Stage A (PTQ)", "finetuned": "after finetuning"}
SNAPSHOT_COLORS = {"stage_a": "tab:orange", "finetuned": "tab:blue"}
MAX_HIST_LAYERS = 6
MAX_HIST_GROUPS = 5
DPI = 72


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig, *, tight: bool = True) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight" if tight else None)
    _plt().close(fig)
    return buf.getvalue()


def grid_figure(samples: dict, *, title: str) -> bytes:
    """Float and quantized samples side by side (image k of both panels starts from noise row k)."""
    from quest_export.report.samples import to_rgb_grid

    plt = _plt()
    n = samples["float"].shape[0]
    nrow = max(1, int(math.ceil(math.sqrt(n))))
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.9))
    for ax, key, name in zip(axes, ("float", "quantized"), ("float model", title)):
        ax.imshow(to_rgb_grid(samples[key], nrow), interpolation="nearest")
        ax.set_title(name, fontsize=11)
        ax.axis("off")
    s = samples["sampler"]
    fig.suptitle(f"{n} samples, same noise (seed {samples['seed']}), {s['sampler']} {s['steps']} steps, "
                 f"guidance {s['guidance_scale']}: PSNR {samples['psnr']:.2f} dB, SSIM {samples['ssim']:.3f}",
                 fontsize=10)  # fmt: skip
    return _png(fig)


def _shown_groups(G: int) -> list[int]:
    if G <= MAX_HIST_GROUPS:
        return list(range(G))
    return sorted({round(k * (G - 1) / (MAX_HIST_GROUPS - 1)) for k in range(MAX_HIST_GROUPS)})


def _density(rec: dict) -> tuple[np.ndarray, np.ndarray]:
    counts = np.asarray(rec["counts"], dtype=np.float64)
    edges = np.linspace(rec["min"], rec["max"], counts.size + 1)
    return counts / max(counts.sum(), 1.0), edges


def _change(a: list[dict], b: list[dict]) -> float:
    """How much a layer's input range moved between two snapshots (mean relative change of max |x| over groups)."""
    out = []
    for ra, rb in zip(a, b):
        ma, mb = max(abs(ra["min"]), abs(ra["max"])), max(abs(rb["min"]), abs(rb["max"]))
        out.append(abs(mb - ma) / max(ma, 1e-12))
    return float(np.mean(out)) if out else 0.0


def hist_layers(stats: dict, *, limit: int = MAX_HIST_LAYERS) -> list[str]:
    """The layers the histogram figure shows: those finetuning changed most, else the widest input ranges."""
    snaps = stats["snapshots"]
    names = sorted(snaps["stage_a"])
    if "finetuned" in snaps:
        key = {n: _change(snaps["stage_a"][n], snaps["finetuned"].get(n, [])) for n in names}
    else:
        key = {n: max(max(abs(r["min"]), abs(r["max"])) for r in snaps["stage_a"][n]) for n in names}
    return sorted(names, key=lambda n: -key[n])[:limit]


def histogram_figure(stats: dict, layers: list[str]) -> bytes:
    """Rows: layers; columns: timestep groups; each cell the input-activation histogram of every snapshot
    (fraction of values per bin, log scale) and its quantizer's clipping range (dashed)."""
    plt = _plt()
    from matplotlib.ticker import NullFormatter

    groups = _shown_groups(stats["groups"])
    ts = stats["group_timesteps"]
    fig, axes = plt.subplots(len(layers), len(groups), figsize=(2.4 * len(groups) + 0.6, 1.9 * len(layers) + 0.6),
                             squeeze=False)  # fmt: skip
    for i, layer in enumerate(layers):
        for j, g in enumerate(groups):
            ax = axes[i][j]
            for snap, recs in sorted(stats["snapshots"].items(), key=lambda kv: kv[0] != "stage_a"):  # final on top
                if layer not in recs:
                    continue
                rec = recs[layer][g]
                dens, edges = _density(rec)
                color = SNAPSHOT_COLORS.get(snap, "tab:gray")
                ax.stairs(dens, edges, color=color, label=SNAPSHOT_LABELS.get(snap, snap), linewidth=1.2)
                if rec["clip"]:
                    for v in rec["clip"]:
                        ax.axvline(v, color=color, linestyle="--", linewidth=0.8)
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.set_title(f"group {g} (from t={ts[g]})", fontsize=8)
            if j == 0:
                ax.set_ylabel(_short(layer), fontsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    top = 1 - 0.45 / fig.get_figheight()  # room for the legend (fixed margins: tight_layout costs seconds here)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.3 / fig.get_figheight(), top=top - 0.25 / fig.get_figheight(),
                        wspace=0.3, hspace=0.35)  # fmt: skip
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, 1.0))
    return _png(fig, tight=False)


def _short(name: str, width: int = 28) -> str:
    name = name.replace("transformer_blocks", "tb").replace("attentions", "attn").replace("resnets", "res")
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def sqnr_matrix(stats: dict, snap: str, key: str = "sqnr_out") -> tuple[list[str], np.ndarray]:
    """(layer names in plan order, SQNR dB (layers, groups)); NaN where exact (no quantization noise)."""
    recs = stats["snapshots"][snap]
    names = [n for n in stats["layers"] if n in recs] or sorted(recs)
    mat = np.array([[np.nan if r[key] is None else r[key] for r in recs[n]] for n in names], dtype=np.float64)
    return names, mat


def sqnr_figure(stats: dict) -> bytes:
    """Left: per-layer output SQNR across timestep groups (final snapshot); right: its mean over layers per group
    for every snapshot."""
    plt = _plt()
    final = "finetuned" if "finetuned" in stats["snapshots"] else "stage_a"
    names, mat = sqnr_matrix(stats, final)
    height = max(4.0, 0.13 * len(names) + 1.5)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, height), gridspec_kw={"width_ratios": [3, 2]})
    im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), [_short(n, 40) for n in names], fontsize=max(4, min(8, int(500 / len(names)))))
    ax.set_xticks(range(mat.shape[1]), [str(g) for g in range(mat.shape[1])], fontsize=7)
    ax.set_xlabel("timestep group")
    ax.set_title(f"layer output SQNR (dB), {SNAPSHOT_LABELS.get(final, final)}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    for snap in stats["snapshots"]:
        _, m = sqnr_matrix(stats, snap)
        ax2.plot(range(m.shape[1]), np.nanmean(m, axis=0), marker="o", color=SNAPSHOT_COLORS.get(snap, "tab:gray"),
                 label=SNAPSHOT_LABELS.get(snap, snap))  # fmt: skip
    ax2.set_xticks(range(mat.shape[1]))
    ax2.set_xlabel("timestep group")
    ax2.set_ylabel("mean layer output SQNR (dB)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
