"""The TensorRT build plan a bundle carries, and the file names of an engine folder (docs/formats.md).

A ``BuildPlan`` (made off the device by ``quest_export.deploy.plan.plan_build``) holds every decision of deploy.md
section 6; a bundle's manifest carries it as its ``build`` key and the device builds from it. Standard library only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

from quest_export_runtime.device import version_tuple
from quest_export_runtime.errors import ArtifactError


@dataclass(frozen=True)
class BuildPlan:
    """Every decision of one TensorRT build; its JSON form is a bundle manifest's ``build`` key."""

    target: str  # target profile id
    trt_version: str  # TensorRT version of the target (the builder must match it)
    typing: str  # weak (--fp16 --int8, BuilderFlags) | strong (STRONGLY_TYPED; always on 11.x)
    flags: tuple[str, ...]  # trtexec precision/typing flags for this version
    profiles: dict[str, dict[str, list[int]]]  # {input: {"min", "opt", "max"}} for every dynamic input
    workspace_mib: int
    builder_opt_level: int | None  # None on TensorRT 8.5, which has no optimization level
    max_aux_streams: int | None  # None = TensorRT's default (and on 8.5, which has none)
    timing_cache: str  # file name; encodes the key (TRT version, compute capability, JetPack or CUDA)
    compute_capability: str  # the device the timing-cache name is keyed on (the profile's first)
    compute_capabilities: tuple[str, ...]  # every device the target accepts
    jetpack: str | None
    cuda: str | None
    int4: bool = False  # INT4 weight-only GEMM (--int4 in weak mode)
    experimental: tuple[str, ...] = ()  # cells of deploy.md section 11 this build uses

    @property
    def version(self) -> tuple[int, ...]:
        return version_tuple(self.trt_version)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> BuildPlan:
        """Rebuild a plan from a manifest's ``build`` key; raise ArtifactError naming a bad key."""
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ArtifactError(f"build plan has unknown keys {unknown}; the bundle was written by a newer "
                                "quest-export: re-create it with this version")  # fmt: skip
        try:
            tuples = {k: tuple(v) for k, v in data.items() if k in ("flags", "compute_capabilities", "experimental")}
            return cls(**{**data, **tuples})
        except TypeError as e:
            raise ArtifactError(f"build plan is incomplete ({e}); re-create the bundle") from None


class EngineFiles(NamedTuple):
    engine: str  # unet.plan | unet_gNN.plan
    layers: str  # layers.json | layers_gNN.json  (--exportLayerInfo)
    profile: str  # profile.json | profile_gNN.json  (--exportProfile)


def engine_files(group: int | None) -> EngineFiles:
    """File names of one engine in an engine folder (docs/formats.md); group None = merged graph."""
    sfx = "" if group is None else f"_g{int(group):02d}"
    return EngineFiles(f"unet{sfx}.plan", f"layers{sfx}.json", f"profile{sfx}.json")
