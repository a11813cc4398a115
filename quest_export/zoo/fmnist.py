"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files, gzip).

Only the training scripts and the reference-statistics tool read the data set; tests,
CI and the main job never need it.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from quest_export.errors import InputError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")  # fmt: skip
IMAGE_SIZE = 32  # 28x28 padded by 2 on every side


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Resolve the folder that holds the four IDX .gz files."""
    for cand in (explicit, os.environ.get("FASHION_MNIST_DIR"), DEBIAN_DIR):
        if cand and (Path(cand) / "t10k-images-idx3-ubyte.gz").is_file():
            return Path(cand)
    raise InputError(
        "Fashion-MNIST not found; install it with `apt-get install dataset-fashion-mnist` "
        "or point FASHION_MNIST_DIR at a folder with the four *-ubyte.gz files"
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic, ndim = struct.unpack(">HxB", raw[:4])[0], raw[3]
    if magic != 0:
        raise InputError(f"{path} is not an IDX file")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images, labels) of ``split`` ('train' or 't10k').

    images: float32 (N, 1, 32, 32) in [-1, 1], padded with -1 (background); labels: int64 (N,).
    """
    d = data_dir(root)
    imgs = _read_idx(d / f"{split}-images-idx3-ubyte.gz")  # (N, 28, 28) uint8
    labels = _read_idx(d / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    x = imgs.astype(np.float32) / 127.5 - 1.0  # (N, 28, 28) in [-1, 1]
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)), constant_values=-1.0)[:, None]  # (N, 1, 32, 32)
    return np.ascontiguousarray(x), labels
