"""Sample quality of float and every registered method at several bit widths, side by side, same seeds and noise.

    python bench/quality.py --model fmnist-cond --rows default --n 1000 --jobs 6 --out results.json
    python bench/quality.py --rows methods --preset gpu --n 1000 --jobs 6 --out methods.json   # issue 16's table

Every row runs through the library (pipeline.run up to quantize, then eval with the same seed, so the
same initial noise and labels for every row). Rows run as parallel worker processes (one GPU is shared);
calibration runs once first. Prints a Markdown table; writes every number and the recipe of each row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# row name -> (method, bits, extra --set overrides, target[, model])
SYM = ["quant.a_symmetric=true", "quant.w_symmetric=true"]  # the TensorRT form (W4A4's default before)
ASYM_A = ["quant.a_symmetric=false", "quant.w_symmetric=false"]  # asymmetric grids: W4A4's default on ONNX Runtime


def _sym_w4a4(rows: dict) -> dict:
    """Rows measured when W4A4 was symmetric everywhere keep that grid (a later asymmetric --set still wins)."""
    return {k: (r[0], r[1], SYM + list(r[2]) if r[1] == "w4a4" else r[2], *r[3:]) for k, r in rows.items()}


STANDARD = {f"{m}-{b}": (m, b, [], "cpu") for m in ("ptq", "qdiffusion", "quest") for b in ("w8a8", "w4a8", "w4a4")}
ABLATION = {
    "quest-w4a4-stageB-only": ("quest", "w4a4", ["finetune.stage_c=false"], "cpu"),
    "quest-w4a4-stageC-only": ("quest", "w4a4", ["finetune.stage_b=false"], "cpu"),
    "quest-w4a4-no-finetune": ("quest", "w4a4", ["finetune.stage_b=false", "finetune.stage_c=false"], "cpu"),
    "quest-w4a4-local+global": ("quest", "w4a4", ["finetune.c_w_loc=1.0"], "cpu"),
    "quest-w4a4-single-scale": ("quest", "w4a4", ["quant.timestep_groups=1"], "cpu"),
    "quest-w4a4-seed1": ("quest", "w4a4", ["calib.seed=1", "finetune.seed=1"], "cpu"),
    "quest-w4a4-seed2": ("quest", "w4a4", ["calib.seed=2", "finetune.seed=2"], "cpu"),
}
ASYM = {f"quest-{b}-asym": ("quest", b, ASYM_A, "cpu") for b in ("w8a8", "w4a8", "w4a4")}
TRT = {f"quest-{b}-trt": ("quest", b, [], "jetson") for b in ("w8a8", "w4a8", "w4a4")}
PC, MSE = "quant.a_granularity=per-channel", "ptq.act_init=mse"
STRONG = ["finetune.b_lr_weight=1e-4", "finetune.b_lr_scale=1e-4", "finetune.c_lr_weight=1e-4",
          "finetune.c_lr_scale=1e-3", "finetune.c_epochs=10"]  # fmt: skip
W4A4X = {
    "ptq-w4a4-pc-mse": ("ptq", "w4a4", [PC, MSE], "cpu"),
    "qdiffusion-w4a4-pc-mse": ("qdiffusion", "w4a4", [PC, MSE], "cpu"),
    "quest-w4a4-pc-mse": ("quest", "w4a4", [PC, MSE], "cpu"),
    "quest-w4a4-pc-mse-strong": ("quest", "w4a4", [PC, MSE, *STRONG], "cpu"),
    "quest-w4a4-pt-mse": ("quest", "w4a4", [MSE], "cpu"),
    "qdiffusion-w4a4-pt-mse": ("qdiffusion", "w4a4", [MSE], "cpu"),
    "quest-w4a4-pc-minmax": ("quest", "w4a4", [PC], "cpu"),
    "quest-w4a4-pc-mse-asym": ("quest", "w4a4", [PC, MSE, "quant.a_symmetric=false"], "cpu"),
    "quest-w4a4-pt-mse-strong": ("quest", "w4a4", [MSE, *STRONG], "cpu"),
}
FINAL = {  # (method, bits, sets, target, model): rows of both models in one parallel batch
    "cond/ptq-w4a4": ("ptq", "w4a4", [], "cpu", "fmnist-cond"),
    "cond/quest-w4a4": ("quest", "w4a4", [], "cpu", "fmnist-cond"),
    "cond/quest-w4a4-strong": ("quest", "w4a4", STRONG, "cpu", "fmnist-cond"),
    **{f"uncond/{m}-{b}": (m, b, [], "cpu", "fmnist-uncond") for m in ("ptq", "qdiffusion", "quest")
       for b in ("w4a8", "w4a4")},
}  # fmt: skip
EXTRA = {  # three seeds, local + global, asymmetric grids at W8A8 and W4A4, and the uncond W8A8 rows
    "cond/quest-w4a4": ("quest", "w4a4", [], "cpu", "fmnist-cond"),
    **{f"cond/{k}": (*ABLATION[k], "fmnist-cond") for k in ("quest-w4a4-seed1", "quest-w4a4-seed2",
                                                             "quest-w4a4-local+global")},
    **{f"cond/{k}": (*ASYM[k], "fmnist-cond") for k in ("quest-w8a8-asym", "quest-w4a4-asym")},
    **{f"uncond/{m}-w8a8": (m, "w8a8", [], "cpu", "fmnist-uncond") for m in ("ptq", "qdiffusion", "quest")},
}  # fmt: skip
SEEDS3 = [[], ["calib.seed=1", "finetune.seed=1"], ["calib.seed=2", "finetune.seed=2"]]
LR10 = ["finetune.b_lr_weight=1e-4", "finetune.b_lr_scale=1e-4", "finetune.c_lr_weight=1e-4",
        "finetune.c_lr_scale=1e-3"]  # fmt: skip
MODELS = (("cond", "fmnist-cond"), ("uncond", "fmnist-uncond"))


def _three_seeds(bits: str, rows) -> dict:
    """Each (name, method, sets) row on both models with three whole-pipeline seeds (calibration draw, AdaRound,
    finetuning): rows '<model>/<name>-s<k>'."""
    return {f"{tag}/{name}-s{k}": (m, bits, sets + sd, "cpu", model)
            for tag, model in MODELS for name, m, sets in rows for k, sd in enumerate(SEEDS3)}  # fmt: skip


SEEDS = _three_seeds("w4a4", [("qdiffusion-w4a4", "qdiffusion", SYM), ("quest-w4a4", "quest", SYM),
                              ("quest-w4a4-lr10", "quest", SYM + LR10)])  # fmt: skip
SEEDS_ASYM = _three_seeds("w4a4", [(f"{m}-w4a4-asym", m, ASYM_A) for m in ("qdiffusion", "quest")])
SEEDS_PTQ = _three_seeds("w4a4", [(f"ptq-w4a4-{g}", "ptq", sets) for g, sets in (("sym", SYM), ("asym", ASYM_A))])
SEEDS_W4A8 = _three_seeds("w4a8", [(f"{m}-w4a8", m, []) for m in ("qdiffusion", "quest")])  # symmetric everywhere
# issue 16: ptq, qdiffusion, quest, dmq and dmq+quest on both models at W4A8, W4A6 and W4A4, three whole-pipeline
# seeds (the DMQ rows also reseed LES/PTS's draws), rows '<model>/<method>-<bits>-s<k>'
METHODS = ("ptq", "qdiffusion", "quest", "dmq", "dmq+quest")


def _methods(bits: str) -> dict:
    rows = {}
    for tag, model in MODELS:
        for m in METHODS:
            for k, sd in enumerate(SEEDS3):
                dmq_seed = [f"dmq.seed={k}"] if m.startswith("dmq") and k else []
                rows[f"{tag}/{m}-{bits}-s{k}"] = (m, bits, sd + dmq_seed, "cpu", model)
    return rows


METHOD_ROWS = {b: _methods(b) for b in ("w4a8", "w4a6", "w4a4")}
ROWSETS = {
    "standard": STANDARD,  # W4A4 on the default grid (asymmetric on the `cpu` target); three seeds: seeds-*
    "ablation": _sym_w4a4(ABLATION),
    "asym": ASYM,
    "trt": TRT,
    "w4a4x": _sym_w4a4(W4A4X),
    "final": _sym_w4a4(FINAL),
    "extra": _sym_w4a4(EXTRA),
    "seeds": SEEDS,
    "seeds-asym": SEEDS_ASYM,
    "seeds-ptq": SEEDS_PTQ,
    "seeds-w4a8": SEEDS_W4A8,
    **{f"methods-{b}": rows for b, rows in METHOD_ROWS.items()},
    "methods": {k: v for rows in METHOD_ROWS.values() for k, v in rows.items()},
}


def worker(args) -> None:
    from quest_export import pipeline

    row = json.loads(args.row)
    method, bits, sets, target = row[:4]
    model = row[4] if len(row) > 4 else args.model
    recipe = pipeline.resolve_recipe(model=model, bits=bits, preset=args.preset, method=method, target=target,
                                     sets=tuple(sets) + tuple(args.set))  # fmt: skip
    t0 = time.time()
    summary = pipeline.run(recipe, stages=("quantize",), work=args.work, show_progress=False)
    q = summary.stage("quantize")
    quant_seconds = time.time() - t0
    from quest_export.quant.artifact import full_report

    rep = full_report(q.path)
    res = {"row": args.name, "model": model, "method": method, "bits": bits, "sets": sets, "target": target,
           "recipe_fingerprint": recipe.fingerprint(), "quantize_seconds": round(quant_seconds, 1),
           "quantize_reused": q.reused, "artifact": str(q.path), "report": rep}  # fmt: skip
    ev = pipeline.evaluate(recipe, n=args.n, seed=args.seed, quantized=str(q.path),
                           grid=str(Path(args.out_dir) / f"{args.name.replace('/', '_')}.png"))  # fmt: skip
    res["eval"] = ev
    if recipe.quant.timestep_groups > 1 and args.merged:
        ev_m = pipeline.evaluate(recipe, n=args.n, seed=args.seed, quantized=str(q.path), merge_groups=True)
        res["eval_merged"] = ev_m
    Path(args.out_dir, f"{args.name.replace('/', '_')}.json").write_text(json.dumps(res, indent=2, default=str))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="fmnist-cond")
    p.add_argument("--rows", default="standard", help="comma list of row sets: " + ", ".join(ROWSETS))
    p.add_argument("--only", default=None, help="comma list of row names")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="fast")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--work", default=None, help="work folder (default: $QUEST_EXPORT_WORK, else the current directory)")
    p.add_argument("--out", default="bench_quality.json")
    p.add_argument("--no-float", action="store_true", help="skip the float rows")
    p.add_argument("--merged", action="store_true", help="also evaluate merged (single) scale sets of G > 1 rows")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)
    p.add_argument("--name", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        import logging

        import torch

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # progress lines every 30 s

        torch.set_num_threads(args.threads)
        worker(args)
        return
    from quest_export import pipeline

    rows = {}
    for rs in args.rows.split(","):
        rows.update(ROWSETS[rs])
    if args.only:
        rows = {k: v for k, v in rows.items() if k in args.only.split(",")}
    out_dir = Path(args.out).with_suffix("")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    models = sorted({r[4] for r in rows.values() if len(r) > 4} or {args.model})
    results = {}
    for model in models:  # calibration once per model, shared by every row; the float row
        recipe = pipeline.resolve_recipe(model=model, preset=args.preset, sets=tuple(args.set))
        tc = time.time()
        pipeline.run(recipe, stages=("calibrate",), work=args.work, show_progress=False)
        results[f"{model}/calibrate_seconds"] = round(time.time() - tc, 1)
        print(f"{model}: calibration {results[f'{model}/calibrate_seconds']} s", flush=True)
        key = "float" if len(models) == 1 else f"{model}/float"
        if args.no_float:
            continue
        results[key] = pipeline.evaluate(recipe, n=args.n, seed=args.seed, grid=str(out_dir / f"{model}-float.png"))
        print(f"{key}: FD {results[key]['fd']} agreement {results[key]['class_agreement']}", flush=True)
    # rows with their own calibration draw (calib.* sets): calibrate each once here, never in racing workers
    extra_calib = sorted({(r[4] if len(r) > 4 else args.model, tuple(x for x in r[2] if x.startswith("calib.")))
                          for r in rows.values()})  # fmt: skip
    for model, csets in extra_calib:
        if csets:
            recipe = pipeline.resolve_recipe(model=model, preset=args.preset, sets=tuple(args.set) + csets)
            pipeline.run(recipe, stages=("calibrate",), work=args.work, show_progress=False)
            print(f"{model} {' '.join(csets)}: calibrated", flush=True)
    procs: list[tuple[str, subprocess.Popen]] = []
    pending = list(rows.items())
    env = {**os.environ, "QUEST_EXPORT_NO_PROGRESS": "1"}
    while pending or procs:
        while pending and len(procs) < args.jobs:
            name, row = pending.pop(0)
            cmd = [sys.executable, __file__, "--worker", "1", "--row", json.dumps(row), "--name", name,
                   "--out-dir", str(out_dir), "--model", args.model, "--n", str(args.n), "--seed", str(args.seed),
                   "--preset", args.preset, "--threads", str(args.threads)]  # fmt: skip
            cmd += sum([["--set", s] for s in args.set], [])
            cmd += (["--work", args.work] if args.work else []) + (["--merged"] if args.merged else [])
            log = open(out_dir / f"{name.replace('/', '_')}.log", "w")
            procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        time.sleep(2)
        for name, pr in list(procs):
            if pr.poll() is not None:
                procs.remove((name, pr))
                f = out_dir / f"{name.replace('/', '_')}.json"
                results[name] = json.loads(f.read_text()) if f.is_file() else {"error": f"exit {pr.returncode}"}
                e = results[name].get("eval", {})
                print(f"{name}: FD {e.get('fd')} agreement {e.get('class_agreement')} "
                      f"({results[name].get('quantize_seconds')}s) {results[name].get('error', '')}", flush=True)  # fmt: skip
    results["_meta"] = {"model": args.model, "n": args.n, "seed": args.seed, "preset": args.preset, "sets": args.set,
                        "wall_seconds": round(time.time() - t0, 1)}  # fmt: skip
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = ["| row | FD | class agreement | quantize s | peak MiB |", "|---|---|---|---|---|"]
    for name, r in results.items():
        if not isinstance(r, dict):  # per-model calibration seconds
            continue
        if name.endswith("float"):
            lines.append(f"| {name} | {r['fd']:.2f} | {_pct(r['class_agreement'])} | - | - |")
            continue
        if name == "_meta":
            continue
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | |")
            continue
        e = r["eval"]
        peak = r.get("report", {}).get("finetune", {}).get("peak_memory_mib", "-")
        lines.append(f"| {name} | {e['fd']:.2f} | {_pct(e['class_agreement'])} | {r['quantize_seconds']} | {peak} |")
        if "eval_merged" in r:
            m = r["eval_merged"]
            lines.append(f"| {name} (merged scales) | {m['fd']:.2f} | {_pct(m['class_agreement'])} | | |")
    return "\n".join(lines)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


if __name__ == "__main__":
    main()
