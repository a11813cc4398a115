"""Where the W4A4 error sits (issue 16): one quantized artifact per method, sampled with quantization switched on
and off by timestep group and by layer set, the same noise for every variant.

    python bench/ablation_w4a4.py --methods dmq+quest,quest --n 1000 --jobs 6 --preset gpu --out ablation.json
    python bench/ablation_w4a4.py --artifact dmq+quest=/path/to/quantized --variants full,float-g9 --out a.json

Each method is quantized once exactly as its row of bench/quality.py (``--rows methods-w4a4``, pipeline seed 0:
``pipeline.run`` up to quantize with the given model, bits, preset, method and target), or read from
``--artifact``. Every variant then samples ``--n`` images from noise seed ``--seed`` (quest_export.eval, batch 250,
the recipe's sampler) with a rule that says, per UNet call, which quantizers are on (QuantizedUNet.override):

    full / fp / weights-only / acts-only      the whole model quantized / float / one kind of quantizer on
    only-g<k> / float-g<k>                    quantized only in timestep group k's steps / everywhere but there
    float-<set>[-weights|-acts]               the quantizers of one layer set off (float), the rest quantized

"float" for a layer means its quantizers off and the bundled float model's weight and bias (times its LES gamma)
in place of the latent ones, which QuEST's finetuning moved (``QuantizedUNet.override(..., reference=float UNet)``);
``fp-latent`` is every quantizer off with the latent weights kept, and ``float-model`` the bundled float UNet. Every variant is scored by FD and by PSNR/SSIM of
its samples against the float model's samples from the same noise. Variants run in parallel worker processes
(one GPU is shared), each loading the artifact once; every finished variant is written at once, so a run cut
short keeps what it finished. Prints a Markdown table per method; writes every number to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _owner(name: str) -> str:
    """The module a quantizer belongs to (its path without the quantizer's own name)."""
    return name.rpartition(".")[0]


# layer sets: predicates on the owning module's path (diffusers UNet2DModel / UNet2DConditionModel names)
LAYER_SETS = {
    "down_blocks": lambda p: p.startswith("down_blocks."),
    **{f"down_blocks.{i}": (lambda p, i=i: p.startswith(f"down_blocks.{i}.")) for i in range(3)},
    "mid_block": lambda p: p.startswith("mid_block."),
    "up_blocks": lambda p: p.startswith("up_blocks."),
    **{f"up_blocks.{i}": (lambda p, i=i: p.startswith(f"up_blocks.{i}.")) for i in range(3)},
    "attention": lambda p: ".attentions." in p,
    "resnet-convs": lambda p: ".resnets." in p and p.endswith((".conv1", ".conv2")),
    "shortcuts": lambda p: p.endswith(".conv_shortcut"),
    "resamplers": lambda p: ".downsamplers." in p or ".upsamplers." in p,
    "temporal": lambda p: p.startswith("time_embedding.") or p.endswith(".time_emb_proj"),
    "first-last": lambda p: p in ("conv_in", "conv_out"),
    "conv_in": lambda p: p == "conv_in",
    "conv_out": lambda p: p == "conv_out",
}
LATENT = {"fp-latent"}  # variants that keep the latent weights of layers whose weight quantizers are off
SPLIT_SETS = ("up_blocks", "up_blocks.0", "down_blocks")  # also measured with only weights / only activations float


def variants(groups: int) -> dict[str, tuple[str, object]]:
    """Variant name -> (what it is, rule(g, quantizer_name, kind) -> on), in the order they run."""
    v: dict[str, tuple[str, object]] = {
        "full": ("every quantizer on (the method's row)", lambda g, n, k: True),
        "fp": ("every quantizer off (float weights: the float model)", lambda g, n, k: False),
        "fp-latent": ("every quantizer off, the finetuned latent weights kept", lambda g, n, k: False),
        "weights-only": ("weight quantizers on, activations float", lambda g, n, k: k == "weight"),
        "acts-only": ("activation quantizers on, weights float", lambda g, n, k: k == "act"),
    }
    half = groups // 2
    v[f"float-g0-{half - 1}"] = (f"float in groups 0..{half - 1} (noisy half)", lambda g, n, k: g >= half)
    v[f"float-g{half}-{groups - 1}"] = (f"float in groups {half}..{groups - 1} (clean half)", lambda g, n, k: g < half)
    for j in range(groups):
        v[f"float-g{j}"] = (f"float in group {j} only", lambda g, n, k, j=j: g != j)
    for j in range(groups):
        v[f"only-g{j}"] = (f"quantized in group {j} only", lambda g, n, k, j=j: g == j)
    for s, pred in LAYER_SETS.items():
        v[f"float-{s}"] = (f"{s} float, the rest quantized", lambda g, n, k, pred=pred: not pred(_owner(n)))
    for s in SPLIT_SETS:
        pred = LAYER_SETS[s]
        v[f"float-{s}-weights"] = (f"{s}: weights float, activations quantized",
                                   lambda g, n, k, pred=pred: not (k == "weight" and pred(_owner(n))))  # fmt: skip
        v[f"float-{s}-acts"] = (f"{s}: activations float, weights quantized",
                                lambda g, n, k, pred=pred: not (k == "act" and pred(_owner(n))))  # fmt: skip
    for s, pred in LAYER_SETS.items():  # activations alone: the weights stay as finetuned (no co-adaptation broken)
        if s not in SPLIT_SETS:
            v[f"float-{s}-acts"] = (f"{s}: activations float, weights quantized",
                                    lambda g, n, k, pred=pred: not (k == "act" and pred(_owner(n))))  # fmt: skip
    last = groups - 1
    v[f"float-acts-g{last}"] = (f"every activation float in group {last} only, weights quantized",
                                lambda g, n, k: k == "weight" or g != last)  # fmt: skip
    v[f"float-acts-g0-{last - 1}"] = (f"every activation float in groups 0..{last - 1}, weights quantized",
                                      lambda g, n, k: k == "weight" or g == last)  # fmt: skip
    v[f"float-up_blocks-acts-g{last}"] = (f"up_blocks activations float in group {last} only",
                                          lambda g, n, k: not (k == "act" and g == last
                                                               and _owner(n).startswith("up_blocks.")))  # fmt: skip
    return v


def _recipe(args, method: str):
    from quest_export import pipeline

    return pipeline.resolve_recipe(model=args.model, bits=args.bits, preset=args.preset, method=method,
                                   target=args.target, sets=tuple(args.set))  # fmt: skip


def _spec(recipe):
    from quest_export.models.sampling import SamplerSpec

    s = recipe.sampler
    return SamplerSpec(sampler=s.sampler, steps=s.steps, eta=s.eta, guidance_scale=s.guidance_scale)


def _safe(name: str) -> str:
    return name.replace("/", "_").replace("+", "_")


def quantize_worker(args) -> None:
    from quest_export import pipeline
    from quest_export.quant.artifact import full_report

    recipe = _recipe(args, args.method)
    t0 = time.time()
    q = pipeline.run(recipe, stages=("quantize",), work=args.work, show_progress=False).stage("quantize")
    res = {"method": args.method, "artifact": str(q.path), "quantize_seconds": round(time.time() - t0, 1),
           "reused": q.reused, "recipe_fingerprint": recipe.fingerprint(), "report": full_report(q.path)}  # fmt: skip
    if args.artifact_tar:  # the artifact folder, to reuse in a later run (--artifact)
        Path(args.artifact_tar).mkdir(parents=True, exist_ok=True)
        tar = Path(args.artifact_tar) / f"{_safe(args.method)}.tgz"
        with tarfile.open(tar, "w:gz") as tf:
            tf.add(q.path, arcname=_safe(args.method))
        res["artifact_tar"] = str(tar)
    Path(args.out_dir, f"{_safe(args.method)}-quantize.json").write_text(json.dumps(res, indent=2, default=str))


def sample_worker(args) -> None:
    """Load the artifact once and run the given variants in order, each written when done."""
    import numpy as np
    import torch

    from quest_export import pipeline
    from quest_export.eval import compare_images, generate, score
    from quest_export.quant.artifact import load_quantized

    recipe = _recipe(args, args.method)
    device = pipeline.resolve_device(recipe)
    spec = _spec(recipe)
    ref = np.load(args.ref) if args.ref else None
    from quest_export.models import load_model

    art = load_quantized(args.artifact_path, device=device)
    qunet = art.qunet
    reference = load_model(
        recipe.model.name, cond=recipe.model.cond, prompts=recipe.model.prompts, device=device
    ).unet  # untouched float weights
    table = variants(qunet.ctx.count)
    last = 0.0
    for name in args.run.split(","):
        if args.deadline and time.time() + 1.2 * last > args.deadline:
            print(f"{name}: skipped (deadline)", flush=True)
            continue
        if name not in table:
            print(f"{name}: not defined for {qunet.ctx.count} timestep group(s)", flush=True)
            continue
        what, rule = table[name]
        t0 = time.time()
        with torch.no_grad(), qunet.override(rule, reference=None if name in LATENT else reference):
            imgs, labels = generate(qunet.unet, art.model, spec, n=args.n, seed=args.seed, batch=args.batch,
                                    device=device, show_progress=False)  # fmt: skip
        fd, agree = score(imgs, labels, device=device)
        last = time.time() - t0
        res = {"method": args.method, "variant": name, "what": what, "fd": round(fd, 3), "class_agreement": agree,
               "n": args.n, "seed": args.seed, "seconds": round(last, 1)}  # fmt: skip
        if ref is not None:
            res.update(compare_images(imgs, ref))
        Path(args.out_dir, f"{_safe(args.method)}-{name}.json").write_text(json.dumps(res, indent=2))
        print(f"{args.method} {name}: FD {fd:.2f} ({last:.1f} s)", flush=True)


def float_reference(args, out_dir: Path) -> dict:
    """The float model's samples (saved for the PSNR of every variant) and FD, same noise."""
    import numpy as np

    from quest_export import pipeline
    from quest_export.eval import generate, score
    from quest_export.models import load_model

    recipe = _recipe(args, args.methods.split(",")[0] if args.methods else "quest")
    device = pipeline.resolve_device(recipe)
    model = load_model(recipe.model.name, cond=recipe.model.cond, prompts=recipe.model.prompts, device=device)
    t0 = time.time()
    imgs, labels = generate(model.unet, model, _spec(recipe), n=args.n, seed=args.seed, batch=args.batch,
                            device=device, show_progress=False)  # fmt: skip
    fd, agree = score(imgs, labels, device=device)
    np.save(out_dir / "float-samples.npy", imgs)
    return {"variant": "float-model", "what": "the bundled float UNet", "fd": round(fd, 3), "class_agreement": agree,
            "n": args.n, "seed": args.seed, "seconds": round(time.time() - t0, 1)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist-uncond")
    p.add_argument("--bits", default="w4a4")
    p.add_argument("--methods", default="dmq+quest", help="comma list of methods to quantize (or read: --artifact)")
    p.add_argument("--artifact", action="append", default=[], help="METHOD=PATH: an existing artifact folder")
    p.add_argument("--preset", default="gpu")
    p.add_argument("--target", default="cpu")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--variants", default=None, help="comma list (default: all; see variants())")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="sampling noise seed (the same for every variant)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--jobs", type=int, default=4, help="worker processes at a time (quantize and sample)")
    p.add_argument("--per-worker", type=int, default=4, help="variants per sampling worker (one artifact load each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--work", default=None, help="work folder (default: $QUEST_EXPORT_WORK, else the current directory)")
    p.add_argument("--artifact-tar", default=None, help="folder for a .tgz of every artifact quantized here")
    p.add_argument("--deadline", type=float, default=None, help="seconds from start: no variant starts after it")
    p.add_argument("--out", default="ablation_w4a4.json")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    for hidden in ("--worker", "--method", "--artifact-path", "--run", "--out-dir", "--ref"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.list:
        for k, (what, _) in variants(10).items():
            print(f"{k}: {what}")
        return
    if args.worker:
        import logging

        import torch

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        torch.set_num_threads(args.threads)
        args.deadline = float(args.deadline) if args.deadline else None
        (quantize_worker if args.worker == "quantize" else sample_worker)(args)
        return
    run(args)


def run(args) -> None:
    from quest_export import pipeline

    t_start = time.time()
    deadline = t_start + args.deadline if args.deadline else None
    out_dir = Path(args.out).with_suffix("")
    out_dir.mkdir(parents=True, exist_ok=True)
    given = dict(a.split("=", 1) for a in args.artifact)
    methods = list(dict.fromkeys(list(given) + [m for m in (args.methods or "").split(",") if m]))  # given: first
    results: dict = {"_meta": {"model": args.model, "bits": args.bits, "preset": args.preset, "target": args.target,
                               "sets": args.set, "n": args.n, "seed": args.seed, "batch": args.batch,
                               "pipeline_seed": "recipe default (calib.seed = finetune.seed = 0)"}}  # fmt: skip
    if any(m not in given for m in methods):  # calibration once, never in racing workers (as bench/quality.py)
        tc = time.time()
        recipe = pipeline.resolve_recipe(model=args.model, preset=args.preset, sets=tuple(args.set))
        pipeline.run(recipe, stages=("calibrate",), work=args.work, show_progress=False)
        results["_meta"]["calibrate_seconds"] = round(time.time() - tc, 1)
        print(f"calibration {results['_meta']['calibrate_seconds']} s", flush=True)
    names = list(variants(10))  # G of the artifact is checked by the worker (its table)
    if args.variants:
        names = [n for n in args.variants.split(",") if n in names]
    base = [sys.executable, __file__, "--model", args.model, "--bits", args.bits, "--preset", args.preset,
            "--target", args.target, "--n", str(args.n), "--seed", str(args.seed), "--batch", str(args.batch),
            "--threads", str(args.threads), "--out-dir", str(out_dir)] + sum([["--set", s] for s in args.set], [])  # fmt: skip
    base += ["--work", args.work] if args.work else []
    pending: list[tuple[str, list[str]]] = []  # (label, argv) ready to start
    artifacts: dict[str, str] = {}

    def sampling_jobs(method: str, path: str) -> None:
        artifacts[method] = path
        k = max(1, args.per_worker)
        for i in range(0, len(names), k):
            chunk = names[i : i + k]
            argv = base + ["--worker", "sample", "--method", method, "--artifact-path", path,
                           "--run", ",".join(chunk), "--ref", str(out_dir / "float-samples.npy")]  # fmt: skip
            pending.append((f"{method}:{chunk[0]}..", argv + (["--deadline", str(deadline)] if deadline else [])))
        pending.sort(key=lambda job: methods.index(job[0].partition(":")[0]))  # the first method's variants first

    for m in methods:
        if m in given:
            sampling_jobs(m, given[m])
        else:
            argv = base + ["--worker", "quantize", "--method", m]
            argv += ["--artifact-tar", args.artifact_tar] if args.artifact_tar else []
            pending.insert(0, (f"{m}:quantize", argv))
    procs: list[tuple[str, subprocess.Popen]] = []
    env = {**os.environ, "QUEST_EXPORT_NO_PROGRESS": "1"}
    started = 0

    def start(limit: int) -> None:
        nonlocal started
        while pending and len(procs) < limit:
            label, argv = pending.pop(0)
            log = open(out_dir / f"worker{started:02d}-{_safe(label.split(':')[0])}.log", "w")
            procs.append((label, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)))
            started += 1

    start(len([1 for label, _ in pending if label.endswith(":quantize")]))  # quantization first, in parallel
    results["float-model"] = float_reference(args, out_dir)  # meanwhile: the float samples every variant compares to
    print(f"float-model: FD {results['float-model']['fd']:.2f}", flush=True)
    while pending or procs:
        if deadline and time.time() > deadline + 30:  # workers skip variants past the deadline; stragglers end here
            for label, pr in procs:
                pr.terminate()
                print(f"{label}: stopped at the deadline", flush=True)
            break
        start(args.jobs)
        time.sleep(2)
        for label, pr in list(procs):
            if pr.poll() is None:
                continue
            procs.remove((label, pr))
            method, _, what = label.partition(":")
            print(f"{label}: exit {pr.returncode} at {time.time() - t_start:.0f} s", flush=True)
            if what == "quantize":
                f = out_dir / f"{_safe(method)}-quantize.json"
                if f.is_file():
                    q = json.loads(f.read_text())
                    results[f"{method}/quantize"] = q
                    print(f"{method}: quantized in {q['quantize_seconds']} s", flush=True)
                    sampling_jobs(method, q["artifact"])
                else:
                    results[f"{method}/quantize"] = {"error": f"exit {pr.returncode}"}
    for m in methods:
        for n in names:
            f = out_dir / f"{_safe(m)}-{n}.json"
            if f.is_file():
                results[f"{m}/{n}"] = json.loads(f.read_text())
    results["_meta"]["wall_seconds"] = round(time.time() - t_start, 1)
    results["_meta"]["artifacts"] = artifacts
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(markdown(results, methods, names))


def markdown(results: dict, methods: list[str], names: list[str]) -> str:
    fl = results.get("float-model", {})
    lines = [f"float model: FD {fl.get('fd', float('nan')):.2f}", "",
             "| variant | " + " | ".join(f"{m} FD | {m} PSNR dB" for m in methods) + " |",
             "|---|" + "---|---|" * len(methods)]  # fmt: skip
    for n in names:
        cells = []
        for m in methods:
            r = results.get(f"{m}/{n}")
            cells += [f"{r['fd']:.2f}", f"{r.get('psnr', float('nan')):.2f}"] if r else ["–", "–"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
