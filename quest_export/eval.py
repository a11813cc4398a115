"""Sample generation with fixed noise and the sample-quality metrics of the bundled models.

Every row of a comparison uses the same seed, so the same initial noise, labels and sampler:
image k always starts from noise row k and asks for class k mod 10.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from quest_export.log import progress
from quest_export.models.sampling import SamplerSpec, sample
from quest_export.verify.metrics import feature_stats, frechet_distance, psnr, ssim


@dataclass
class EvalReport:
    n: int
    fd: float
    class_agreement: float | None
    sampler: dict
    seed: int
    seconds: float
    metric: str = "FD of classifier penultimate features (128-d) vs the Fashion-MNIST test set (10k)"

    def to_dict(self) -> dict:
        return asdict(self)


def labels_for(model, n: int) -> torch.Tensor | None:
    """Conditioning rows for images 0..n-1: the non-unconditional rows in turn."""
    if model.conditioning is None:
        return None
    rows = torch.tensor(model.conditioning.cond_rows)
    return rows[torch.arange(n) % len(rows)]


@torch.no_grad()
def generate(unet, model, spec: SamplerSpec, *, n: int, seed: int = 0, batch: int = 250, device="cpu",
             show_progress: bool = True) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """n images (n, C, H, W) in [-1, 1] from noise rows drawn with ``seed``; returns (images, row labels). A text
    pipeline's latents are decoded by its float VAE (images (n, 3, H, W))."""
    c, h, w = model.sample_shape
    noise = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))  # (n, C, H, W)
    labels = labels_for(model, n)
    cond = model.conditioning
    out = []
    bar = progress(total=n, description="sample", enabled=show_progress)
    for k in range(0, n, batch):
        sl = slice(k, min(k + batch, n))
        x = sample(unet, model.info.scheduler_config, noise=noise[sl].to(device), spec=spec,
                   cond=None if cond is None else cond.rows(labels[sl]).to(device),
                   uncond=None if cond is None or cond.uncond is None else cond.uncond.to(device),
                   variance_seed=seed + k)  # fmt: skip
        if model.info.text is not None:
            from quest_export.models.text import decode_latents

            x = decode_latents(model, x)
        out.append(x.float().cpu().numpy())
        bar.advance(sl.stop - sl.start)
    bar.close()
    return np.concatenate(out), None if labels is None else labels.numpy()


def is_fmnist(model) -> bool:
    from quest_export.zoo.fmnist import LABELS

    c = model.conditioning
    shape_ok = model.sample_shape == (1, 32, 32)
    return shape_ok and (c is None or list(c.labels[: len(LABELS)]) == list(LABELS))


def score(images: np.ndarray, labels: np.ndarray | None, *, device="cpu") -> tuple[float, float | None]:
    """(FD vs the test-set statistics, share classified as the requested class) of Fashion-MNIST samples."""
    from quest_export.verify.classifier import classify, reference_stats

    feats, pred = classify(images, device=device)
    mu, sigma, _ = reference_stats()
    fd = frechet_distance(*feature_stats(feats), mu, sigma)
    agree = None if labels is None else float(np.mean(pred == labels))
    return fd, agree


def evaluate(unet, model, spec: SamplerSpec, *, n: int, seed: int = 0, batch: int = 250, device="cpu",
             show_progress: bool = True) -> tuple[EvalReport, np.ndarray]:  # fmt: skip
    """Generate n images and score them. Returns the report and the images."""
    t0 = time.time()
    imgs, labels = generate(unet, model, spec, n=n, seed=seed, batch=batch, device=device, show_progress=show_progress)
    fd, agree = score(imgs, labels, device=device)
    rep = EvalReport(n=n, fd=round(fd, 3), class_agreement=None if agree is None else round(agree, 4),
                     sampler=asdict(spec), seed=seed, seconds=round(time.time() - t0, 1))  # fmt: skip
    return rep, imgs


def compare_images(a: np.ndarray, b: np.ndarray) -> dict:
    """PSNR and SSIM of samples a against samples b from the same noise."""
    return {"psnr": round(psnr(a, b), 3), "ssim": round(ssim(a, b), 4)}
