"""The bundled Fashion-MNIST classifier: features for FD and labels for class agreement (torch)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from quest_export.errors import ArtifactError


def classifier_dir() -> Path:
    from quest_export.data import package_dir

    return package_dir("quest_export.zoo", "models", "classifier")


@functools.lru_cache(maxsize=2)
def load_classifier(device: str = "cpu"):
    from safetensors.torch import load_file

    from quest_export.zoo.architectures import FashionClassifier

    path = classifier_dir() / "model.safetensors"
    if not path.is_file():
        raise ArtifactError(f"the metric classifier is missing ({path}); reinstall quest-export")
    net = FashionClassifier()
    net.load_state_dict(load_file(str(path)))
    return net.to(device).eval().requires_grad_(False)


def reference_stats() -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma) of the classifier's penultimate features on the Fashion-MNIST test set, and metadata."""
    from safetensors.numpy import load_file

    folder = classifier_dir()
    d = load_file(str(folder / "fd_reference.safetensors"))
    meta = json.loads((folder / "config.json").read_text())
    return d["mu"].astype(np.float64), d["sigma"].astype(np.float64), meta


@torch.no_grad()
def classify(
    images: np.ndarray | torch.Tensor, *, device: str = "cpu", batch: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 128), predicted labels (N,)) of images (N, 1, 32, 32) in [-1, 1]."""
    net = load_classifier(str(device))
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    feats, labels = [], []
    for k in range(0, x.shape[0], batch):
        f = net.embed(x[k : k + batch].to(device))
        feats.append(f.double().cpu().numpy())
        labels.append(net.head(f).argmax(1).cpu().numpy())
    return np.concatenate(feats), np.concatenate(labels)
