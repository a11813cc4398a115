"""Sample-quality and agreement metrics in numpy (no torch): FD, PSNR, SSIM, error statistics."""

from __future__ import annotations

import numpy as np
from quest_export_runtime.metrics import error_stats, psnr  # noqa: F401  (one definition, shared with the device)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), via symmetric eigendecompositions."""
    w1, v1 = np.linalg.eigh(sigma1)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T  # S1^1/2
    m = root1 @ sigma2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


def _box(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k windows (valid positions) of images (N, C, H, W)."""
    c = np.cumsum(np.cumsum(np.pad(x, ((0, 0), (0, 0), (1, 0), (1, 0))), axis=2), axis=3)
    return (c[:, :, k:, k:] - c[:, :, :-k, k:] - c[:, :, k:, :-k] + c[:, :, :-k, :-k]) / (k * k)


def ssim(a: np.ndarray, b: np.ndarray, *, data_range: float = 2.0, window: int = 7) -> float:
    """Mean SSIM (Wang et al. 2004, uniform 7x7 window) of image batches (N, C, H, W)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _box(x, window), _box(y, window)
    vx, vy = _box(x * x, window) - mx * mx, _box(y * y, window) - my * my
    cxy = _box(x * y, window) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())
