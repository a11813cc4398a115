"""Step rates of Stage A reconstruction, eager against CUDA graphs, side by side in one run.

    python bench/recon_speed.py --model fmnist-cond --iters 300 --out speed.json

Runs Stage A (W4A8, `paper` preset otherwise: 25 groups, AdaRound batch 16) twice on the same
calibration set and seed, once with `ptq.cuda_graphs=false` and once with `true`, and prints the
AdaRound iterations per second of each, their ratio, and how far the two results differ
(per-group eps MSE). Then a short Stage B/C run at paper batch sizes on each, eager and graphed,
gives milliseconds per finetuning step. On a CPU every row runs eagerly (graphs need a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="fmnist-cond")
    p.add_argument("--bits", default="w4a8")
    p.add_argument("--iters", type=int, default=300, help="AdaRound iterations per unit")
    p.add_argument("--b-epochs", type=int, default=2)
    p.add_argument("--c-epochs", type=int, default=1)
    p.add_argument("--work", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--set", action="append", default=[], help="extra recipe override, repeatable")
    args = p.parse_args()

    import copy

    import torch

    from quest_export import pipeline
    from quest_export.calib.collect import CalibrationSet
    from quest_export.finetune import finetune_
    from quest_export.models import load_model
    from quest_export.ptq.stage_a import run_stage_a

    sets = (
        f"ptq.adaround_iters={args.iters}",
        f"finetune.b_epochs={args.b_epochs}",
        f"finetune.c_epochs={args.c_epochs}",
        *args.set,
    )
    recipe = pipeline.resolve_recipe(model=args.model, bits=args.bits, preset="paper", method="quest", sets=sets)
    device = pipeline.resolve_device(recipe)
    calib_path = (
        pipeline.run(recipe, stages=("calibrate",), work=args.work, show_progress=False).stage("calibrate").path
    )
    calib = CalibrationSet.load(calib_path)
    res: dict = {"model": args.model, "bits": args.bits, "iters": args.iters, "device": device,
                 "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None, "rows": {}}  # fmt: skip
    qunets = {}
    for graphs in (False, True):
        model = load_model(recipe.model.name, device=device)
        teacher = copy.deepcopy(model.unet)
        cfg = dataclasses.replace(recipe.ptq, cuda_graphs=graphs)
        t0 = time.time()
        qunet, rep = run_stage_a(model, calib, recipe.quant, cfg, groups=recipe.quant.timestep_groups, device=device,
                                 seed=0, show_progress=False)  # fmt: skip
        units = len(rep.adaround)
        loops = sorted({r["loop"] for r in rep.adaround.values()})
        row = {"stage_a_seconds": round(time.time() - t0, 1), "seconds": rep.seconds, "units": units, "loops": loops,
               "adaround_it_per_s": round(units * args.iters / max(rep.seconds.get("adaround", 0), 1e-9), 1),
               "eps_mse": rep.eps_mse}  # fmt: skip
        res["rows"]["graph" if graphs else "eager"] = row
        qunets[graphs] = (qunet, teacher)
        print(
            f"cuda_graphs={graphs}: {units} units x {args.iters} it in {rep.seconds.get('adaround')} s "
            f"({row['adaround_it_per_s']} it/s, loop {loops}); act init {rep.seconds.get('act_init')} s",
            flush=True,
        )
    e, g = res["rows"]["eager"], res["rows"]["graph"]
    res["speedup"] = round(g["adaround_it_per_s"] / max(e["adaround_it_per_s"], 1e-9), 2)
    res["eps_mse_max_rel_diff"] = max(abs(e["eps_mse"][k] - g["eps_mse"][k]) / max(e["eps_mse"][k], 1e-12)
                                      for k in e["eps_mse"])  # fmt: skip
    print(
        f"graph / eager AdaRound rate: {res['speedup']}x; eps MSE max relative difference "
        f"{res['eps_mse_max_rel_diff']:.2e}",
        flush=True,
    )

    G, ft = recipe.quant.timestep_groups, recipe.finetune
    steps_b = G * ft.b_epochs * -(-ft.b_samples // ft.b_batch)
    steps_c = ft.c_epochs * G * -(-ft.c_samples // ft.c_batch)
    res["finetune"] = {"steps_b": steps_b, "steps_c": steps_c}
    for graphs in (False, True):
        qunet, teacher = qunets[graphs]
        cfg = dataclasses.replace(recipe.finetune, cuda_graphs=graphs)
        fr = finetune_(qunet, teacher, calib, cfg, family=recipe.model.family, device=device, show_progress=False)
        f = {"stage_seconds": fr.stage_seconds, "loops": fr.loops, "peak_memory_mib": fr.peak_memory_mib,
             "ms_per_step_b": round(1000 * fr.stage_seconds.get("B", 0) / max(steps_b, 1), 2),
             "ms_per_step_c": round(1000 * fr.stage_seconds.get("C", 0) / max(steps_c, 1), 2),
             "stage_b": fr.stage_b, "stage_c": fr.stage_c}  # fmt: skip
        res["finetune"]["graph" if graphs else "eager"] = f
        print(f"finetune cuda_graphs={graphs} ({fr.loops}): Stage B {f['ms_per_step_b']} ms/step ({steps_b} steps), "
              f"Stage C {f['ms_per_step_c']} ms/step ({steps_c} steps)", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
