"""Open an export folder, a bundle or a TensorRT engine folder for the runtime (docs/formats.md).

``open_artifact`` checks before it loads anything: the manifest schema, the SHA-256 of every file, that every
file it will load is listed, and for engine folders the TensorRT version and compute capability of this device
(deploy.md B-13, J-5). It then exposes what a sampler needs: the graphs per timestep group, the group rule, the
scale-ratio rows, the conditioning table, the sampler settings and the diffusers scheduler config.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from quest_export_runtime.device import DeviceInfo
from quest_export_runtime.errors import ArtifactError, InputError, ManifestMismatch
from quest_export_runtime.manifest import Manifest, text_files

logger = logging.getLogger(__name__)

STAGE_BACKENDS = {"export": "ort", "bundle": "ort", "build-ort": "ort", "build-trt": "trt"}
SCALE_MODES = ("merged", "per-group", "scale-input")
ENGINE_PLAN = re.compile(r"^unet(?:_g(\d+))?\.plan$")  # unet.plan or unet_gNN.plan
CONDITIONING_TENSOR = "encoder_hidden_states"


@dataclass(frozen=True)
class TimestepGroups:
    """The groups' calibration timesteps t_0 > t_1 > ... > t_{G-1} and the total rule mapping any t to a group."""

    timesteps: tuple[int, ...]

    def __post_init__(self) -> None:
        ts = self.timesteps
        if not ts or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ArtifactError(f"groups.timesteps {list(ts)} must be a non-empty, strictly decreasing list")

    @property
    def count(self) -> int:
        return len(self.timesteps)

    def groups_of(self, t: np.ndarray) -> np.ndarray:
        """g(t) = max{g : t_g >= t}, and 0 when t > t_0 (docs/formats.md). t: (B,) -> (B,) int64."""
        ts = np.asarray(self.timesteps, dtype=np.float64)  # (G,) decreasing, so {g : t_g >= t} is a prefix
        n = (ts[None, :] >= np.asarray(t, dtype=np.float64).reshape(-1, 1)).sum(axis=1)  # (B,) prefix length
        return np.maximum(n - 1, 0).astype(np.int64)

    def group_of(self, t: float) -> int:
        return int(self.groups_of(np.asarray([t]))[0])


@dataclass(frozen=True, eq=False)
class Conditioning:
    """The conditioning table: one encoder_hidden_states row per label, plus the unconditional row for guidance."""

    table: np.ndarray  # (R, L, D) float32
    uncond_index: int
    labels: tuple[str, ...]  # R names

    @property
    def uncond(self) -> np.ndarray:
        return self.table[self.uncond_index]  # (L, D)

    @property
    def class_indices(self) -> list[int]:
        """Every row except the unconditional one."""
        return [i for i in range(len(self.labels)) if i != self.uncond_index]

    def index(self, label: int | str) -> int:
        """The row of a label given by name or by row index.

        Raises:
            InputError: an unknown name or an index outside the table, listing the labels.
        """
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            if 0 <= int(label) < len(self.labels):
                return int(label)
        elif label in self.labels:
            return self.labels.index(label)
        raise InputError(f"class label {label!r} is not in the conditioning table; use a row index in "
                         f"[0, {len(self.labels)}) or one of {list(self.labels)}")  # fmt: skip

    def rows(self, labels: Sequence[int | str]) -> np.ndarray:
        """encoder_hidden_states for ``labels``: (N, L, D)."""
        return self.table[[self.index(label) for label in labels]]


@dataclass(frozen=True)
class GraphFile:
    path: Path
    group: int | None  # None: one graph for every timestep


@dataclass(frozen=True, eq=False)
class Artifact:
    """A verified artifact folder, ready for runners. Build it with ``open_artifact``."""

    root: Path
    manifest: dict
    backend: str  # ort | trt
    scale_mode: str  # merged | per-group | scale-input
    graphs: tuple[GraphFile, ...]
    groups: TimestepGroups | None
    scale_ratios: np.ndarray | None  # (G, K) float32, scale-input only
    conditioning: Conditioning | None
    weights_file: Path | None  # shared external data of per-group graphs

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def text_to_image(self) -> dict | None:
        """The float text encoder, VAE decoder and tokenizer of a text-to-image bundle (docs/formats.md), or None."""
        return self.manifest.get("text_to_image")

    @property
    def sampler(self) -> dict | None:
        """{"sampler", "steps", "eta", "guidance_scale"} the model was exported for, or None."""
        return self.manifest.get("sampler")

    @property
    def scheduler_config(self) -> dict | None:
        return self.manifest.get("scheduler_config")

    @property
    def io(self) -> dict:
        return self.manifest.get("io") or {}

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.io.get("inputs", [])]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the ``sample`` input."""
        (spec,) = [i for i in self.io.get("inputs", []) if i["name"] == "sample"]
        return tuple(int(d) for d in spec["shape"][1:])

    @property
    def target_id(self) -> str | None:
        target = self.manifest.get("target")
        return target.get("id") if isinstance(target, dict) else target

    def rebuild_command(self) -> str:
        source = self.root if self.stage == "bundle" else "<bundle>"
        return f"quest-export build --from {source} --target {self.target_id or '<target-id>'}"

    def graph_for(self, group: int | None) -> Path:
        """The graph file that serves timestep group ``group`` (the only graph unless per-group)."""
        if self.scale_mode != "per-group":
            return self.graphs[0].path
        return next(g.path for g in self.graphs if g.group == group)

    def extra_inputs(self, group: int | None) -> dict[str, np.ndarray]:
        """Inputs besides sample / timestep / conditioning: ``act_scale_ratios`` = row g in scale-input mode."""
        if self.scale_mode != "scale-input":
            return {}
        return {"act_scale_ratios": self.scale_ratios[group]}  # (K,)


def check_engine_device(artifact: Artifact, device: DeviceInfo | None = None) -> None:
    """Refuse an engine folder built for another TensorRT, GPU or platform (deploy.md B-13, J-5).

    The rules and reasons are the shared manifest check's (quest_export_runtime.manifest.Manifest.check_device).

    Raises:
        ManifestMismatch: a mismatch or a manifest without trt_version / compute_capability, naming the rebuild command.
    """
    Manifest(artifact.root, artifact.manifest).check_device(device, rebuild=artifact.rebuild_command())


def _require(manifest: dict, key: str, root: Path) -> Any:
    if manifest.get(key) is None:
        raise ArtifactError(f"{root}: manifest has no '{key}' (docs/formats.md); re-run the stage that wrote it")
    return manifest[key]


def _listed(root: Path, manifest: dict, rel: str) -> Path:
    """A file the runtime will load: it must be listed (hence hash-checked) in the manifest."""
    if rel not in manifest.get("files", {}):
        raise ManifestMismatch(f"{root}: '{rel}' is not listed in the manifest, so its hash cannot be checked; "
                               "re-run the stage that wrote the folder")  # fmt: skip
    return root / rel


def _graphs(root: Path, manifest: dict, backend: str) -> list[GraphFile]:
    entries = manifest.get("graphs")
    if entries is None and backend == "trt":  # engine folders: unet.plan or unet_gNN.plan
        entries = [{"file": f, "group": None if mt.group(1) is None else int(mt.group(1))}
                   for f in sorted(manifest.get("files", {})) if (mt := ENGINE_PLAN.match(f))]  # fmt: skip
    if not entries:
        raise ArtifactError(f"{root}: manifest lists no graphs (docs/formats.md 'graphs'); re-run the stage")
    return [GraphFile(_listed(root, manifest, e["file"]), e.get("group")) for e in entries]


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor and the ``__metadata__`` of a ``.safetensors`` file, read by the ``safetensors`` library.

    Returns:
        (tensors, metadata): ``{name: array}`` (writable numpy arrays) and the metadata dict (empty if absent).

    Raises:
        ArtifactError: a missing file, or one the library refuses (truncated, malformed header, data offsets that
            do not fit), or a dtype numpy cannot hold (BF16), naming the file and the tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such safetensors file; re-copy the artifact folder")
    name = None
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {}
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    except (SafetensorError, TypeError, ValueError) as e:
        where = f" at tensor '{name}'" if name is not None else ""
        raise ArtifactError(f"{path} is not a valid safetensors file{where} ({e}); re-copy it or re-run the stage "
                            "that wrote it") from None  # fmt: skip
    return tensors, metadata


def _conditioning(root: Path, manifest: dict) -> Conditioning | None:
    spec = manifest.get("conditioning")
    if not spec:
        return None
    path = _listed(root, manifest, spec["file"])
    tensors, meta = load_safetensors(path)
    if CONDITIONING_TENSOR not in tensors:
        raise ArtifactError(f"{path} has no '{CONDITIONING_TENSOR}' tensor (it has {sorted(tensors)})")
    table = tensors[CONDITIONING_TENSOR]
    if table.ndim != 3 or table.dtype != np.float32:
        raise ArtifactError(
            f"{path}: '{CONDITIONING_TENSOR}' is {table.dtype} {list(table.shape)}, not float32 [R, L, D]"
        )
    labels = tuple(str(x) for x in spec.get("labels") or json.loads(meta.get("labels", "[]")))
    uncond = int(spec.get("uncond_index", meta.get("uncond_index", -1)))
    labels_differ = "labels" in meta and list(labels) != json.loads(meta["labels"])
    uncond_differs = "uncond_index" in meta and uncond != int(meta["uncond_index"])
    if labels_differ or uncond_differs:
        raise ManifestMismatch(f"{path}: labels / uncond_index differ between the manifest and the file's metadata; "
                               "re-run the export")  # fmt: skip
    if len(labels) != table.shape[0] or not 0 <= uncond < table.shape[0]:
        raise ArtifactError(f"{path}: {table.shape[0]} rows, {len(labels)} labels, uncond_index {uncond}: inconsistent")
    return Conditioning(table, uncond, labels)


def _check_io(art: Artifact) -> None:
    if not art.io:
        if art.backend == "trt":
            return  # engine folders may omit io; the runner reads the engine's own tensors
        raise ArtifactError(f"{art.root}: manifest has no 'io' (docs/formats.md); re-run the export")
    names = set(art.input_names)
    want = {"sample", "timestep"}
    want |= {"encoder_hidden_states"} if art.conditioning is not None else set()
    want |= {"act_scale_ratios"} if art.scale_mode == "scale-input" else set()
    outputs = {o["name"] for o in art.io.get("outputs", [])}
    if names != want or "noise_pred" not in outputs:
        raise ArtifactError(f"{art.root}: graph inputs {sorted(names)} / outputs {sorted(outputs)} do not match the "
                            f"{art.scale_mode} contract (inputs {sorted(want)}, output noise_pred); re-run the export")  # fmt: skip


def open_artifact(path: str | os.PathLike, *, device: DeviceInfo | None = None) -> Artifact:
    """Open and verify an export folder, a bundle or a TensorRT engine folder.

    Args:
        path: the artifact folder (it holds manifest.json).
        device: the device an engine folder must match. None: the simulated test device ($QUEST_EXPORT_TEST_DEVICE)
            if set, else query this machine (imports tensorrt); ignored for ONNX folders.

    Returns:
        The verified Artifact.

    Raises:
        ArtifactError: not an artifact, a stage the runtime cannot run, or manifest keys missing or inconsistent.
        ManifestMismatch: unknown schema, an absolute or escaping path, a missing, tampered, escaping (symlink) or
            unlisted file, an unlisted engine file, or an engine built for another TensorRT / GPU / platform
            (naming the rebuild command): the shared check, quest_export_runtime.manifest.Manifest.check.
        TensorRTUnavailableError: an engine folder on a machine without TensorRT.
    """
    root = Path(path)
    checked = Manifest.read(root)  # schema check
    manifest, stage = checked.data, checked.stage
    if stage not in STAGE_BACKENDS:
        raise ArtifactError(f"{root} holds a '{stage}' artifact; the runtime runs {', '.join(STAGE_BACKENDS)} "
                            "folders: run `quest-export export` or `quest-export build` first")  # fmt: skip
    checked.check(device)  # paths, every hash, unlisted engines, an engine folder vs this device: before any load
    backend = STAGE_BACKENDS[stage]
    graphs = _graphs(root, manifest, backend)
    scale_mode = manifest.get("scale_mode") or ("per-group" if any(g.group is not None for g in graphs) else "merged")
    if scale_mode not in SCALE_MODES:
        raise ArtifactError(f"{root}: scale_mode {scale_mode!r} is not one of {', '.join(SCALE_MODES)}")
    groups = None
    if manifest.get("groups") or scale_mode != "merged":
        spec = _require(manifest, "groups", root)
        groups = TimestepGroups(tuple(int(t) for t in spec["timesteps"]))
        if int(spec.get("count", groups.count)) != groups.count:
            raise ArtifactError(f"{root}: groups.count {spec['count']} != {groups.count} timesteps")
    if scale_mode == "per-group":
        if (
            sorted(g.group for g in graphs if g.group is not None) != list(range(groups.count))
            or len(graphs) != groups.count
        ):
            raise ArtifactError(f"{root}: per-group mode needs one graph per group 0..{groups.count - 1}, the manifest "
                                f"lists groups {[g.group for g in graphs]}")  # fmt: skip
    elif len(graphs) != 1:
        raise ArtifactError(f"{root}: {scale_mode} mode needs exactly one graph, the manifest lists {len(graphs)}")
    ratios = None
    if scale_mode == "scale-input":
        ratios = np.asarray(_require(manifest, "scale_ratios", root), dtype=np.float32)  # (G, K)
        if ratios.ndim != 2 or ratios.shape[0] != groups.count or not np.isfinite(ratios).all():
            raise ArtifactError(
                f"{root}: scale_ratios must be finite [G={groups.count}][K], got shape {list(ratios.shape)}"
            )
    weights = manifest.get("weights_file")
    for rel in text_files(manifest.get("text_to_image")):  # tokenizer, text encoder, VAE decoder: hash-checked
        _listed(root, manifest, rel)
    art = Artifact(
        root=root,
        manifest=manifest,
        backend=backend,
        scale_mode=scale_mode,
        graphs=tuple(graphs),
        groups=groups,
        scale_ratios=ratios,
        conditioning=_conditioning(root, manifest),
        weights_file=_listed(root, manifest, weights) if weights else None,
    )
    _check_io(art)
    logger.info("opened %s artifact %s: %s, %d graph(s)", stage, root, scale_mode, len(graphs))
    return art
