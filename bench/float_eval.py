"""FD and class agreement of the float bundled models across guidance scales and step counts (same seed).

python bench/float_eval.py --n 1000 --out float_eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from quest_export import pipeline

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", default="1.0,2.0,3.0")
    p.add_argument("--steps", default="50,20")
    p.add_argument("--out", default="float_eval.json")
    p.add_argument("--grids", default=None, help="folder for PNG grids")
    args = p.parse_args()
    rows = []
    for model in ("fmnist-cond", "fmnist-uncond"):
        recipe = pipeline.resolve_recipe(model=model)
        gs = [float(g) for g in args.guidance.split(",")] if model == "fmnist-cond" else [1.0]
        for steps in (int(s) for s in args.steps.split(",")):
            for g in gs:
                grid = f"{args.grids}/{model}-s{steps}-g{g}.png" if args.grids else None
                r = pipeline.evaluate(recipe, n=args.n, seed=args.seed, guidance=g, steps=steps, grid=grid)
                rows.append(r)
                print(
                    json.dumps({k: r[k] for k in ("model", "fd", "class_agreement", "sampler", "seconds")}), flush=True
                )
    # reference: random weights (same architecture) to show the scale of FD
    import torch

    from quest_export.eval import evaluate
    from quest_export.models import load_model
    from quest_export.models.sampling import SamplerSpec

    m = load_model("fmnist-cond", device=pipeline.resolve_device(pipeline.resolve_recipe()))
    torch.manual_seed(0)
    for prm in m.unet.parameters():
        torch.nn.init.normal_(prm, std=0.02)
    rep, _ = evaluate(m.unet, m, SamplerSpec("ddim", 50, 0.0, 2.0), n=min(args.n, 500), seed=args.seed,
                      device=pipeline.resolve_device(pipeline.resolve_recipe()), show_progress=False)  # fmt: skip
    rows.append({"model": "fmnist-cond (random weights)", **rep.to_dict()})
    print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
