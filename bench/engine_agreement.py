"""Class agreement and FD of engine samples (torch-free runtime, ONNX Runtime) against the fake-quant model's
samples from the same initial noise and labels, for a build / bundle / export folder of a bundled model.

    python bench/engine_agreement.py engines/out/fmnist-cond-quest-w8a8-jetson-orin-jp61 --n 200 --out agree.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from quest_export_runtime.pipeline import RuntimePipeline

    from quest_export.eval import compare_images, score
    from quest_export.models.sampling import SamplerSpec, sample
    from quest_export.quant.model import QuantMode
    from quest_export.verify.harness import _torch_reference

    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    pipe = RuntimePipeline.from_artifact(args.path)
    art = pipe.artifact
    ref = _torch_reference(Path(art.manifest["source"]["artifact"]), art.manifest, "cpu")
    cond = ref.model.conditioning
    c, h, w = art.sample_shape
    latents = np.random.default_rng(args.seed).standard_normal((args.n, c, h, w)).astype(np.float32)
    labels = None if cond is None else [cond.cond_rows[k % len(cond.cond_rows)] for k in range(args.n)]
    spec = art.manifest["sampler"]
    t0 = time.time()
    with pipe:
        eng = np.concatenate([pipe(class_labels=None if labels is None else labels[k : k + args.batch],
                                   num_images=min(args.batch, args.n - k), latents=latents[k : k + args.batch])
                              for k in range(0, args.n, args.batch)])  # fmt: skip
    t_eng = time.time() - t0
    sspec = SamplerSpec(spec["sampler"], spec["steps"], spec.get("eta", 0.0), spec.get("guidance_scale", 1.0))
    t0 = time.time()
    fq = []
    with ref.qunet.mode(QuantMode.FULL), torch.no_grad():
        for k in range(0, args.n, args.batch):
            lab = None if labels is None else torch.tensor(labels[k : k + args.batch])
            fq.append(sample(ref.qunet.unet, art.manifest["scheduler_config"], noise=torch.from_numpy(latents[k : k + args.batch]),
                             spec=sspec, cond=None if cond is None else cond.rows(lab),
                             uncond=None if cond is None else cond.uncond).numpy())  # fmt: skip
    fq = np.concatenate(fq)
    t_fq = time.time() - t0
    lab_np = None if labels is None else np.asarray(labels)
    fd_e, ag_e = score(eng, lab_np)
    fd_q, ag_q = score(fq, lab_np)
    res = {"path": args.path, "n": args.n, "seed": args.seed, "sampler": spec,
           "engine": {"fd": round(fd_e, 3), "class_agreement": ag_e, "seconds": round(t_eng, 1)},
           "fake_quant": {"fd": round(fd_q, 3), "class_agreement": ag_q, "seconds": round(t_fq, 1)},
           "engine_vs_fake_quant": compare_images(eng, fq)}  # fmt: skip
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
