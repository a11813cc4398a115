"""A diffusers-compatible stand-in for the UNet, backed by an exported graph or engine.

    pipe = DDIMPipeline.from_pretrained(...)          # any diffusers pipeline that calls unet(sample, t, ...)
    pipe.unet = EngineUNet.from_artifact("out/bundle")
    images = pipe(num_inference_steps=50).images

The wrapper converts torch tensors to numpy, runs ``quest_export_runtime.pipeline.Denoiser`` (ONNX Runtime or
TensorRT, with the timestep-group routing of the artifact) and converts the result back to the input's device and
dtype. This is the only runtime module that imports torch; ``quest_export_runtime`` never imports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from quest_export_runtime.bundle import Artifact, open_artifact
from quest_export_runtime.device import DeviceInfo
from quest_export_runtime.pipeline import Denoiser

from quest_export.errors import InputError


@dataclass
class EngineUNetOutput:
    """What diffusers' UNet2DOutput / UNet2DConditionOutput carry: ``.sample`` (B, C, H, W)."""

    sample: torch.Tensor

    def __getitem__(self, i: int) -> torch.Tensor:  # output[0], like diffusers' BaseOutput
        return (self.sample,)[i]


class EngineConfig(dict):
    """The UNet config as diffusers pipelines read it: ``unet.config.sample_size`` or ``unet.config["in_channels"]``."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"EngineUNet config has no {key!r}") from None


def unet_config(artifact: Artifact) -> EngineConfig:
    """Config keys from the manifest's ``unet_config`` when present, completed from the graph's io shapes."""
    cfg = dict(artifact.manifest.get("unet_config") or {})
    c, h, w = artifact.sample_shape
    cfg.setdefault("in_channels", c)
    cfg.setdefault("out_channels", c)
    cfg.setdefault("sample_size", h if h == w else [h, w])
    if artifact.conditioning is not None:
        cfg.setdefault("cross_attention_dim", int(artifact.conditioning.table.shape[-1]))
    return EngineConfig(cfg)


class EngineUNet:
    """Callable like a diffusers UNet: ``unet(sample, timestep, encoder_hidden_states=None).sample``."""

    def __init__(self, denoiser: Denoiser):
        """Wrap a denoiser (activated at the first call).

        Args:
            denoiser: the model; most callers use ``EngineUNet.from_artifact``.
        """
        self.denoiser = denoiser
        self.config = unet_config(denoiser.artifact)
        self.dtype = torch.float32  # what the graph computes in; outputs follow the input's dtype
        self.device = torch.device("cpu")  # outputs follow the input's device

    @classmethod
    def from_artifact(
        cls,
        path: str | os.PathLike | Artifact,
        *,
        backend: str | None = None,
        providers: list[Any] | None = None,
        graph_optimization_level: Any = None,
        device: DeviceInfo | None = None,
    ) -> EngineUNet:
        """Open and verify an export, bundle or engine folder (see ``open_artifact`` and ``Denoiser``).

        Raises:
            ArtifactError, ManifestMismatch, TensorRTUnavailableError: see ``open_artifact``.
        """
        art = path if isinstance(path, Artifact) else open_artifact(path, device=device)
        return cls(
            Denoiser(art, backend=backend, providers=providers, graph_optimization_level=graph_optimization_level)
        )

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: Any = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> EngineUNetOutput | tuple[torch.Tensor]:
        """One UNet call, as diffusers' ``UNet2DModel`` / ``UNet2DConditionModel.forward``.

        Args:
            sample: x_t (B, C, H, W), any float dtype and device.
            timestep: a scalar or (B,) tensor / number.
            encoder_hidden_states: (B, L, D) for conditional models (e.g. rows of the artifact's conditioning table).
            class_labels: unsupported (conditioning goes through encoder_hidden_states); must be None.
            return_dict: False returns a tuple ``(sample,)``.
            **kwargs: other diffusers UNet arguments; accepted only when None (e.g. ``cross_attention_kwargs``).

        Returns:
            EngineUNetOutput with ``.sample`` (B, C, H, W) on the device and in the dtype of ``sample``.

        Raises:
            InputError: an argument the exported graph cannot honour.
        """
        used = {k: v for k, v in dict(kwargs, class_labels=class_labels).items() if v is not None}
        if used:
            raise InputError(f"EngineUNet cannot honour {sorted(used)}: the exported graph takes only sample, "
                             "timestep and encoder_hidden_states")  # fmt: skip
        if not self.denoiser.is_active:
            self.denoiser.activate()  # stays active until close()
        x = sample.detach().to("cpu", torch.float32).numpy()  # (B, C, H, W)
        t = torch.as_tensor(timestep).detach().to("cpu", torch.float32).reshape(-1).numpy()  # (1,) or (B,)
        c = None
        if encoder_hidden_states is not None:
            c = encoder_hidden_states.detach().to("cpu", torch.float32).numpy()  # (B, L, D)
        eps = self.denoiser(x, np.broadcast_to(t, (x.shape[0],)), c)  # (B, C, H, W)
        out = torch.from_numpy(np.ascontiguousarray(eps)).to(sample.device, sample.dtype)
        return EngineUNetOutput(out) if return_dict else (out,)

    forward = __call__

    def to(self, *args: Any, **kwargs: Any) -> EngineUNet:
        """Record the device / dtype a pipeline asks for; the engine itself does not move. Returns self."""
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.dtype):
                self.dtype = a
            elif isinstance(a, (str, torch.device)):
                self.device = torch.device(a)
        return self

    def eval(self) -> EngineUNet:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> EngineUNet:
        return self

    def close(self) -> None:
        """Release the sessions or engines."""
        self.denoiser.deactivate()

    def __enter__(self) -> EngineUNet:
        self.denoiser.activate()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
