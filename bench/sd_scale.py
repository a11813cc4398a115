"""The SD-1.5-size UNet through the chain, one process per stage, with wall time and peak memory (issue 15).

    python bench/sd_scale.py --work DIR --json OUT.json [--preset sd15] [--stages a,b,...] [--budget S]

Stages (in order; a finished stage is skipped on a rerun with the same --work, so a later call resumes):

    gen               random-weight UNet folder (quest_export.zoo.random_unet)
    sizes             bytes per calibration row of the reconstruction caches (one float forward with hooks)
    calibrate         `quest-export calibrate`
    quantize-w8a8     `quest-export quantize --bits w8a8` (QuEST, fast preset)
    quantize-w4a8     `quest-export quantize --bits w4a8`
    export-BITS       `quest-export export` for the `cpu` target (ONNX Runtime), external data past 256 MiB
    build-BITS        the ONNX Runtime build of that export (the pipeline's build stage)
    verify-BITS       `quest-export verify` of the build (H-2, H-3, H-4)
    exportj-BITS      `quest-export export` for the `jetson` target (TensorRT 10.3 rules)
    bundle-BITS       the Jetson bundle of that export (build.sh, wheels, references), under `taskset -c 0,1`
    lint-BITS         `quest-export lint` of the bundle's graph for the Jetson target

Every stage records wall seconds, peak host RSS (the child's own rusage, os.wait4) and, in the stage process,
torch.cuda.max_memory_allocated / max_memory_reserved (0 where CUDA was never used). Quantization runs for the
`jetson` recipe (symmetric grids, float attention), so one run serves the ONNX Runtime build (exported for `cpu`)
and the Jetson bundle. Recipe knobs go through --set (repeatable), e.g. --set ptq.recon_store=cpu.
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
PROMPTS = ("a photograph of a red bicycle leaning on a wall", "a watercolor painting of a lighthouse at dusk",
           "a close-up photo of a cat sleeping on a sofa", "an aerial view of a city at night",
           "a bowl of ripe oranges on a wooden table", "a snowy mountain landscape under a clear sky")  # fmt: skip
ALL = ("gen", "sizes", "calibrate", "quantize-w8a8+quantize-w4a8", "export-w8a8+export-w4a8+exportj-w8a8",
       "build-w8a8+build-w4a8+bundle-w8a8", "verify-w8a8+verify-w4a8+lint-w8a8")  # fmt: skip


def _recipe_args(a, bits: str, target: str = "jetson", stage: str = "") -> list[str]:
    model = ["--model", str(a.work / "model")]
    if a.pipeline:  # prompts through the pipeline's own text encoder
        prompts = a.work / "prompts.txt"
        if not prompts.is_file():
            prompts.write_text("\n".join(PROMPTS[: a.rows - 1]) + "\n")
        model += ["--prompts", str(prompts)]
    else:
        model += ["--cond", str(a.work / "model" / "conditioning.safetensors")]
    args = [*model, "--bits", bits, "--preset", "fast", "--method", a.method, "--target", target]
    for s in a.set:
        args += ["--set", s]
    for s in a.stage_set:  # STAGE:key=value, for that stage only
        name, _, kv = s.partition(":")
        if name == stage:
            args += ["--set", kv]
    return args


def _run_dir(a, bits: str) -> Path:
    runs = sorted((a.work / "work" / "runs" / "quantize").glob(f"*-{a.method}-{bits}-*"))
    if not runs:
        raise SystemExit(f"no quantize run for {bits} under {a.work}/work; run quantize-{bits} first")
    return runs[-1]


def _command(a, stage: str) -> tuple[list[str], list[str]]:
    """(prefix, stage argv) of one stage; argv runs under `python bench/sd_scale.py _stage`."""
    py = [sys.executable, str(Path(__file__).resolve()), "_stage"]
    work = ["--work", str(a.work / "work")]
    if stage == "gen":
        return [], [sys.executable, "-m", "quest_export.zoo.random_unet", "--preset", a.preset, "--out",
                    str(a.work / "model"), "--rows", str(a.rows), "--steps", str(a.steps)]  + (
                    ["--pipeline"] if a.pipeline else [])  # fmt: skip
    name, _, bits = stage.partition("-")
    if name == "sizes":
        return [], py + ["sizes", str(a.work / "model"), str(a.work / "sizes.json")]
    if name == "calibrate":
        return [], py + ["cli", "calibrate", *_recipe_args(a, "w8a8"), *work]
    if name == "quantize":
        return [], py + ["cli", "quantize", *_recipe_args(a, bits, stage=stage), *work]
    export_dir = a.work / "out" / f"export-{bits}"
    build_dir = a.work / "out" / f"build-{bits}"
    bundle_dir = a.work / "out" / f"bundle-{bits}"
    if name == "export":
        return [], py + ["cli", "export", str(_run_dir(a, bits)), "--target", "cpu", *_recipe_args(a, bits, "cpu"),
                         "--out", str(export_dir)]  # fmt: skip
    if name == "build":
        return [], py + ["build-ort", str(export_dir), str(build_dir)]
    if name == "verify":
        return [], py + ["cli", "verify", str(build_dir), "--quantized", str(_run_dir(a, bits)), "--device",
                         a.verify_device]  # fmt: skip
    if name == "exportj":  # the Jetson export (all cores: its fake-quant references run on the CPU)
        return [], py + ["cli", "export", str(_run_dir(a, bits)), "--target", "jetson", *_recipe_args(a, bits),
                         "--out", str(bundle_dir / "export")]  # fmt: skip
    if name == "bundle":  # the 2-core build host: the bundle of the Jetson export on two cores
        return ["taskset", "-c", "0,1"], py + ["bundle", str(bundle_dir / "export"), str(bundle_dir / "bundle")]
    if name == "lint":
        return [], py + ["cli", "lint", str(bundle_dir / "bundle" / "model.onnx"), "--target", "jetson"]
    raise SystemExit(f"unknown stage {stage}")


def _stage_main(argv: list[str]) -> None:
    """In the stage process: run one step, writing the CUDA peaks to $SD_SCALE_GPU every 15 s and at exit."""
    import atexit
    import threading

    lock = threading.Lock()

    def report() -> None:
        d = {"gpu_max_allocated": 0, "gpu_max_reserved": 0}
        if "torch" in sys.modules:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                d = {"gpu_max_allocated": torch.cuda.max_memory_allocated(),
                     "gpu_max_reserved": torch.cuda.max_memory_reserved()}  # fmt: skip
        with lock:  # the timer thread and the exit hook: one writer at a time, the file replaced whole
            tmp = Path(os.environ["SD_SCALE_GPU"] + f".{threading.get_ident()}")
            tmp.write_text(json.dumps(d))
            os.replace(tmp, os.environ["SD_SCALE_GPU"])

    atexit.register(report)

    def every(seconds: float) -> None:  # also while it runs: a stage killed by a time limit keeps its peaks so far
        while True:
            time.sleep(seconds)
            report()

    threading.Thread(target=every, args=(15.0,), daemon=True).start()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # cli/ (quest_export and its runtime: installed, or on PYTHONPATH)
    kind, rest = argv[0], argv[1:]
    if kind == "cli":
        from cli.main import main

        try:
            main(rest, standalone_mode=False)
        except SystemExit as e:
            if e.code:
                raise
        return
    if kind == "bundle":
        from quest_export.deploy.bundle import bundle_from_export
        from quest_export.recipe.targets import load_target

        print("bundle:", bundle_from_export(rest[0], out=rest[1], target=load_target("jetson-orin-jp61")))
        return
    if kind == "sizes":  # bytes per calibration row of what block reconstruction holds (one row, float model)
        _sizes(Path(rest[0]), Path(rest[1]))
        return
    if kind == "build-ort":
        from quest_export.deploy.ort import ort_engine_from_export
        from quest_export.recipe.targets import load_target

        audit = ort_engine_from_export(rest[0], out=rest[1], target=load_target("cpu"))
        print(json.dumps(audit, indent=1))
        return
    raise SystemExit(f"unknown stage kind {kind}")


def _sizes(model_dir: Path, out: Path) -> None:
    """Per-row bytes of the reconstruction caches: every unit's float output at once (the old one-pass capture)
    against the largest single unit's inputs + output (what UnitTargets and capture_inputs hold), and the
    calibration set's bytes per row."""
    import torch

    from quest_export.models import load_model
    from quest_export.ptq.units import capture_inputs, capture_outputs, find_units
    from quest_export.quant.model import QuantMode, quantize_
    from quest_export.recipe.config import QuantRecipe

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(str(model_dir), cond=str(model_dir / "conditioning.safetensors"), device=dev)
    params = sum(p.numel() for p in model.unet.parameters())
    q = quantize_(model.unet, QuantRecipe(method="quest", w_bits=8, a_bits=8, attention_quant=False),
                  group_timesteps=[999])  # fmt: skip
    c, h, w = model.sample_shape
    x = torch.randn(1, c, h, w, device=dev)
    t = torch.tensor([500], device=dev)
    cond = model.conditioning.table[:1].to(dev)
    batches = [(x, t, cond)]

    def run(b):
        q.unet(b[0], b[1], encoder_hidden_states=b[2])

    nbytes = lambda v: v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0  # noqa: E731
    with torch.no_grad(), q.mode(QuantMode.FP):
        units = find_units(q.unet, lambda: run(batches[0]))
        outs = capture_outputs(q.unet, units, batches, run, dev)
        per_unit = {}
        for u in units:
            cap = capture_inputs(q.unet, u, batches, run, dev)
            per_unit[u.name] = sum(map(nbytes, cap.args)) + sum(map(nbytes, cap.kwargs.values())) + nbytes(outs[u.name])
    biggest = max(per_unit, key=per_unit.get)
    d = {"units": len(units), "all_unit_outputs_bytes_per_row": sum(map(nbytes, outs.values())),
         "largest_unit": biggest, "largest_unit_inputs_and_output_bytes_per_row": per_unit[biggest],
         "calib_bytes_per_row": 2 * c * h * w * 4, "cond_row_bytes": nbytes(cond),
         "parameters": params}  # fmt: skip
    out.write_text(json.dumps(d, indent=1) + "\n")
    print(json.dumps(d, indent=1))


def _du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_stage":
        _stage_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True, help="results file (updated after every stage)")
    p.add_argument("--preset", default="sd15")
    p.add_argument("--method", default="quest", help="quest (the fast preset) | ptq (no finetuning; CPU-sized)")
    p.add_argument("--pipeline", action="store_true", help="a whole text-to-image pipeline (text encoder, VAE)")
    p.add_argument("--rows", type=int, default=5, help="conditioning rows (one unconditional)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps of calibration and verify")
    p.add_argument("--stages", default=",".join(ALL), help="comma-separated; a+b runs a and b at once")
    p.add_argument("--budget", type=float, default=1e9, help="seconds: start no stage after this much time")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--redo", default="", help="stages to run again although recorded as done")
    p.add_argument("--stage-set", action="append", default=[], help="STAGE:key=value, a --set for one stage")
    p.add_argument("--verify-device", default="cpu", help="device of verify's torch reference (cpu | cuda)")
    a = p.parse_args()
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(a.json.read_text()) if a.json.is_file() else {}
    results.setdefault("stages", {})
    results["config"] = {"preset": a.preset, "method": a.method, "pipeline": a.pipeline, "rows": a.rows, "steps": a.steps, "sets": a.set,
                         "command": " ".join(sys.argv)}  # fmt: skip
    try:
        import torch

        results["config"]["torch"] = torch.__version__
        if torch.cuda.is_available():
            results["config"]["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    t_start = time.time()
    redo = set(filter(None, a.redo.split(",")))
    for group in [g for g in a.stages.split(",") if g]:  # "a+b": stages run at once (they share the machine)
        todo = []
        for stage in group.split("+"):
            done = results["stages"].get(stage, {})
            if done.get("rc") == 0 and stage not in redo:
                print(f"== {stage}: done before ({done['wall_s']} s), skipped", flush=True)
            else:
                todo.append(stage)
        if not todo:
            continue
        if time.time() - t_start > a.budget:
            print(f"== {group}: not started (budget of {a.budget} s spent)", flush=True)
            break
        procs = {}
        for stage in todo:
            prefix, argv = _command(a, stage)
            gpu_file = a.work / f".gpu-{stage}.json"
            gpu_file.unlink(missing_ok=True)
            env = {**os.environ, "SD_SCALE_GPU": str(gpu_file), "PYTHONUNBUFFERED": "1",
                   "QUEST_EXPORT_NO_PROGRESS": "1"}  # fmt: skip
            print(f"== {stage}: {' '.join(prefix + argv)}", flush=True)
            proc = subprocess.Popen(prefix + argv, env=env, cwd=str(ROOT))
            procs[proc.pid] = (stage, prefix, gpu_file, time.time(), proc)
        failed = False
        while procs:
            pid, status, usage = os.wait4(-1, 0)
            if pid not in procs:
                continue
            stage, prefix, gpu_file, t0, _ = procs.pop(pid)
            failed |= _record(a, results, stage, prefix, gpu_file, t0, status, usage, alongside=todo)
        if failed:
            break


def _record(a, results, stage, prefix, gpu_file, t0, status, usage, alongside) -> bool:
    wall = round(time.time() - t0, 1)
    rc = os.waitstatus_to_exitcode(status)
    rec = {"rc": rc, "wall_s": wall, "host_peak_rss_bytes": usage.ru_maxrss * 1024,
           "host_peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "cores": "0,1" if prefix else "all",
           "alongside": [s for s in alongside if s != stage], "t_start": round(t0, 1),
           "t_end": round(t0 + wall, 1)}  # fmt: skip
    if gpu_file.is_file():
        g = json.loads(gpu_file.read_text())
        rec.update(g)
        rec["gpu_max_allocated_gib"] = round(g["gpu_max_allocated"] / 2**30, 2)
        rec["gpu_max_reserved_gib"] = round(g["gpu_max_reserved"] / 2**30, 2)
    name, _, bits = stage.partition("-")
    sizes = {"gen": a.work / "model", "export": a.work / "out" / f"export-{bits}",
             "build": a.work / "out" / f"build-{bits}", "bundle": a.work / "out" / f"bundle-{bits}" / "bundle"}  # fmt: skip
    if name in sizes:
        rec["size_bytes"] = _du(sizes[name])
    if name == "quantize":
        try:
            rec["run_dir_bytes"] = _du(_run_dir(a, bits))
        except SystemExit:
            pass
    if name == "sizes" and (a.work / "sizes.json").is_file():
        rec["sizes"] = json.loads((a.work / "sizes.json").read_text())
    if name == "verify":
        vj = a.work / "out" / f"build-{bits}" / "verify.json"
        if vj.is_file():
            rec["verify"] = json.loads(vj.read_text())
    results["stages"][stage] = rec
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"== {stage}: rc {rc}, {wall} s, host {rec['host_peak_rss_gib']} GiB, "
          f"GPU {rec.get('gpu_max_allocated_gib', 0)} GiB allocated / {rec.get('gpu_max_reserved_gib', 0)} reserved",
          flush=True)  # fmt: skip
    return rc != 0


if __name__ == "__main__":
    main()
