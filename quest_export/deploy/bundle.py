"""On-device build bundle (deploy.md B-13, B-14; docs/formats.md "Bundle").

A Jetson engine is built on the Jetson, so an export for it becomes a bundle: the ONNX graph(s), the
reference data, ``build.sh`` (the rendered ``trtexec`` calls, no Python needed), ``build_engine.py`` (the
TensorRT Python API through the torch-free runtime), the runtime itself as a wheel
(``wheels/quest_export_runtime-<version>-py3-none-any.whl``, installed on the device with pip and no network),
a README and a manifest that hashes every file. Imports: the standard library, numpy,
``quest_export.errors``/``recipe``, ``quest_export.deploy.plan``/``trtexec`` and ``quest_export_runtime``; ``onnx`` and
``wheel`` lazily.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import shutil
from importlib import metadata
from pathlib import Path

from quest_export_runtime.device import JETPACK_L4T, L4T_CORE_PACKAGE, shell_functions
from quest_export_runtime.manifest import (
    BASE_KEYS,
    MANIFEST_NAME,
    atomic_dir,
    read_manifest,
    sha256_file,
    text_files,
    verify_files,
    write_manifest,
)
from quest_export_runtime.plan import BuildPlan, engine_files

from quest_export import __version__
from quest_export.deploy.plan import plan_build
from quest_export.deploy.trtexec import render_trtexec
from quest_export.errors import ArtifactError, TargetError
from quest_export.recipe.config import TargetProfile, VerifyConfig

ATOL_FLOOR = 1e-5  # polygraphy's default atol: the bound never goes below it
RUNTIME_DIST = "quest-export-runtime"
WHEELS = "wheels"  # bundle folder of the runtime wheel (pip --find-links)


def bundle_from_export(
    export_dir: str | os.PathLike,
    *,
    out: str | os.PathLike,
    target: TargetProfile,
    plan: BuildPlan | None = None,
) -> Path:
    """Write the on-device build bundle of an export folder, atomically.

    Args:
        export_dir: an export artifact (``stage: export``); every file hash is verified first.
        out: bundle folder to create (replaced if it exists).
        target: the TensorRT target profile the export was made for.
        plan: build plan; None = ``plan_build(target, io, int4=..., precision=...)`` from the export manifest.

    Returns:
        ``out``.

    Raises:
        TargetError: the export was made for another target, the target is not TensorRT, or the plan is
            for another target.
        ArtifactError / ManifestMismatch: the export is incomplete, tampered, or lacks its reference data.
    """
    export_dir, out = Path(export_dir), Path(out)
    manifest = read_manifest(export_dir, stage="export")
    verify_files(export_dir, manifest)
    exported_for = (manifest.get("target") or {}).get("id")
    if exported_for != target.id:
        raise TargetError(f"{export_dir} was exported for target '{exported_for}', not '{target.id}'; re-export with "
                          f"--target {target.id} or bundle it for '{exported_for}'")  # fmt: skip
    if not target.is_tensorrt:
        raise TargetError(f"target '{target.id}' runs ONNX Runtime: its export folder is already what the device "
                          "loads, a TensorRT bundle does not apply")  # fmt: skip
    if plan is None:
        int4 = any(layer.get("storage") in ("int4", "int4-block") for layer in manifest.get("layers") or [])
        plan = plan_build(target, manifest["io"], int4=int4, precision=manifest.get("precision"))
    if plan.target != target.id:
        raise TargetError(f"the build plan is for target '{plan.target}', the bundle for '{target.id}'; "
                          "plan again with this target's profile")  # fmt: skip
    refs = _reference(export_dir, manifest)
    with atomic_dir(out) as tmp:
        for rel in _payload(export_dir, manifest):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(export_dir / rel, tmp / rel)
        verify = _verify_commands(tmp, manifest, refs)
        data = {loc: manifest["files"][loc] for g in manifest["graphs"] for loc in _external_data(tmp / g["file"])
                if loc in manifest.get("files", {})}  # fmt: skip
        _write(tmp / "build.sh", render_build_sh(plan, manifest["graphs"], verify, external_data=data),
               executable=True)  # fmt: skip
        _write(tmp / "build_engine.py", BUILD_ENGINE_PY, executable=True)
        runtime_wheel(tmp / WHEELS)
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        _write(tmp / "README.md", render_readme(plan, manifest, verify, size_bytes=size))
        extra = {k: v for k, v in manifest.items() if k not in BASE_KEYS}
        extra["build"] = plan.to_dict()
        extra["size_bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())  # manifest excluded
        write_manifest(tmp, stage="bundle", recipe_fingerprint=manifest.get("recipe_fingerprint"),
                       config=manifest.get("config"), inputs={"export": sha256_file(export_dir / MANIFEST_NAME)},
                       extra=extra)  # fmt: skip
    return out


# -- what is copied ----------------------------------------------------------------------------


def _payload(export_dir: Path, manifest: dict) -> list[str]:
    """Relative paths to copy: graphs, their external data, conditioning, text parts, reference/ (all hashed)."""
    hashed = set(manifest.get("files", {}))
    wanted = []
    for graph in manifest.get("graphs") or []:
        wanted.append(graph["file"])
        parent = Path(graph["file"]).parent
        wanted += sorted((parent / loc).as_posix() for loc in _external_data(export_dir / graph["file"]))
    if manifest.get("weights_file"):
        wanted.append(manifest["weights_file"])
    if manifest.get("conditioning"):
        wanted.append(manifest["conditioning"]["file"])
    wanted += text_files(manifest.get("text_to_image"))  # float text encoder, VAE decoder, tokenizer
    wanted += sorted(rel for rel in hashed if rel.startswith("reference/"))
    if not manifest.get("graphs"):
        raise ArtifactError(f"{export_dir}: manifest lists no graphs; re-run the export")
    unlisted = [rel for rel in dict.fromkeys(wanted) if rel not in hashed]
    if unlisted:
        raise ArtifactError(f"{export_dir}: {unlisted[0]} is needed but not hashed in the export manifest; "
                            "re-run the export")  # fmt: skip
    return list(dict.fromkeys(wanted))


def _external_data(onnx_path: Path) -> set[str]:
    """Locations of the external-data files an ONNX model refers to (read without loading the data)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    tensors = list(model.graph.initializer)
    tensors += [a.t for node in model.graph.node for a in node.attribute if a.HasField("t")]
    return {
        e.value
        for t in tensors
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }


def runtime_wheel_name(version: str = __version__) -> str:
    """'quest_export_runtime-0.1.0-py3-none-any.whl': the runtime is pure Python."""
    return f"{RUNTIME_DIST.replace('-', '_')}-{version}-py3-none-any.whl"


def runtime_wheel(out_dir: str | os.PathLike) -> Path:
    """Write the installed torch-free runtime as ``quest_export_runtime-<version>-py3-none-any.whl`` into ``out_dir``.

    The wheel is assembled from what is installed, not built from source: the package's ``*.py`` files where
    ``quest_export_runtime`` imports from, and the core metadata (METADATA: name, version, Requires-Dist) of the
    installed ``quest-export-runtime`` distribution. That works the same for an editable install in the source
    tree and for quest-export installed from wheels (no runtime/python/ on disk), needs no build backend, no
    subprocess and no network. ``wheel.wheelfile.WheelFile`` (the wheel project's writer) writes the archive
    and its RECORD of hashes; ``pip wheel runtime/python`` would need the source tree and a build backend.

    Returns:
        The wheel's path.

    Raises:
        ArtifactError: quest-export-runtime is not installed, or the imported package is not that distribution's
            version (a stale copy on sys.path).
    """
    import quest_export_runtime
    from wheel.wheelfile import WheelFile

    try:
        dist = metadata.distribution(RUNTIME_DIST)
    except metadata.PackageNotFoundError:
        raise ArtifactError(f"{RUNTIME_DIST} is not installed, so no runtime wheel can go into the bundle; install "
                            f"it (`pip install {RUNTIME_DIST}=={__version__}`, or `make setup` in the source tree)") from None  # fmt: skip
    version, src = dist.version, Path(quest_export_runtime.__file__).resolve().parent
    if not version == quest_export_runtime.__version__ == __version__:
        raise ArtifactError(f"quest_export_runtime imported from {src} is {quest_export_runtime.__version__}, the "
                            f"installed {RUNTIME_DIST} is {version}, quest-export is {__version__}; install "
                            f"{RUNTIME_DIST}=={__version__}")  # fmt: skip
    info = f"{RUNTIME_DIST.replace('-', '_')}-{version}.dist-info"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / runtime_wheel_name(version)
    with WheelFile(path, "w") as whl:
        for f in sorted(src.rglob("*.py")):
            if "__pycache__" not in f.parts:
                whl.writestr(f"quest_export_runtime/{f.relative_to(src).as_posix()}", f.read_bytes())
        # an egg-info folder on sys.path (an editable install's, found first when runtime/python is on PYTHONPATH)
        # keeps the same core metadata as PKG-INFO
        whl.writestr(f"{info}/METADATA", dist.read_text("METADATA") or dist.read_text("PKG-INFO"))
        whl.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nGenerator: quest-export {__version__} (wheel.wheelfile)\n"
                                      "Root-Is-Purelib: true\nTag: py3-none-any\n")  # fmt: skip
        whl.writestr(f"{info}/top_level.txt", "quest_export_runtime\n")
    return path


def _write(path: Path, text: str, *, executable: bool = False) -> None:
    path.write_text(text)
    if executable:
        path.chmod(0o755)


# -- reference data and the polygraphy check (P-1, P-2) ------------------------------------------


def _reference(export_dir: Path, manifest: dict) -> dict:
    ref = manifest.get("reference") or {}
    missing = [k for k in ("inputs", "ref_fq", "ref_float") if not ref.get(k) or not (export_dir / ref[k]).is_file()]
    if missing:
        raise ArtifactError(f"{export_dir}: reference data {', '.join(missing)} missing (docs/formats.md, "
                            "reference/); re-run the export so the device can verify its engine")  # fmt: skip
    return ref


def load_run_results(path: str | os.PathLike) -> dict[str, list[dict]]:
    """Polygraphy ``RunResults`` JSON -> {runner: [{output: np.ndarray} per iteration]}, without polygraphy."""
    import numpy as np

    def arr(obj):
        if isinstance(obj, dict) and obj.get("polygraphy_class") == "LazyArray":
            obj = obj["values"]
        return np.load(io.BytesIO(base64.b64decode(obj["array"])), allow_pickle=False)

    data = json.loads(Path(path).read_text())
    return {runner: [{k: arr(v) for k, v in it["outputs"].items()} for it in its] for runner, its in data["lst"]}


def reference_atol(ref_fq: str | os.PathLike, ref_float: str | os.PathLike, feeds: list[int] | None = None) -> float:
    """atol for ``--check-error-stat mean`` from H-3: mean|engine - FQ| <= factor * mean|FQ - float|, per feed.

    Returns the largest per-feed bound (over ``feeds``, default all), so every recorded step is allowed the
    quantization noise the fake-quant model itself has against the float model.
    """
    import numpy as np

    fq = next(iter(load_run_results(ref_fq).values()))
    fl = next(iter(load_run_results(ref_float).values()))
    idx = range(len(fq)) if feeds is None else feeds
    factor = VerifyConfig().mean_err_factor
    bound = max((float(np.mean(np.abs(fq[i][k] - fl[i][k]))) for i in idx for k in fq[i]), default=0.0)
    return max(float(f"{factor * bound:.3g}"), ATOL_FLOOR)


def _verify_commands(tmp: Path, manifest: dict, ref: dict) -> list[str]:
    """One polygraphy command per engine; per-group engines get their own group's feeds (split here)."""

    def cmd(engine: str, inputs: str, outputs: str, atol: float) -> str:
        return shlex.join(["polygraphy", "run", f"engine/{engine}", "--model-type", "engine", "--trt",
                           "--load-inputs", inputs, "--load-outputs", outputs, "--atol", f"{atol:g}",
                           "--rtol", "0", "--check-error-stat", "mean"])  # fmt: skip

    graphs = manifest["graphs"]
    if all(g.get("group") is None for g in graphs):
        atol = reference_atol(tmp / ref["ref_fq"], tmp / ref["ref_float"])
        return [cmd(engine_files(None).engine, ref["inputs"], ref["ref_fq"], atol)]
    feeds_file = tmp / "reference" / "feeds.json"
    if not feeds_file.is_file():
        raise ArtifactError("per-group export without reference/feeds.json; re-run the export")
    groups = json.loads(feeds_file.read_text())["groups"]
    inputs = json.loads((tmp / ref["inputs"]).read_text())
    fq = json.loads((tmp / ref["ref_fq"]).read_text())
    out = []
    for g in (int(g["group"]) for g in graphs):
        idx = [i for i, gi in enumerate(groups) if gi == g]
        sub_in, sub_fq = f"reference/inputs_g{g:02d}.json", f"reference/ref_fq_g{g:02d}.json"
        (tmp / sub_in).write_text(json.dumps([inputs[i] for i in idx], indent=4))
        lst = [[runner, [its[i] for i in idx]] for runner, its in fq["lst"]]
        (tmp / sub_fq).write_text(json.dumps({**fq, "lst": lst}, indent=4))
        atol = reference_atol(tmp / ref["ref_fq"], tmp / ref["ref_float"], idx)
        out.append(cmd(engine_files(g).engine, sub_in, sub_fq, atol))
    return out


# -- build.sh ------------------------------------------------------------------------------------


def render_build_sh(plan: BuildPlan, graphs: list[dict], verify: list[str],
                    external_data: dict[str, str] | None = None) -> str:  # fmt: skip
    """The bundle's bash build script: platform check (J-5), one trtexec call per graph, verify hint.

    external_data: {file: sha256} of the graphs' external-data files (model.onnx.data, weights.bin); build.sh
    refuses to run trtexec when one is missing or differs (sha256sum, where installed), since TensorRT's parser
    reads them from beside the graph and its own error names neither the file nor the fix.
    """
    q = shlex.quote
    checks = []
    for name, digest in sorted((external_data or {}).items()):
        checks.append(f'[ -f {q(name)} ] || die "{name} is missing: the graph keeps its weights in it; copy the '
                      'whole bundle folder"')  # fmt: skip
        checks.append(f"if command -v sha256sum >/dev/null 2>&1; then\n"
                      f'  [ "$(sha256sum {q(name)} | cut -d" " -f1)" = {q(digest)} ] || die "{name} differs from '
                      'the bundle manifest (a partial copy?); copy the bundle again"\nfi')  # fmt: skip
    builds = []
    for graph in graphs:
        files = engine_files(graph.get("group"))
        args = render_trtexec(plan, graph["file"], f"engine/{files.engine}", timing_cache=plan.timing_cache)
        builds.append(f'echo "build.sh: {files.engine} from {graph["file"]}"\n"$TRTEXEC" {shlex.join(args[1:])}')
    key = json.dumps(
        {"trt_version": plan.trt_version, "compute_capability": plan.compute_capability, "jetpack": plan.jetpack,
         "cuda": plan.cuda}, sort_keys=True)  # fmt: skip
    subs = {
        "@@VERSION@@": __version__,
        "@@TARGET@@": q(plan.target),
        "@@TRT@@": q(plan.trt_version),
        "@@EXPERIMENTAL@@": q(" ".join(plan.experimental)),
        "@@CACHE@@": q(plan.timing_cache),
        "@@CACHE_KEY@@": q(key),
        "@@DEVICE_RULES@@": shell_functions(),
        "@@PLATFORM_CHECK@@": _platform_check(plan),
        "@@HINT@@": _targets_hint().replace('"', "'"),
        "@@BUILDS@@": "\n".join(builds),
        "@@EXTERNAL_DATA@@": "\n".join(checks) or "# (no external data: every graph holds its own weights)",
        "@@VERIFY@@": "\n".join(f"  {c}" for c in verify),
    }
    text = BUILD_SH
    for k, v in subs.items():
        text = text.replace(k, v)
    return text


def _platform_check(plan: BuildPlan) -> str:
    if not plan.jetpack:
        ccs = " ".join(plan.compute_capabilities)
        return (f'[ -z "$L4T" ] || die "this is a Jetson (L4T $L4T) but target $TARGET is a discrete GPU; $HINT"\n'
                'if command -v nvidia-smi >/dev/null 2>&1; then\n'
                '  CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 || true)\n'
                f'  case "$CC" in "" | {" | ".join(plan.compute_capabilities)}) ;;\n'
                f'    *) die "this GPU is SM $CC, target $TARGET is for SM {ccs}; $HINT" ;;\n  esac\n'
                'fi')  # fmt: skip
    releases = " or ".join(JETPACK_L4T.get(plan.jetpack, ())) or "any"
    jp = shlex.quote(plan.jetpack)
    return (f'[ -n "$L4T" ] || die "target $TARGET is a Jetson on JetPack {plan.jetpack} but this machine has no '
            f'L4T release (/etc/nv_tegra_release, {L4T_CORE_PACKAGE}); $HINT"\n'
            f'jetpack_matches_l4t {jp} "$L4T" || die "this Jetson runs L4T $L4T, target $TARGET needs JetPack '
            f'{plan.jetpack} (L4T {releases}); $HINT"')  # fmt: skip


def _targets_hint() -> str:
    """'re-create the bundle for this device: quest-export build --target T (jetson-orin-jp51 = TensorRT 8.5.2, ...)'."""
    from quest_export.recipe.targets import list_targets, load_target

    pairs = []
    for tid in list_targets():
        t = load_target(tid)
        if t.is_tensorrt:
            pairs.append(f"{tid} = TensorRT {t.trt_version}")
    return "re-create the bundle for this device: quest-export build --target T" + (
        f" ({', '.join(pairs)})" if pairs else ""
    )


BUILD_SH = r"""#!/usr/bin/env bash
# Builds the TensorRT engine(s) of this quest-export bundle on the device (deploy.md B-14, J-4, J-5).
# Usage: ./build.sh [--allow-experimental]       Engines, layer info and profiles go to ./engine/.
# Written by quest-export @@VERSION@@; do not edit it: re-create the bundle instead.
set -euo pipefail
cd "$(dirname "$0")"

TARGET=@@TARGET@@
EXPECTED_TRT=@@TRT@@
EXPERIMENTAL=@@EXPERIMENTAL@@
CACHE=@@CACHE@@
CACHE_KEY=@@CACHE_KEY@@
HINT="@@HINT@@"

die() { echo "build.sh: $*" >&2; exit 2; }

ALLOW_EXPERIMENTAL=0
for arg in "$@"; do
  case "$arg" in
    --allow-experimental) ALLOW_EXPERIMENTAL=1 ;;
    -h | --help) sed -n '2,3p' "$0"; exit 0 ;;
    *) die "unknown argument '$arg'; usage: ./build.sh [--allow-experimental]" ;;
  esac
done
if [ -n "$EXPERIMENTAL" ] && [ "$ALLOW_EXPERIMENTAL" != 1 ]; then
  die "this bundle uses cells not yet verified on TensorRT $EXPECTED_TRT ($EXPERIMENTAL, deploy.md section 11); re-run with --allow-experimental to build it anyway"
fi

# trtexec ships with JetPack in /usr/src/tensorrt/bin; elsewhere take the one on PATH.
if [ -x /usr/src/tensorrt/bin/trtexec ]; then
  TRTEXEC=/usr/src/tensorrt/bin/trtexec
elif command -v trtexec >/dev/null 2>&1; then
  TRTEXEC=$(command -v trtexec)
else
  die "trtexec not found in /usr/src/tensorrt/bin or on PATH; install TensorRT $EXPECTED_TRT (JetPack: sudo apt install nvidia-jetpack)"
fi

@@DEVICE_RULES@@

# The platform must be the bundle's target: L4T release (Jetson) and the installed libnvinfer version.
L4T=$(l4t_release)
@@PLATFORM_CHECK@@

TRT_FOUND=""
if command -v dpkg-query >/dev/null 2>&1; then
  TRT_FOUND=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Version}\n' 'libnvinfer[0-9]*' 2>/dev/null \
    | awk '$1 == "ii" && $2 ~ /^libnvinfer[0-9]+$/ { print $3; exit }' || true)
fi
if [ -z "$TRT_FOUND" ]; then
  LIB=$(ldconfig -p 2>/dev/null | awk '/libnvinfer\.so\.[0-9]+ / { print $NF; exit }' || true)
  if [ -n "$LIB" ]; then
    TRT_FOUND=$(basename "$(readlink -f "$LIB")" | sed 's/^libnvinfer\.so\.//')
  fi
fi
[ -n "$TRT_FOUND" ] || die "cannot find libnvinfer (dpkg-query, ldconfig); install TensorRT $EXPECTED_TRT"
trt_matches_target "$TRT_FOUND" "$EXPECTED_TRT" \
  || die "this device has TensorRT $TRT_FOUND, the bundle is for TensorRT $EXPECTED_TRT (target $TARGET); $HINT"

# The timing cache is keyed (TensorRT, compute capability, JetPack or CUDA): never load another key's (B-10).
if [ -e "$CACHE" ] && [ "$(cat "$CACHE.json" 2>/dev/null || true)" != "$CACHE_KEY" ]; then
  die "timing cache $CACHE has another or no key ($CACHE.json); delete both files to start a new cache"
fi

# External data: TensorRT's ONNX parser reads it from beside the graph (issue 15).
@@EXTERNAL_DATA@@

mkdir -p engine
echo "build.sh: TensorRT $TRT_FOUND ($TRTEXEC), target $TARGET"
@@BUILDS@@
printf '%s\n' "$CACHE_KEY" > "$CACHE.json"

cat <<'EOF'

Engine(s), layer info and profiles are in engine/. Compare with the PyTorch fake-quant reference (deploy.md P-1):
@@VERIFY@@
The Python route (python3 build_engine.py) also writes engine/manifest.json and the INT8 layer audit,
which the quest-export runtime needs before it loads an engine.
EOF
"""

BUILD_ENGINE_PY = '''#!/usr/bin/env python3
"""Build this bundle's TensorRT engine(s) with the TensorRT Python API (no torch needed).

Usage: python3 build_engine.py [--out DIR] [--allow-experimental] [--timing-cache FILE] [--quiet]
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    try:
        from quest_export_runtime.build_cli import main
    except ImportError as e:
        print(f"error: the quest-export runtime is not installed ({e}); install it from this bundle: "
              "pip install --no-index --find-links wheels quest-export-runtime", file=sys.stderr)
        sys.exit(2)
    sys.exit(main([str(HERE), *sys.argv[1:]]))
'''


# -- README.md -----------------------------------------------------------------------------------


def _size_line(size_bytes: int | None, manifest: dict) -> str:
    if size_bytes is None:
        return ""
    data = manifest.get("external_data") or manifest.get("weights_file")
    where = f", of which the weights in `{data}`" if data else ""
    return f"\n\nSize: {size_bytes / 2**20:.1f} MiB ({size_bytes} bytes){where}; copy the whole folder."


def render_readme(plan: BuildPlan, manifest: dict, verify: list[str], size_bytes: int | None = None) -> str:
    """Device-side instructions: contents, build and verify commands, runtime, versions, known limits.

    size_bytes: the bundle's files before this README and the manifest (stated in the README)."""
    prec = manifest.get("precision") or {}
    jetson = f"JetPack {plan.jetpack}, " if plan.jetpack else ""
    graphs = ", ".join(g["file"] for g in manifest["graphs"])
    wheel = runtime_wheel_name()
    limits = []
    if prec.get("w_bits", 8) < 8:
        limits.append(f"- {prec.get('note') or 'W4 stored as INT8; speed = W8A8'} (TensorRT has no INT4 convolution, "
                      "deploy.md E-8).")  # fmt: skip
    if prec.get("a_bits", 8) < 8:
        limits.append(f"- A{prec['a_bits']} activations run in an INT8 container (Clip before an INT8 Q with the "
                      "low-bit scale): exact low-bit numerics at W8A8 speed; Clip fusion unverified (E-9b, Q10).")  # fmt: skip
    if plan.experimental:
        limits.append(f"- Experimental cells ({', '.join(plan.experimental)}): not yet verified on TensorRT "
                      f"{plan.trt_version}; building needs --allow-experimental (deploy.md section 11).")  # fmt: skip
    limits.append(
        "- The engine is tied to this TensorRT version, GPU (SM) and platform: build it on the device (B-13)."
    )
    verify_block = "\n".join(f"    {c}" for c in verify)
    t2i = manifest.get("text_to_image")
    text_rows = (
        "\n| `text/`, `vae/` | float32 ONNX graphs of the CLIP text encoder and the VAE decoder, and `text/tokenizer.json` "
        "(they run in ONNX Runtime; the UNet is the engine) |"
        if t2i
        else ""
    )
    text_run = (
        "\n\nPrompts to images (needs `quest-export-runtime[text,ort]`: the `tokenizers` package reads "
        '`text/tokenizer.json`):\n\n    python3 -m quest_export_runtime.sample engine --prompt "a red bicycle" '
        "--out bicycle.png"
        if t2i
        else ""
    )
    return f"""# quest-export bundle: {plan.target}

Recipe `{manifest.get("recipe_fingerprint")}`, precision {prec.get("mode", "?")}, scale mode
{manifest.get("scale_mode", "?")}. Expected on the device: {jetson}TensorRT {plan.trt_version},
compute capability {" or ".join(plan.compute_capabilities)}; typing {plan.typing}
(trtexec flags: `{" ".join(plan.flags) or "none"}`).{_size_line(size_bytes, manifest)}

## Inside

| path | what |
|---|---|
| `{graphs}` | the QDQ ONNX graph(s), with their external data files beside them |
| `reference/` | recorded UNet inputs and the PyTorch fake-quant / float outputs (Polygraphy JSON) |
| `build.sh` | builds with `trtexec` (no Python needed), after checking L4T and the TensorRT version |
| `build_engine.py` | builds with the TensorRT Python API; also writes `engine/manifest.json` and the INT8 audit |
| `wheels/{wheel}` | the torch-free quest-export runtime (numpy, safetensors; TensorRT or ONNX Runtime) |
| `manifest.json` | SHA-256 of every file, the export's keys and the build plan (`build`) |{text_rows}

## Install the runtime

The Python runtime (and `build_engine.py`) needs the bundled wheel, installed without network into the
device's Python 3.10+:

    pip install --no-index --find-links wheels quest-export-runtime

Its dependencies numpy and safetensors must already be installed (JetPack: `sudo apt install python3-numpy`,
then `pip install safetensors` once) or be given as wheels for the device's Python and architecture with a
second `--find-links DIR` (made on a machine with network: `pip download numpy safetensors -d DIR
--only-binary=:all: --platform manylinux2014_aarch64 --python-version 3.10`). `pip install ... 'quest-export-runtime[ort]'`
adds ONNX Runtime. TensorRT comes with JetPack (`python3-libnvinfer`) or an NGC container, never from pip.

## Build

    ./build.sh                    # or, with the runtime installed: python3 build_engine.py
{"    ./build.sh --allow-experimental" if plan.experimental else ""}
Engines go to `engine/` (`unet.plan`, per group `unet_gNN.plan`), with `layers*.json` (layer info) and
`profile*.json`. The timing cache `{plan.timing_cache}` is kept next to this file and reused by later builds
on the same device class.

## Verify

{verify_block}

The tolerance is the H-3 bound: mean |engine - fake-quant| may reach {VerifyConfig().mean_err_factor} times
the fake-quant model's own mean error against the float model. With the runtime installed (no torch needed),
the device-side verify runs H-3 on every recorded step and H-4 (the runtime's sampler from the recorded noise and
labels against the fake-quant images recorded at export) with the manifest's thresholds on this folder's graph
(ONNX Runtime: `quest-export-runtime[ort]`); exit 3 names the tier and its worst step:

    python3 -m quest_export_runtime.verify . --json verify-device.json

## Run

`import quest_export_runtime` (installed above) with TensorRT, or ONNX Runtime on the graph itself; it checks
`engine/manifest.json` (TensorRT version, compute capability, file hashes) before it loads an engine:

    python3 -c "from quest_export_runtime import RuntimePipeline as P; p = P.from_artifact('engine'); p.save_grid(p(seed=0), 'samples.png')"{text_run}

## Known limits

{chr(10).join(limits)}
"""
