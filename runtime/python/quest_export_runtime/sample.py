"""Sample a bundle on the device, torch-free: class labels, or prompts for a text-to-image bundle, to one PNG.

    python -m quest_export_runtime.sample BUNDLE --prompt "a red bicycle" [--prompt ...] --out images.png
    python -m quest_export_runtime.sample BUNDLE --label sneaker --n 4 --out images.png

Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from quest_export_runtime.errors import InputError, QuestExportError


def sample_to_png(bundle: str, out: str, *, prompts: list[str] | None = None, labels: list[str] | None = None,
                  n: int | None = None, seed: int = 0, steps: int | None = None, guidance_scale: float | None = None,
                  backend: str | None = None) -> str:  # fmt: skip
    """Sample ``bundle`` into the PNG grid ``out`` (prompts for text-to-image bundles, else class labels)."""
    from quest_export_runtime.images import save_grid
    from quest_export_runtime.outputs import check_output
    from quest_export_runtime.pipeline import RuntimePipeline

    out = check_output(out, "file")
    pipe = RuntimePipeline.from_artifact(bundle, backend=backend)
    kw = dict(seed=seed, steps=steps, guidance_scale=guidance_scale)
    if pipe.artifact.text_to_image:
        from quest_export_runtime.text import TextToImage

        if labels:
            raise InputError(f"{bundle} is a text-to-image bundle; give --prompt TEXT instead of --label")
        if not prompts:
            raise InputError(f"{bundle} is a text-to-image bundle; give at least one --prompt TEXT")
        with TextToImage(pipe) as t2i:
            images = t2i(prompts, **kw)
    else:
        if prompts:
            raise InputError(f"{bundle} has no text encoder (not a text-to-image bundle); use --label instead")
        with pipe:
            images = pipe(class_labels=labels or None, num_images=n, **kw)
    return str(save_grid(images, out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quest_export_runtime.sample", description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--prompt", action="append", default=None, help="text prompt (repeatable: one image each)")
    p.add_argument("--label", action="append", default=None, help="class label (class-conditional bundles)")
    p.add_argument("--n", type=int, default=None, help="number of images (labels cycle); default one per label")
    p.add_argument("--out", default="samples.png", help="PNG grid (default: samples.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the bundle's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the bundle's)")
    p.add_argument("--backend", default=None, choices=("auto", "ort", "trt"))
    a = p.parse_args(argv)
    try:
        path = sample_to_png(a.bundle, a.out, prompts=a.prompt, labels=a.label, n=a.n, seed=a.seed, steps=a.steps,
                             guidance_scale=a.guidance, backend=a.backend)  # fmt: skip
    except QuestExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
