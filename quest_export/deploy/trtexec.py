"""``trtexec`` command lines of a build plan (deploy.md B-9..B-12, J-4): what a bundle's build.sh runs.

Imports: the standard library and ``quest_export_runtime.plan``.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from quest_export_runtime.plan import BuildPlan


def render_trtexec(
    plan: BuildPlan,
    onnx_file: str | os.PathLike,
    engine_file: str | os.PathLike,
    *,
    timing_cache: str | os.PathLike | None = None,
    trtexec: str = "trtexec",
) -> list[str]:
    """The ``trtexec`` argument list that builds ``plan`` (B-9..B-12, J-4).

    Args:
        plan: from ``plan_build``.
        onnx_file: graph to build.
        engine_file: plan file to write; the layer info and profile JSONs go beside it (``engine_files``).
        timing_cache: cache file; None = ``plan.timing_cache`` in the working directory.
        trtexec: the executable (first element).

    Returns:
        Arguments, executable first; ``render_trtexec_shell`` gives the quoted command line.
    """
    v = plan.version
    engine = Path(engine_file)
    sfx = engine.stem[len("unet") :] if engine.stem.startswith("unet") else f"_{engine.stem}"
    args = [trtexec, f"--onnx={Path(onnx_file).as_posix()}", f"--saveEngine={engine.as_posix()}"]
    for flag, key in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
        if plan.profiles:
            spec = ",".join(f"{n}:{'x'.join(map(str, s[key]))}" for n, s in plan.profiles.items())
            args.append(f"{flag}={spec}")
    args += plan.flags
    # --workspace is deprecated (B-11). The M suffix parses from 10.1 on; 8.x and 10.0 read a plain MiB count
    # (10.0 would multiply "NM" by 2^20 twice).
    args.append(f"--memPoolSize=workspace:{plan.workspace_mib}{'M' if v >= (10, 1) else ''}")
    if plan.builder_opt_level is not None:
        args.append(f"--builderOptimizationLevel={plan.builder_opt_level}")
    if plan.max_aux_streams is not None:
        args.append(f"--maxAuxStreams={plan.max_aux_streams}")
    cache = Path(plan.timing_cache if timing_cache is None else timing_cache)
    args.append(f"--timingCacheFile={cache.as_posix()}")
    args += ["--profilingVerbosity=detailed",
             f"--exportLayerInfo={(engine.parent / f'layers{sfx}.json').as_posix()}",
             f"--exportProfile={(engine.parent / f'profile{sfx}.json').as_posix()}"]  # fmt: skip
    if v < (11,):
        args.append("--separateProfileRun")  # always on (and deprecated) in 11.x
    return args


def render_trtexec_shell(plan: BuildPlan, onnx_file, engine_file, **kwargs: Any) -> str:
    """``render_trtexec`` as one shell-quoted command line."""
    return shlex.join(render_trtexec(plan, onnx_file, engine_file, **kwargs))
