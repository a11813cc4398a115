"""Image grids and PNG writing with numpy and the standard library only (runs on a bare Jetson)."""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from quest_export_runtime.outputs import write_bytes_atomic


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] of shape (N, C, H, W) to uint8 (N, H, W, C)."""
    x = np.clip((np.asarray(x, dtype=np.float32) + 1.0) * 127.5, 0, 255)
    return np.rint(x).astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images: np.ndarray, *, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile images (N, C, H, W) in [-1, 1] into one uint8 image (H', W', C)."""
    imgs = to_uint8(images)  # (N, H, W, C)
    n, h, w, c = imgs.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    grid = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = imgs[k]
    return grid


def write_png(path: str | os.PathLike, img: np.ndarray) -> Path:
    """Write a uint8 image (H, W) or (H, W, 1|3) as an 8-bit PNG."""
    img = np.asarray(img, dtype=np.uint8)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    color_type = 0 if img.ndim == 2 else 2  # grey or RGB
    h, w = img.shape[:2]
    rows = img.reshape(h, -1)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    return write_bytes_atomic(path, png)


def save_grid(images: np.ndarray, path: str | os.PathLike, *, nrow: int | None = None) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid."""
    return write_png(path, make_grid(images, nrow=nrow))
