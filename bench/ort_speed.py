"""ONNX Runtime CPU speed of the ``cpu`` target per bit width, side by side in one run (issue 17).

    python bench/ort_speed.py --model fmnist-cond --out ort_speed.json [--repeats 30] [--batches 1,2] [--threads 1,0]

Graphs (each the form the ``cpu`` target ships, built by ``quest-export build`` stages from ``ptq`` artifacts with a
small calibration, so the numbers measure the runtime graph, not the finetune):

- fp32: the float UNet traced like the exports, at ORT_ENABLE_EXTENDED and at ORT_ENABLE_ALL (NCHWc kernels),
- W8A8 input-only Q/DQ (the TensorRT placement), W8A8 in+out Q/DQ (``quant.output_quant``, fused kernels),
- W4A8 with INT4 weights, W4A8 in+out Q/DQ (INT4 in the file, widened to INT8 by ONNX Runtime at load, fused).

Every quantized graph is the ORT build's ``model.opt.onnx`` loaded with the runtime's own session settings
(``quest_export_runtime.session``). Latency: median of interleaved runs on the same inputs (batch 2 = one guided
image), so drift hits every graph alike; ratios are fp32 (EXTENDED) latency over the graph's latency. Threads 0 =
ONNX Runtime's default (all cores). File sizes: the export's ``model.onnx`` (what is stored and shipped) and the
build's ``model.opt.onnx`` (what ONNX Runtime runs). The CPU's VNNI flag is recorded: x86 ONNX Runtime fuses
INT8 kernels with U8 activations only, and without VNNI its U8S8 kernels saturate (deploy.md O-8), so the fused
forms use U8U8 there (quest_export/deploy/ort.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SMALL = ["calib.samples_per_group=8", "ptq.adaround=false"]  # the graph, not the calibration, is measured
FORMS = {  # name -> (bits, extra recipe settings)
    "w8a8 input-only": ("w8a8", []),
    "w8a8 in+out (fused)": ("w8a8", ["quant.output_quant=true"]),
    "w4a8 INT4": ("w4a8", []),
    "w4a8 in+out (widened, fused)": ("w4a8", ["quant.output_quant=true"]),
}


def cpu_facts() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), None)
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return {"machine": platform.machine(), "model": model, "avx2": "avx2" in flags,
            "avx512f": "avx512f" in flags, "vnni": any("vnni" in f for f in flags)}  # fmt: skip


def build_graphs(model: str, work: Path) -> tuple[dict[str, Path], dict[str, dict]]:
    from export_sizes import export_fp32

    from quest_export import pipeline

    fp32 = export_fp32(model, work / "fp32")
    graphs, sizes = {"fp32": fp32}, {"fp32": {"export_kib": round(fp32.stat().st_size / 1024, 1)}}
    for name, (bits, sets) in FORMS.items():
        recipe = pipeline.resolve_recipe(model=model, bits=bits, method="ptq", target="cpu", sets=SMALL + sets)
        slug = name.split()[0] + ("-fused" if sets else "")
        s = pipeline.run(recipe, stages=("export", "build"), work=work, out=work / "builds" / slug, show_progress=False)
        exp, built = s.stage("export").path, s.stage("build").path
        graphs[name] = built / "model.opt.onnx"
        sizes[name] = {"export_kib": round((exp / "model.onnx").stat().st_size / 1024, 1),
                       "built_kib": round(graphs[name].stat().st_size / 1024, 1),
                       "fusion": json.loads((built / "manifest.json").read_text())["fusion"]["graphs"]["model.onnx"]["extended"],
                       "baked": json.loads((built / "session.json").read_text()).get("baked")}  # fmt: skip
        print(f"{name}: export {sizes[name]['export_kib']} KiB, built {sizes[name]['built_kib']} KiB", flush=True)
    for v in sizes.values():
        v["export_vs_fp32"] = round(v["export_kib"] / sizes["fp32"]["export_kib"], 3)
    return graphs, sizes


def measure(graphs: dict[str, Path], feed: dict, *, batch: int, threads: int, repeats: int) -> dict[str, float]:
    import numpy as np
    import onnxruntime as ort
    from quest_export_runtime.session import OnnxRuntimeRunner

    feed = {k: np.ascontiguousarray(np.concatenate([v] * batch)[:batch]) for k, v in feed.items()}
    runners = {}
    for name, path in graphs.items():
        levels = ("extended", "all") if name == "fp32" else ("extended",)
        for level in levels:
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.log_severity_level = 3
            key = f"{name} ({level.upper()})" if name == "fp32" else name
            runners[key] = OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"], graph_optimization_level=level,
                                             session_options=so).activate()  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(3):  # warm-up
        for r in runners.values():
            r.infer(feed)
    for _ in range(repeats):  # interleaved
        for k, r in runners.items():
            t0 = time.perf_counter()
            r.infer(feed)
            times[k].append(time.perf_counter() - t0)
    for r in runners.values():
        r.deactivate()
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist-cond")
    p.add_argument("--out", default="ort_speed.json")
    p.add_argument("--work", default="/tmp/quest-bench-ort-speed")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--batches", default="1,2")
    p.add_argument("--threads", default="1,0", help="comma list; 0 = ONNX Runtime's default (all cores)")
    args = p.parse_args()
    from polygraphy.json import load_json

    graphs, sizes = build_graphs(args.model, Path(args.work))
    exp_inputs = next(Path(args.work).glob("runs/export/*/reference/inputs.json"))
    feed = {k: v[:1] for k, v in load_json(str(exp_inputs))[0].items()}
    res: dict = {"model": args.model, "cpu": cpu_facts(), "sizes": sizes, "runs": []}
    for threads in [int(t) for t in args.threads.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            ms = measure(graphs, feed, batch=batch, threads=threads, repeats=args.repeats)
            base = ms["fp32 (EXTENDED)"]
            run = {"batch": batch, "threads": threads, "repeats": args.repeats,
                   "latency_ms": {k: round(v, 2) for k, v in ms.items()},
                   "speedup_vs_fp32": {k: round(base / v, 3) for k, v in ms.items()}}  # fmt: skip
            res["runs"].append(run)
            print(f"\nbatch {batch}, threads {threads or 'all'} (median of {args.repeats}):")
            for k, v in ms.items():
                print(f"  {k:32s} {v:8.2f} ms   {base / v:5.2f}x fp32")
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"\nwrote {args.out}  (cpu: {res['cpu']})")


if __name__ == "__main__":
    main()
