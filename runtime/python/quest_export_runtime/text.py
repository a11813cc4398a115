"""Text-to-image on the device: prompt -> token ids -> float text encoder -> quantized UNet loop -> VAE decoder.

A bundle of a text-to-image pipeline (manifest ``text_to_image``, docs/formats.md) carries the pipeline's tokenizer
as ``text/tokenizer.json`` (padding and truncation built in, checked at export against transformers' ids), the CLIP
text encoder and the VAE decoder as float32 ONNX graphs. The tokenizer is read with the ``tokenizers`` package
(Rust, no torch: ``pip install quest-export-runtime[text]``); the two float graphs run in ONNX Runtime on every
target (on a TensorRT target the UNet is the engine; the float parts are small next to it).

    with TextToImage.from_artifact("out/bundle") as t2i:
        images = t2i(["a red bicycle", "a lighthouse"], seed=0)   # (2, 3, H, W) float32 in [-1, 1]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quest_export_runtime.errors import ArtifactError, InputError
from quest_export_runtime.manifest import text_files

__all__ = ["LatentDecoder", "PromptEncoder", "TextToImage", "text_files"]


class PromptEncoder:
    """Prompts -> encoder_hidden_states (N, L, D) float32 with the bundle's tokenizer and float text encoder."""

    def __init__(self, root: Path, entry: dict, *, providers: list[Any] | None = None):
        from quest_export_runtime.session import OnnxRuntimeRunner

        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise InputError("this bundle turns prompts into images, which needs the tokenizers package: "
                             "pip install 'quest-export-runtime[text]'") from None  # fmt: skip
        self.tokenizer = Tokenizer.from_file(str(root / entry["tokenizer"]))
        self.max_length = int(entry["max_length"])
        self.runner = OnnxRuntimeRunner(root / entry["text_encoder"], providers=providers)

    def ids(self, prompts: Sequence[str]) -> np.ndarray:
        """(N, L) int64 token ids, padded and truncated to the encoder's length."""
        ids = np.asarray([e.ids for e in self.tokenizer.encode_batch(list(prompts))], dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] != self.max_length:
            raise ArtifactError(f"text/tokenizer.json gives {ids.shape[-1]} ids per prompt, the encoder takes "
                                f"{self.max_length}; re-export the bundle")  # fmt: skip
        return ids

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        return self.runner.infer({"input_ids": self.ids(prompts)})["encoder_hidden_states"]  # (N, L, D)


class LatentDecoder:
    """Latents (N, C, h, w) -> images (N, 3, H, W) float32 in [-1, 1] with the bundle's float VAE decoder."""

    def __init__(self, root: Path, entry: dict, *, providers: list[Any] | None = None):
        from quest_export_runtime.session import OnnxRuntimeRunner

        self.runner = OnnxRuntimeRunner(root / entry["vae_decoder"], providers=providers)

    def __call__(self, latents: np.ndarray, *, batch_size: int = 4) -> np.ndarray:
        out = [self.runner.infer({"latents": np.ascontiguousarray(latents[i : i + batch_size], dtype=np.float32)})
               ["image"] for i in range(0, len(latents), batch_size)]  # fmt: skip
        return np.clip(np.concatenate(out), -1.0, 1.0)


class TextToImage:
    """The device-side text-to-image pipeline of a bundle (numpy, ONNX Runtime, optional TensorRT for the UNet)."""

    def __init__(self, pipe, *, providers: list[Any] | None = None):
        """Wrap a RuntimePipeline whose artifact has a ``text_to_image`` entry; nothing is loaded before activation."""
        art = pipe.artifact
        entry = art.manifest.get("text_to_image")
        if not entry:
            raise InputError(f"{art.root} is not a text-to-image bundle (its manifest has no 'text_to_image'); "
                             "sample it with class labels instead")  # fmt: skip
        self.pipe, self.artifact = pipe, art
        self.encoder = PromptEncoder(art.root, entry, providers=providers)
        self.decoder = LatentDecoder(art.root, entry, providers=providers)

    @classmethod
    def from_artifact(cls, path: str | os.PathLike, *, backend: str | None = None,
                      providers: list[Any] | None = None) -> TextToImage:  # fmt: skip
        from quest_export_runtime.pipeline import RuntimePipeline

        return cls(RuntimePipeline.from_artifact(path, backend=backend, providers=providers), providers=providers)

    def activate(self) -> TextToImage:
        for part in (self.encoder.runner, self.decoder.runner):
            part.activate()
        self.pipe.activate()
        return self

    def deactivate(self) -> None:
        self.pipe.deactivate()
        for part in (self.encoder.runner, self.decoder.runner):
            part.deactivate()

    def __enter__(self) -> TextToImage:
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    def latents(self, prompts: Sequence[str], **kw: Any) -> np.ndarray:
        """The UNet loop's output latents (N, C, h, w) for ``prompts``; ``kw`` as RuntimePipeline.__call__."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError("prompts must be a non-empty list of strings")
        states = self.encoder(list(prompts) + [""])  # (N + 1, L, D): the empty prompt is the guidance row
        return self.pipe(encoder_hidden_states=states[:-1], uncond=states[-1:], **kw)

    def __call__(self, prompts: Sequence[str], **kw: Any) -> np.ndarray:
        """Images (N, 3, H, W) float32 in [-1, 1] for ``prompts`` (seed, steps, guidance_scale as RuntimePipeline)."""
        return self.decoder(self.latents(prompts, **kw))
