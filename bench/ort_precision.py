"""ONNX Runtime CPU's U8S8 saturation (deploy.md O-8), side by side in one run: worst cosine of W8A8 sessions to the
fake-quant outputs, fused-node counts and latency at the default session, with QDQS8ToU8Transformer disabled, and
with session.x64quantprecision=1 (quest-export ships the second).

    python bench/ort_precision.py [--work /tmp/quest-bench-ortprec] [--repeats 20] [--out ort_precision.json]

The exports are the tiny test UNets' merged W8A8 cpu exports (tests/export/test_export.py's Workshop, so that
this runs in a minute without the bundled models). On a CPU with VNNI the three columns agree.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = {  # name -> (extra disabled optimizers, x64quantprecision)
    "ORT default": ((), "0"),
    "QDQS8ToU8Transformer disabled (shipped)": (("QDQS8ToU8Transformer",), "0"),
    "x64quantprecision=1": ((), "1"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/quest-bench-ortprec")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="ort_precision.json")
    args = p.parse_args()
    import onnx
    import onnxruntime as ort
    from quest_export_runtime.manifest import read_manifest

    import tests.export.test_export as T

    shop = T.Workshop(Path(args.work))
    res = {"cpu_flags_vnni": "vnni" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None}
    for kind in ("cond", "uncond"):
        exp = shop.export(kind, (8, 8), "cpu", "merged")
        feeds, fq, _, _ = T.reference(exp, read_manifest(exp))
        for name, (disabled, precision) in SETTINGS.items():
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
            so.add_session_config_entry("session.x64quantprecision", precision)
            with tempfile.TemporaryDirectory() as tmp:
                so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
                s = ort.InferenceSession(str(exp / "model.onnx"), so, providers=["CPUExecutionProvider"],
                                         disabled_optimizers=["QDQPropagationTransformer", *disabled])  # fmt: skip
                ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
            cos = min(T.cosine(s.run(None, f)[0], r) for f, r in zip(feeds, fq))
            s.run(None, feeds[0])
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                s.run(None, feeds[0])
            ms = (time.perf_counter() - t0) / args.repeats * 1000
            res[f"{kind}/{name}"] = {"worst_cosine": round(cos, 6), "ms": round(ms, 2),
                                     "DequantizeLinear": ops["DequantizeLinear"],
                                     "MatMulIntegerToFloat": ops["MatMulIntegerToFloat"]}  # fmt: skip
            print(f"{kind:6s} {name:40s} cosine {cos:.6f}  {ms:6.2f} ms  DQ {ops['DequantizeLinear']}", flush=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
