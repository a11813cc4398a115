"""Comparison metrics shared by the build host's harness and the device-side verify (numpy only)."""

from __future__ import annotations

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, *, data_range: float = 2.0) -> float:
    """PSNR (dB) of images in [-1, 1] (data range 2), over the whole batch."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def error_stats(run: np.ndarray, ref: np.ndarray, *, quantile: float = 0.99) -> dict[str, float]:
    """max/mean abs error, relative L2, cosine similarity and an abs-error quantile of run vs ref."""
    r, f = np.asarray(run, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    d = np.abs(r - f)
    denom = np.linalg.norm(r) * np.linalg.norm(f)
    return {
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "rel_l2": float(np.linalg.norm(r - f) / max(np.linalg.norm(f), 1e-30)),
        "cosine": float(np.dot(r, f) / denom) if denom > 0 else 1.0,
        f"p{int(quantile * 100)}_abs": float(np.quantile(d, quantile)),
        "ref_std": float(f.std()),
    }
