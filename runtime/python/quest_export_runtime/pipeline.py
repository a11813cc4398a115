"""The sampler loop on the device, in numpy: artifact -> runners -> DDIM / DDPM -> images.

``Denoiser`` is the UNet behind an artifact: it routes each sample to the graph (per-group) or the scale-ratio row
(scale-input) of its timestep's group. ``RuntimePipeline`` owns the loop: noise from a seed, classifier-free
guidance, the scheduler from the manifest's diffusers config, and images (N, C, H, W) in [-1, 1].

    with RuntimePipeline.from_artifact("out/bundle") as pipe:
        images = pipe(class_labels=["sneaker", "bag"], seed=0)      # (2, C, H, W) float32 in [-1, 1]
        pipe.save_grid(images, "samples.png")
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quest_export_runtime import images as _images
from quest_export_runtime.bundle import Artifact, open_artifact
from quest_export_runtime.device import DeviceInfo
from quest_export_runtime.errors import ArtifactError, InputError
from quest_export_runtime.schedulers import scheduler_from_config
from quest_export_runtime.session import OnnxRuntimeRunner, Runner, TensorRTRunner, external_initializers

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "ort", "trt")
TIMESTEP_DTYPE = np.float32  # docs/formats.md: timestep is float32 [batch]


def _noise(rngs: Sequence[np.random.Generator], shape: tuple[int, ...]) -> np.ndarray:
    """One standard normal draw per image from its own generator: (len(rngs), *shape) float32."""
    return np.stack([r.standard_normal(shape, dtype=np.float32) for r in rngs])


class Denoiser:
    """The exported UNet as one callable: noise_pred = denoiser(sample, timestep, encoder_hidden_states)."""

    def __init__(
        self,
        artifact: Artifact,
        *,
        backend: str | None = None,
        providers: list[Any] | None = None,
        graph_optimization_level: Any = None,
        share_weights: bool | None = None,
    ):
        """Create one runner per graph; nothing is loaded before activate().

        Args:
            artifact: an opened artifact (``open_artifact``).
            backend: ort | trt | auto. None / auto: trt for engine folders, ort for export and bundle folders.
            providers: ONNX Runtime execution providers (see ``OnnxRuntimeRunner``).
            graph_optimization_level: ONNX Runtime optimization level (see ``OnnxRuntimeRunner``).
            share_weights: per-group ONNX graphs share one mapping of the weights file (deploy.md O-7).
                None: True when the artifact has a shared weights file.

        Raises:
            InputError: an unknown backend.
            ArtifactError: a backend the artifact cannot serve, naming what to do.
        """
        backend = backend or "auto"
        if backend not in BACKENDS:
            raise InputError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        backend = artifact.backend if backend == "auto" else backend
        if backend == "trt" and artifact.backend != "trt":
            raise ArtifactError(f"{artifact.root} holds ONNX graphs, not TensorRT engines; build the engine on this "
                                f"device first: {artifact.rebuild_command()}")  # fmt: skip
        if backend == "ort" and artifact.backend != "ort":
            raise ArtifactError(f"{artifact.root} holds TensorRT engines; for ONNX Runtime open the export or bundle "
                                "folder the engine was built from")  # fmt: skip
        self.artifact, self.backend = artifact, backend
        self.share_weights = artifact.weights_file is not None if share_weights is None else share_weights
        self.runners: dict[int | None, Runner] = {}
        for g in artifact.graphs:
            if backend == "trt":
                self.runners[g.group] = TensorRTRunner(g.path)
            else:
                self.runners[g.group] = OnnxRuntimeRunner(
                    g.path, providers=providers, graph_optimization_level=graph_optimization_level
                )
        self.is_active = False

    def activate(self) -> Denoiser:
        """Load every graph (one session or engine per group in per-group mode). Returns self."""
        if self.is_active:
            return self
        if self.backend == "ort" and self.share_weights and len(self.runners) > 1:
            shared = external_initializers(self.artifact.graphs[0].path)  # one mapping for every group's session
            for runner in self.runners.values():
                runner.shared_initializers = shared
        try:
            for runner in self.runners.values():
                runner.activate()
        except BaseException:
            self.deactivate()
            raise
        self.is_active = True
        return self

    def deactivate(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()
        self.is_active = False

    def __enter__(self) -> Denoiser:
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, encoder_hidden_states: np.ndarray | None = None):
        """noise_pred for a batch whose timesteps may fall in different groups.

        Args:
            sample: x_t, (B, C, H, W) float32.
            timestep: (B,) or a scalar; fed as float32.
            encoder_hidden_states: (B, L, D) float32 for conditional models, else None.

        Returns:
            noise_pred (B, C, H, W) float32.

        Raises:
            InputError: not active, or inputs that do not fit the graph.
        """
        if not self.is_active:
            raise InputError("the denoiser is not active; use `with denoiser:` or call activate() first")
        art = self.artifact
        x = np.asarray(sample, dtype=np.float32)  # (B, C, H, W)
        t = np.broadcast_to(np.asarray(timestep, dtype=TIMESTEP_DTYPE), (x.shape[0],))  # (B,)
        takes_cond = "encoder_hidden_states" in next(iter(self.runners.values())).inputs
        if (encoder_hidden_states is None) == takes_cond:
            need = "needs" if takes_cond else "takes no"
            raise InputError(f"{art.root}: this model {need} encoder_hidden_states")
        groups = art.groups.groups_of(t) if art.scale_mode != "merged" else np.zeros(len(t), dtype=np.int64)  # (B,)
        out = None
        for g in np.unique(groups).tolist():
            idx = np.nonzero(groups == g)[0]  # the samples of this group
            g = g if art.scale_mode != "merged" else None
            runner = self.runners[g] if art.scale_mode == "per-group" else next(iter(self.runners.values()))
            feed = {"sample": x[idx], "timestep": np.ascontiguousarray(t[idx])}
            if encoder_hidden_states is not None:
                feed["encoder_hidden_states"] = np.asarray(encoder_hidden_states, dtype=np.float32)[idx]
            feed.update(art.extra_inputs(g))
            pred = runner.infer(feed)["noise_pred"]
            if out is None:
                out = np.empty((x.shape[0], *pred.shape[1:]), dtype=pred.dtype)  # (B, C, H, W)
            out[idx] = pred
        return out


class RuntimePipeline:
    """Samples images from an artifact with the sampler it was exported for; numpy only."""

    def __init__(self, denoiser: Denoiser):
        """Wrap a denoiser; nothing is loaded before activation.

        Args:
            denoiser: the model; most callers use ``RuntimePipeline.from_artifact``.

        Raises:
            ArtifactError: the artifact lacks the sampler or the scheduler config.
        """
        art = denoiser.artifact
        for key in ("sampler", "scheduler_config"):
            if not art.manifest.get(key):
                raise ArtifactError(f"{art.root}: manifest has no '{key}', so the runtime cannot sample from it "
                                    "(docs/formats.md); re-run the export, or use Denoiser for single calls")  # fmt: skip
        self.denoiser, self.artifact = denoiser, art

    @classmethod
    def from_artifact(
        cls,
        path: str | os.PathLike | Artifact,
        *,
        backend: str | None = None,
        providers: list[Any] | None = None,
        graph_optimization_level: Any = None,
        device: DeviceInfo | None = None,
    ) -> RuntimePipeline:
        """Open and verify an artifact folder and build the pipeline (nothing is loaded before activation).

        Args:
            path: an export, bundle or engine folder, or an opened Artifact.
            backend: ort | trt | auto (None): see ``Denoiser``.
            providers, graph_optimization_level: ONNX Runtime options (see ``OnnxRuntimeRunner``).
            device: what an engine folder must match; None: query this machine.

        Raises:
            ArtifactError, ManifestMismatch, TensorRTUnavailableError: see ``open_artifact``.
        """
        art = path if isinstance(path, Artifact) else open_artifact(path, device=device)
        denoiser = Denoiser(
            art, backend=backend, providers=providers, graph_optimization_level=graph_optimization_level
        )
        return cls(denoiser)

    def activate(self) -> RuntimePipeline:
        self.denoiser.activate()
        return self

    def deactivate(self) -> None:
        self.denoiser.deactivate()

    def __enter__(self) -> RuntimePipeline:
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    def _resolve_steps(self, steps: int | None) -> int:
        exported = int(self.artifact.sampler["steps"])
        if self.artifact.scale_mode == "merged":  # one graph for every timestep: any step count maps
            return exported if steps is None else int(steps)
        required = int((self.artifact.manifest.get("groups") or {}).get("steps", exported))
        if steps is None:
            return required
        if steps != required:
            raise InputError(f"{self.artifact.root} was calibrated per timestep group ({self.artifact.scale_mode}) for "
                             f"{required} steps; {steps} steps would put timesteps in groups calibrated for others: "
                             f"use steps={required} or re-export for {steps} steps")  # fmt: skip
        return int(steps)

    def _conditions(
        self, class_labels: Sequence[int | str] | None, num_images: int | None
    ) -> tuple[int, np.ndarray | None]:
        cond = self.artifact.conditioning
        if cond is None:
            if class_labels is not None:
                raise InputError(f"{self.artifact.root} is an unconditional model; drop class_labels")
            return (1 if num_images is None else num_images), None
        if class_labels is None:  # one image per class, or num_images cycling over the classes
            classes = cond.class_indices
            n = len(classes) if num_images is None else num_images
            class_labels = [classes[i % len(classes)] for i in range(n)]
        if num_images is not None and num_images != len(class_labels):
            raise InputError(f"num_images={num_images} but {len(class_labels)} class_labels; give one or the other")
        return len(class_labels), cond.rows(class_labels)  # (N, L, D)

    def _guided(self, x: np.ndarray, t: int, cond: np.ndarray | None, scale: float,
                uncond: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
        """Classifier-free guidance: one call on [uncond; cond], eps = eps_u + s (eps_c - eps_u)."""
        b = x.shape[0]
        if cond is None or scale == 1.0:
            return self.denoiser(x, np.full(b, t, TIMESTEP_DTYPE), cond)
        uncond = self.artifact.conditioning.uncond if uncond is None else uncond
        uncond = np.broadcast_to(uncond, cond.shape)  # (B, L, D)
        x2 = np.concatenate([x, x])  # (2B, C, H, W)
        c2 = np.concatenate([uncond, cond])  # (2B, L, D)
        eps = self.denoiser(x2, np.full(2 * b, t, TIMESTEP_DTYPE), c2)  # (2B, C, H, W)
        eps_u, eps_c = eps[:b], eps[b:]
        return eps_u + np.float32(scale) * (eps_c - eps_u)

    def __call__(
        self,
        *,
        class_labels: Sequence[int | str] | None = None,
        num_images: int | None = None,
        seed: int | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
        latents: np.ndarray | None = None,
        batch_size: int | None = None,
        on_step: Callable[[int, int], None] | None = None,
        encoder_hidden_states: np.ndarray | None = None,
        uncond: np.ndarray | None = None,
    ) -> np.ndarray:
        """Sample images.

        Args:
            class_labels: names or row indices of the conditioning table (conditional models). None: one image per
                class (or ``num_images`` cycling over the classes).
            num_images: N. None: ``len(class_labels)``, one per class, or 1 for unconditional models.
            seed: image k draws its initial noise and its step noise from ``default_rng((seed, k))``, so an image
                does not depend on N or the batch size. None: 0.
            steps: sampler steps. None: the manifest's. Per-group and scale-input artifacts accept only the
                step count they were calibrated for.
            sampler: ddim | ddpm. None: the manifest's.
            eta: DDIM eta. None: the manifest's (0 if absent).
            guidance_scale: classifier-free guidance weight s (1 = off). None: the manifest's (1 if absent).
            latents: initial x_T (N, C, H, W) instead of seeded noise.
            batch_size: images per UNet call (the UNet sees twice as many under guidance). None: the target
                profile's ``max_batch`` from the manifest, else all N.
            on_step: called as on_step(i, t) before step i (of each batch when the images take several).
            encoder_hidden_states: conditioning rows (N, L, D) instead of class labels (text-to-image: the text
                encoder's output, see ``TextToImage``).
            uncond: the guidance row (1, L, D) to use with ``encoder_hidden_states``; None: the table's.

        Returns:
            x_0 (N, C, H, W) float32: images in [-1, 1], or latents when the sampler spec has ``clip_output``
            false (text-to-image pipelines; their VAE decoder makes the images).

        Raises:
            InputError: inconsistent options, an unknown label, or a step count the artifact cannot serve.
        """
        spec = self.artifact.sampler
        sampler = sampler or spec.get("sampler", "ddim")
        steps = self._resolve_steps(steps)
        eta = float(spec.get("eta", 0.0) if eta is None else eta)
        scale = float(spec.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale)
        if (num_images is not None and num_images < 1) or (batch_size is not None and batch_size < 1):
            raise InputError(f"num_images={num_images} and batch_size={batch_size} must be >= 1 (or None)")
        if seed is not None and seed < 0:
            raise InputError(f"seed={seed} must be >= 0")
        if class_labels is not None and len(class_labels) == 0:
            raise InputError("class_labels is empty; give at least one label, or None for one image per class")
        if encoder_hidden_states is not None:
            if class_labels is not None or self.artifact.conditioning is None:
                raise InputError("encoder_hidden_states replaces class_labels, on a conditional model; give one")
            cond = np.asarray(encoder_hidden_states, dtype=np.float32)
            if cond.ndim != 3 or cond.shape[1:] != self.artifact.conditioning.table.shape[1:]:
                raise InputError(f"encoder_hidden_states has shape {list(cond.shape)}, expected "
                                 f"[N, {', '.join(map(str, self.artifact.conditioning.table.shape[1:]))}]")  # fmt: skip
            n = len(cond) if num_images is None else num_images
            if n != len(cond):
                raise InputError(f"num_images={num_images} but {len(cond)} encoder_hidden_states rows")
        else:
            n, cond = self._conditions(class_labels, num_images)
        if cond is None and guidance_scale not in (None, 1.0):
            raise InputError(f"{self.artifact.root} is unconditional; guidance_scale={guidance_scale} needs a model "
                             "with a conditioning table")  # fmt: skip
        shape = self.artifact.sample_shape  # (C, H, W)
        rngs = [np.random.default_rng((0 if seed is None else seed, k)) for k in range(n)]
        if latents is None:
            latents = _noise(rngs, shape)  # (N, C, H, W)
        elif tuple(np.shape(latents)) != (n, *shape):
            raise InputError(f"latents have shape {list(np.shape(latents))}, expected {[n, *shape]}")
        target = self.artifact.manifest.get("target")
        max_batch = target.get("max_batch") if isinstance(target, dict) else None
        batch_size = int(batch_size or max_batch or n)
        sched = scheduler_from_config(self.artifact.scheduler_config, sampler)
        timesteps = sched.set_timesteps(steps)
        logger.info("sampling %d image(s): %s, %d steps, eta %g, guidance %g", n, sampler, steps, eta, scale)
        out = np.empty((n, *shape), dtype=np.float32)  # (N, C, H, W)
        with self._active():
            for start in range(0, n, batch_size):
                sl = slice(start, start + batch_size)
                x, c, rs = np.asarray(latents[sl], dtype=np.float32), None if cond is None else cond[sl], rngs[sl]
                for i, t in enumerate(timesteps.tolist()):
                    if on_step is not None:
                        on_step(i, t)
                    eps = self._guided(x, t, c, scale, uncond)
                    if sampler == "ddim":
                        x = sched.step(
                            eps, t, x, eta=eta, variance_noise=_noise(rs, shape) if eta > 0 else None
                        ).prev_sample
                    else:
                        x = sched.step(eps, t, x, noise=_noise(rs, shape) if t > 0 else None).prev_sample
                out[sl] = x
        return np.clip(out, -1.0, 1.0) if spec.get("clip_output") in (None, True) else out

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        """Activate for one call when the caller did not (and deactivate after it)."""
        owned = not self.denoiser.is_active
        self.activate()
        try:
            yield
        finally:
            if owned:
                self.deactivate()

    @staticmethod
    def save_grid(images: np.ndarray, path: str | os.PathLike, *, nrow: int | None = None) -> Path:
        """Write images (N, C, H, W) in [-1, 1] as one PNG grid; returns the path."""
        return _images.save_grid(images, path, nrow=nrow)
