"""Float and fake-quant samples of a quantize run dir from the same noise, for the report's image grid (torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def float_and_quantized(run_dir: str | Path, *, n: int = 16, seed: int = 0, device: str = "cpu",
                        show_progress: bool = False) -> dict:  # fmt: skip
    """{"float", "quantized": (n, C, H, W) in [-1, 1], "labels", "sampler", "psnr", "ssim"} with the run's sampler."""
    from quest_export.eval import compare_images, generate
    from quest_export.models import load_model
    from quest_export.models.sampling import SamplerSpec
    from quest_export.quant.artifact import load_quantized
    from quest_export.quant.model import QuantMode

    art = load_quantized(run_dir, device=device)
    s = art.meta["sampler"]
    spec = SamplerSpec.of(s)
    ref = art.meta["model"]
    fmodel = load_model(
        ref["name"], cond=ref.get("cond"), prompts=ref.get("prompts"), device=device
    )  # the float model itself: finetuning
    images = {}  # changed the artifact's latent weights, so its FP mode is not the float model
    images["float"], labels = generate(fmodel.unet, fmodel, spec, n=n, seed=seed, device=device,
                                       show_progress=show_progress)  # fmt: skip
    with art.qunet.mode(QuantMode.FULL):
        images["quantized"], _ = generate(art.qunet.unet, art.model, spec, n=n, seed=seed, device=device,
                                          show_progress=show_progress)  # fmt: skip
    cond = art.model.conditioning
    names = None if labels is None or cond is None else [str(cond.labels[int(k)]) for k in labels]
    return {**images, "labels": names, "sampler": s, "seed": seed, "n": n,
            **compare_images(images["quantized"], images["float"])}  # fmt: skip


def to_rgb_grid(images: np.ndarray, nrow: int) -> np.ndarray:
    """(n, C, H, W) in [-1, 1] -> one uint8 (H', W', 3) grid (grey images repeated on 3 channels)."""
    from quest_export_runtime.images import make_grid

    grid = make_grid(images, nrow=nrow)
    return np.repeat(grid, 3, axis=2) if grid.shape[2] == 1 else grid
