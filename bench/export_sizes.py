"""ONNX file size of fp32, W8A8 and W4A8 exports per target, and ONNX Runtime CPU latency side by side.

    python bench/export_sizes.py --model fmnist-cond --out sizes.json [--latency] [--threads 1]

The quantized exports come from ``quest-export build`` stages (ptq method, so that the numbers measure the
export, not the finetune); fp32 is the float UNet traced the same way. Latency: median of interleaved runs
of every graph on the same inputs (batch 2 = one guided image), reported as ratios to fp32.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = ("cpu", "gpu", "jetson-orin-jp51", "jetson-orin-jp61", "jetson-thor-jp7")
SMALL = ["calib.samples_per_group=8", "ptq.adaround=false"]  # the export, not the calibration, is measured


def export_fp32(model_name: str, out: Path) -> Path:
    import onnx
    import torch

    from quest_export.models import load_model

    m = load_model(model_name)
    x = torch.randn(2, *m.sample_shape)
    t = torch.full((2,), 500.0)
    cond = m.conditioning.rows(torch.tensor([0, 1])) if m.conditioning is not None else None

    class W(torch.nn.Module):
        def __init__(self, u):
            super().__init__()
            self.unet = u

        def forward(self, sample, timestep, encoder_hidden_states=None):
            kw = {"encoder_hidden_states": encoder_hidden_states} if encoder_hidden_states is not None else {}
            return self.unet(sample, timestep, **kw).sample

    names = ["sample", "timestep"] + (["encoder_hidden_states"] if cond is not None else [])
    args = (x, t) + ((cond,) if cond is not None else ())
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(W(m.unet), args, buf, dynamo=False, opset_version=20, input_names=names,
                          output_names=["noise_pred"], dynamic_axes={n: {0: "batch"} for n in names})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx.load_from_string(buf.getvalue()), str(out / "model.onnx"))
    return out / "model.onnx"


def latency(graphs: dict[str, Path], feed: dict, *, threads: int, repeats: int) -> dict[str, float]:
    import onnxruntime as ort
    from quest_export_runtime.session import ORT_DISABLED_OPTIMIZERS, ORT_SESSION_CONFIG

    sessions = {}
    for name, path in graphs.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        for key, value in ORT_SESSION_CONFIG.items():
            so.add_session_config_entry(key, value)
        sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                              disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS))  # fmt: skip
    times = {n: [] for n in sessions}
    for _ in range(3):  # warm-up
        for s in sessions.values():
            s.run(None, feed)
    for _ in range(repeats):  # interleaved, so drift hits every graph alike
        for n, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feed)
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) * 1000 for n, v in times.items()}


def main() -> None:
    from quest_export import pipeline

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="fmnist-cond")
    p.add_argument("--out", default="export_sizes.json")
    p.add_argument("--work", default="/tmp/quest-bench-sizes")
    p.add_argument("--latency", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=40)
    args = p.parse_args()
    work = Path(args.work)
    res: dict = {"model": args.model, "sizes_kib": {}, "latency_ms": {}}
    fp32 = export_fp32(args.model, work / "fp32")
    res["sizes_kib"]["fp32"] = round(fp32.stat().st_size / 1024, 1)
    graphs = {"fp32": fp32}
    for target in TARGETS:
        for bits in ("w8a8", "w4a8"):
            recipe = pipeline.resolve_recipe(model=args.model, bits=bits, method="ptq", target=target, sets=SMALL)
            s = pipeline.run(recipe, stages=("export",), work=work, show_progress=False)
            exp = s.stage("export").path
            size = sum(f.stat().st_size for f in exp.glob("model*.onnx")) + sum(
                f.stat().st_size for f in exp.glob("*.bin")
            )
            res["sizes_kib"][f"{target}/{bits}"] = round(size / 1024, 1)
            if target == "cpu":
                graphs[f"{bits} (input-only Q/DQ)" if bits == "w8a8" else f"{bits} (INT4 weights)"] = exp / "model.onnx"
            print(target, bits, res["sizes_kib"][f"{target}/{bits}"], "KiB", flush=True)
    # ONNX Runtime CPU's fused W8A8 form (E-22): output quantizers in the fake-quant model, Q/DQ on outputs too
    recipe = pipeline.resolve_recipe(model=args.model, bits="w8a8", method="ptq", target="cpu",
                                     sets=[*SMALL, "quant.output_quant=true"])  # fmt: skip
    exp = pipeline.run(recipe, stages=("export",), work=work, show_progress=False).stage("export").path
    res["sizes_kib"]["cpu/w8a8-fused-io"] = round((exp / "model.onnx").stat().st_size / 1024, 1)
    graphs["w8a8 (in+out Q/DQ, fused)"] = exp / "model.onnx"
    if args.latency:
        import numpy as np
        from polygraphy.json import load_json

        exp = Path(graphs["w8a8 (input-only Q/DQ)"]).parent
        feed = load_json(str(exp / "reference" / "inputs.json"))[0]
        feed = {k: np.ascontiguousarray(v[:2]) for k, v in feed.items()}
        ms = latency(graphs, feed, threads=args.threads, repeats=args.repeats)
        res["latency_ms"] = {k: round(v, 3) for k, v in ms.items()}
        res["latency_ratio_to_fp32"] = {k: round(v / ms["fp32"], 3) for k, v in ms.items()}
        res["latency_setup"] = {"batch": 2, "threads": args.threads, "repeats": args.repeats, "level": "EXTENDED"}
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
