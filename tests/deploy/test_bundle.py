"""On-device bundles (deploy.md B-14, J-4, J-5; docs/formats.md "Bundle"), checked without TensorRT."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from polygraphy.comparator import RunResults
from polygraphy.json import load_json, save_json
from quest_export_runtime.manifest import BASE_KEYS as MANIFEST_BASE_KEYS
from quest_export_runtime.manifest import read_manifest, sha256_file, verify_files, write_manifest
from quest_export_runtime.plan import BuildPlan

from quest_export import __version__
from quest_export.deploy.bundle import bundle_from_export, reference_atol
from quest_export.deploy.plan import plan_build
from quest_export.deploy.trtexec import render_trtexec
from quest_export.errors import ArtifactError, ManifestMismatch, TargetError
from quest_export.recipe.config import to_jsonable
from quest_export.recipe.targets import load_target

ROOT = Path(__file__).resolve().parents[2]
BASE_KEYS = set(MANIFEST_BASE_KEYS)
FINGERPRINT = "5e" * 32
C, H, W, L, D = 4, 8, 8, 3, 16  # latent channels, spatial size, conditioning tokens and width
HAS_TRT = shutil.which("trtexec") or Path("/usr/src/tensorrt/bin/trtexec").exists()
ON_JETSON = Path("/etc/nv_tegra_release").exists()
needs_plain_host = pytest.mark.skipif(bool(HAS_TRT or ON_JETSON), reason="build.sh would find the real trtexec/L4T")


# -- a tiny fake export folder (docs/formats.md) ---------------------------------------------------------


def tiny_unet(seed: int = 0) -> onnx.ModelProto:
    """noise_pred = Conv1x1(sample) + 1e-3 * timestep + mean(encoder_hidden_states): the contract's I/O."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((C, C, 1, 1)).astype(np.float32), "unet.conv.weight")
    k = numpy_helper.from_array(np.array(1e-3, np.float32), "t_scale")
    shape = numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "t_shape")
    axes = numpy_helper.from_array(np.array([3], np.int64), "axes3")
    nodes = [  # shape operands are Constant nodes: they stay inline with external data, where ORT needs them
        helper.make_node("Constant", [], ["t_shape"], value=shape, name="/t/shape"),
        helper.make_node("Constant", [], ["axes3"], value=axes, name="/c/axes"),
        helper.make_node("Conv", ["sample", "unet.conv.weight"], ["conv"], name="/conv/Conv"),
        helper.make_node("Reshape", ["timestep", "t_shape"], ["t4"], name="/t/Reshape"),
        helper.make_node("Mul", ["t4", "t_scale"], ["temb"], name="/t/Mul"),
        helper.make_node("ReduceMean", ["encoder_hidden_states"], ["cm"], axes=[1, 2], keepdims=1, name="/c/Mean"),
        helper.make_node("Unsqueeze", ["cm", "axes3"], ["c4"], name="/c/Unsqueeze"),
        helper.make_node("Add", ["conv", "temb"], ["a"], name="/add0"),
        helper.make_node("Add", ["a", "c4"], ["noise_pred"], name="/add1"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_unet",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", C, H, W]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["batch", L, D])],
        [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, ["batch", C, H, W])],
        initializer=[w, k],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # E-13: always explicit
    onnx.checker.check_model(model)
    return model


IO = {
    "inputs": [{"name": "sample", "dtype": "float32", "shape": ["batch", C, H, W]},
               {"name": "timestep", "dtype": "float32", "shape": ["batch"]},
               {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["batch", L, D]}],
    "outputs": [{"name": "noise_pred", "dtype": "float32", "shape": ["batch", C, H, W]}],
}  # fmt: skip


def make_export(root: Path, target_id: str, *, groups: int | None = None, w_bits: int = 8, a_bits: int = 8) -> Path:
    """An export folder as the exporter writes it: graph(s) + external data, conditioning, reference/, manifest."""
    from safetensors.numpy import save_file

    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    if groups is None:
        onnx.save_model(tiny_unet(), root / "model.onnx", save_as_external_data=True, location="model.onnx.data",
                        size_threshold=0)  # fmt: skip
        graphs, weights, feed_groups = [{"file": "model.onnx", "group": None}], None, [0, 0, 0]
    else:  # per-group: one graph per group over one shared weights file
        onnx.save_model(tiny_unet(), root / "model_g00.onnx", save_as_external_data=True, location="weights.bin",
                        size_threshold=0)  # fmt: skip
        shared = onnx.load(str(root / "model_g00.onnx"), load_external_data=False)
        for g in range(1, groups):
            shared.graph.name = f"tiny_unet_g{g:02d}"
            onnx.save_model(shared, root / f"model_g{g:02d}.onnx")
        graphs = [{"file": f"model_g{g:02d}.onnx", "group": g} for g in range(groups)]
        weights, feed_groups = "weights.bin", [0, 1, 0]
    labels = ["a", "b", "uncond"]
    save_file({"encoder_hidden_states": rng.standard_normal((3, L, D)).astype(np.float32)},
              str(root / "conditioning.safetensors"), metadata={"uncond_index": "2", "labels": json.dumps(labels)})  # fmt: skip
    (root / "reference").mkdir()
    feeds = [{"sample": rng.standard_normal((2, C, H, W)).astype(np.float32),
              "timestep": np.array([t, t], np.float32),
              "encoder_hidden_states": rng.standard_normal((2, L, D)).astype(np.float32)} for t in (900.0, 400.0, 800.0)]  # fmt: skip
    save_json(feeds, root / "reference" / "inputs.json")
    floats = [rng.standard_normal((2, C, H, W)).astype(np.float32) for _ in feeds]
    fq, fl = RunResults(), RunResults()
    # the fake-quant output is the float output + 0.01 * (i + 1): mean |FQ - float| of feed i is 0.01 * (i + 1)
    fq.add([{"noise_pred": f + np.float32(0.01 * (i + 1))} for i, f in enumerate(floats)], runner_name="torch_fq")
    fl.add([{"noise_pred": f} for f in floats], runner_name="torch_float")
    fq.save(str(root / "reference" / "ref_fq.json"))
    fl.save(str(root / "reference" / "ref_float.json"))
    (root / "reference" / "feeds.json").write_text(json.dumps({"groups": feed_groups, "timesteps": [900, 400, 800]}))
    mode = f"W{w_bits}A{a_bits}"
    extra = {
        "target": to_jsonable(load_target(target_id)),
        "precision": {"w_bits": w_bits, "a_bits": a_bits, "mode": mode,
                      "note": "W4 stored as INT8; speed = W8A8" if w_bits == 4 else None},
        "scale_mode": "merged" if groups is None else "per-group",
        "graphs": graphs,
        "weights_file": weights,
        "groups": {"count": groups or 1, "timesteps": [900, 400][: groups or 1], "rule": "max{g : t_g >= t}, 0 if t > t_0"},
        "sampler": {"sampler": "ddim", "steps": 50, "eta": 0.0, "guidance_scale": 2.0},
        "scheduler_config": {"num_train_timesteps": 1000},
        "conditioning": {"file": "conditioning.safetensors", "uncond_index": 2, "labels": labels},
        "io": IO,
        "layers": [{"name": "conv", "kind": "conv", "w_bits": w_bits, "a_bits": a_bits,
                    "storage": "int8-container" if w_bits == 4 else "int8", "a_storage": "int8"}],
        "onnx": {"opset": 17, "ir_version": 8, "qdq_nodes": {"QuantizeLinear": 0, "DequantizeLinear": 0}},
        "reference": {"inputs": "reference/inputs.json", "ref_fq": "reference/ref_fq.json",
                      "ref_float": "reference/ref_float.json", "groups": [0, 1][: groups or 1]},
    }  # fmt: skip
    write_manifest(root, stage="export", recipe_fingerprint=FINGERPRINT, config={"scale_mode": extra["scale_mode"]},
                   extra=extra)  # fmt: skip
    return root


def trtexec_calls(build_sh: str) -> list[list[str]]:
    return [shlex.split(line)[1:] for line in build_sh.splitlines() if line.startswith('"$TRTEXEC" ')]


@pytest.fixture
def jp61_bundle(tmp_path) -> Path:
    export = make_export(tmp_path / "export", "jetson-orin-jp61")
    return bundle_from_export(export, out=tmp_path / "bundle", target=load_target("jetson-orin-jp61"))


# -- contents, hashes and manifest ------------------------------------------------------------------------


def test_bundle_layout_and_hashes(jp61_bundle):
    files = {p.relative_to(jp61_bundle).as_posix() for p in jp61_bundle.rglob("*") if p.is_file()}
    manifest = read_manifest(jp61_bundle, stage="bundle")
    assert set(manifest["files"]) == files - {"manifest.json"}
    for rel, digest in manifest["files"].items():
        assert sha256_file(jp61_bundle / rel) == digest, rel
    for rel in ("model.onnx", "model.onnx.data", "conditioning.safetensors", "reference/inputs.json",
                "reference/ref_fq.json", "reference/ref_float.json", "reference/feeds.json", "build.sh",
                "build_engine.py", "README.md", f"wheels/quest_export_runtime-{__version__}-py3-none-any.whl"):  # fmt: skip
        assert rel in files, rel
    assert os.access(jp61_bundle / "build.sh", os.X_OK) and os.access(jp61_bundle / "build_engine.py", os.X_OK)
    verify_files(jp61_bundle)


@pytest.mark.parametrize(
    "rel", ["model.onnx.data", "reference/ref_fq.json", f"wheels/quest_export_runtime-{__version__}-py3-none-any.whl"]
)
def test_tampering_is_detected(jp61_bundle, rel):
    path = jp61_bundle / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestMismatch, match=rf"file '{rel}' does not match its manifest hash"):
        verify_files(jp61_bundle)


def test_manifest_carries_the_export_keys_and_the_build_plan(tmp_path, jp61_bundle):
    export = read_manifest(tmp_path / "export", stage="export")
    bundle = read_manifest(jp61_bundle, stage="bundle")
    assert BASE_KEYS <= set(bundle)
    for key in set(export) - BASE_KEYS:
        assert bundle[key] == export[key], key
    assert bundle["recipe_fingerprint"] == FINGERPRINT and bundle["config"] == export["config"]
    assert bundle["inputs"] == {"export": sha256_file(tmp_path / "export" / "manifest.json")}
    build = bundle["build"]
    for key in ("trt_version", "typing", "flags", "profiles", "workspace_mib", "builder_opt_level", "max_aux_streams",
                "timing_cache", "compute_capability", "jetpack"):  # fmt: skip
        assert key in build, key
    assert (build["trt_version"], build["typing"], build["flags"]) == ("10.3", "weak", ["--fp16", "--int8"])
    assert build["profiles"]["encoder_hidden_states"] == {"min": [1, L, D], "opt": [2, L, D], "max": [8, L, D]}
    assert BuildPlan.from_dict(build) == plan_build(load_target("jetson-orin-jp61"), IO, precision=export["precision"])


def test_bundle_carries_the_runtime_as_a_wheel_and_no_sources(jp61_bundle):
    wheel = jp61_bundle / "wheels" / f"quest_export_runtime-{__version__}-py3-none-any.whl"
    files = {p.relative_to(jp61_bundle).as_posix() for p in jp61_bundle.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith(".py") and f != "build_engine.py"], "runtime sources copied"
    assert "sys.path" not in (jp61_bundle / "build_engine.py").read_text()
    src = ROOT / "runtime" / "python" / "quest_export_runtime"
    info = f"quest_export_runtime-{__version__}.dist-info"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert names == {f"quest_export_runtime/{p.name}" for p in src.glob("*.py")} | {
            f"{info}/{n}" for n in ("METADATA", "WHEEL", "top_level.txt", "RECORD")
        }
        assert z.read("quest_export_runtime/builder.py") == (src / "builder.py").read_bytes()
        meta = z.read(f"{info}/METADATA").decode()
        assert "Name: quest-export-runtime" in meta and f"Version: {__version__}" in meta
        requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
        assert [r for r in requires if "extra ==" not in r] == ["numpy>=1.24", "safetensors>=0.4"]
        assert "Tag: py3-none-any" in z.read(f"{info}/WHEEL").decode()
        record = z.read(f"{info}/RECORD").decode()
        assert "quest_export_runtime/builder.py,sha256=" in record


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, timeout=60).stdout  # fmt: skip
    return Path(out.strip())


def _provided(dest: Path, names: list[str]) -> Path:
    """A folder of links to these installed distributions and what they require (never quest-export*)."""
    seen, todo = {}, list(names)
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name not in seen:
            seen[name] = dist = importlib.metadata.distribution(name)
            todo += [r for r in dist.requires or [] if "extra ==" not in r]
    dest.mkdir()
    for dist in seen.values():
        site = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            if (site / top).exists() and not (dest / top).exists():
                (dest / top).symlink_to(site / top)
    return dest


def test_runtime_wheel_installs_offline_in_a_fresh_venv_and_samples_with_torch_blocked(tmp_path, jp61_bundle):
    """The device's route: pip --no-index from the bundle's wheels/, then sample with torch absent."""
    venv = tmp_path / "device-venv"  # outside the source tree
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = _site_packages(python)
    # numpy, safetensors and onnxruntime as the device's OS would have them: after the venv's own site-packages
    (site / "provided.pth").write_text(str(_provided(tmp_path / "provided", ["numpy", "safetensors", "onnxruntime"])))
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--find-links",
           str(jp61_bundle / "wheels"), "quest-export-runtime"]  # fmt: skip
    proc = subprocess.run(pip, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code = f"""
import sys
sys.modules["torch"] = None
import numpy as np
import quest_export_runtime
from quest_export_runtime import RuntimePipeline
with RuntimePipeline.from_artifact({str(jp61_bundle)!r}) as pipe:
    images = pipe(class_labels=["a"], seed=0, steps=2)
assert images.shape == (1, {C}, {H}, {W}) and np.isfinite(images).all(), images.shape
try:
    import quest_export
except ImportError:
    host = None
else:
    host = quest_export.__file__
print(quest_export_runtime.__file__, host)
"""
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    where, host = proc.stdout.split()[-2:]
    assert Path(where).resolve().is_relative_to(site.resolve()), where
    assert host == "None", f"the host package was importable: {host}"


def test_runtime_wheel_needs_the_installed_distribution(tmp_path, monkeypatch):
    from quest_export.deploy import bundle

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(bundle.metadata, "distribution", missing)
    with pytest.raises(
        ArtifactError, match="quest-export-runtime is not installed.*pip install quest-export-runtime=="
    ):
        bundle.runtime_wheel(tmp_path / "wheels")
    assert not list(tmp_path.glob("wheels/*.whl"))


# -- build.sh: flags per TensorRT version (deploy.md section 6) ----------------------------------------------


@pytest.mark.parametrize(
    "target_id, profile, present, absent",
    [
        ("jetson-orin-jp51", load_target("jetson-orin-jp51"), {"--fp16", "--int8"}, {"--stronglyTyped"}),  # 8.5.2
        ("jetson-orin-jp60", load_target("jetson-orin-jp60"), {"--fp16", "--int8"}, {"--stronglyTyped"}),  # 8.6.2
        ("jetson-orin-jp61", load_target("jetson-orin-jp61"), {"--fp16", "--int8"}, {"--stronglyTyped"}),  # 10.3
        ("jetson-thor-jp7", load_target("jetson-thor-jp7"), {"--stronglyTyped"}, {"--int8", "--fp16"}),  # 10.13.3
        (
            "gpu",
            dataclasses.replace(load_target("gpu"), trt_version="11.1"),
            set(),
            {"--stronglyTyped", "--int8", "--fp16"},
        ),
    ],
)
def test_build_sh_flags_per_trt_version(tmp_path, target_id, profile, present, absent):
    export = make_export(tmp_path / "export", target_id)
    bundle = bundle_from_export(export, out=tmp_path / "bundle", target=profile)
    text = (bundle / "build.sh").read_text()
    (call,) = trtexec_calls(text)
    assert present <= set(call) and not absent & set(call)
    assert call == render_trtexec(plan_build(profile, IO), "model.onnx", "engine/unet.plan")[1:]
    assert f"EXPECTED_TRT={profile.trt_version}" in text
    proc = subprocess.run(["bash", "-n", str(bundle / "build.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_build_sh_has_one_call_per_group_and_per_group_references(tmp_path):
    export = make_export(tmp_path / "export", "jetson-orin-jp60", groups=2)
    bundle = bundle_from_export(export, out=tmp_path / "bundle", target=load_target("jetson-orin-jp60"))
    text = (bundle / "build.sh").read_text()
    calls = trtexec_calls(text)
    assert [c[:2] for c in calls] == [["--onnx=model_g00.onnx", "--saveEngine=engine/unet_g00.plan"],
                                      ["--onnx=model_g01.onnx", "--saveEngine=engine/unet_g01.plan"]]  # fmt: skip
    assert all("--timingCacheFile=timing_trt8.6.2_sm87_jp6.0.cache" in c for c in calls)
    assert "weights.bin" in read_manifest(bundle)["files"]
    # feeds 0 and 2 belong to group 0, feed 1 to group 1; the split files load in polygraphy
    assert len(load_json(bundle / "reference" / "inputs_g00.json")) == 2
    g1 = RunResults.load(str(bundle / "reference" / "ref_fq_g01.json"))
    assert len(g1["torch_fq"]) == 1
    np.testing.assert_array_equal(g1["torch_fq"][0]["noise_pred"],
                                  RunResults.load(str(bundle / "reference" / "ref_fq.json"))["torch_fq"][1]["noise_pred"])  # fmt: skip
    assert "--load-inputs reference/inputs_g01.json --load-outputs reference/ref_fq_g01.json --atol 0.03 " in text
    assert subprocess.run(["bash", "-n", str(bundle / "build.sh")]).returncode == 0


def test_verify_command_uses_the_h3_mean_bound(jp61_bundle):
    text = (jp61_bundle / "build.sh").read_text()
    # mean |FQ - float| per feed is 0.01, 0.02, 0.03: the bound is 1.5 * 0.03
    cmd = ("polygraphy run engine/unet.plan --model-type engine --trt --load-inputs reference/inputs.json "
           "--load-outputs reference/ref_fq.json --atol 0.045 --rtol 0 --check-error-stat mean")  # fmt: skip
    assert cmd in text and cmd in (jp61_bundle / "README.md").read_text()
    ref = jp61_bundle / "reference"
    assert reference_atol(ref / "ref_fq.json", ref / "ref_float.json", [0]) == pytest.approx(0.015)


def test_readme_states_versions_commands_and_limits(tmp_path, jp61_bundle):
    text = (jp61_bundle / "README.md").read_text()
    assert "TensorRT 10.3" in text and "JetPack 6.1" in text and "./build.sh" in text and "build_engine.py" in text
    assert "pip install --no-index --find-links wheels quest-export-runtime" in text and "W4 stored as INT8" not in text
    export = make_export(tmp_path / "w4a4", "jetson-orin-jp61", w_bits=4, a_bits=4)
    bundle = bundle_from_export(export, out=tmp_path / "w4a4_bundle", target=load_target("jetson-orin-jp61"))
    text = (bundle / "README.md").read_text()
    assert "W4 stored as INT8; speed = W8A8" in text and "A4 activations run in an INT8 container" in text
    assert "--allow-experimental" in text and "a4-container" in text


# -- build.sh run with stand-in tools (platform checks, J-5) ------------------------------------------------------


def stub_tools(tmp_path: Path, trt_version: str) -> dict:
    """PATH with fake trtexec (logs its arguments, writes the engine) and dpkg-query (reports libnvinfer)."""
    bin_dir = tmp_path / "stubs"
    bin_dir.mkdir(parents=True)
    (bin_dir / "trtexec").write_text(
        '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$STUB_LOG"\n'
        'for a in "$@"; do case "$a" in --saveEngine=*) : > "${a#--saveEngine=}" ;;'
        ' --timingCacheFile=*) printf cache > "${a#--timingCacheFile=}" ;; esac; done\n'
    )
    (bin_dir / "dpkg-query").write_text(  # libnvinfer is installed, nvidia-l4t-core is not (not a Jetson)
        f'#!/bin/sh\ncase "$*" in *libnvinfer*) printf "ii  libnvinfer10 {trt_version}\\n" ;; *) exit 1 ;; esac\n'
    )
    (bin_dir / "nvidia-smi").write_text('#!/bin/sh\necho "9.0"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "trtexec.args")}


def run_build_sh(bundle: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(bundle / "build.sh"), *args], capture_output=True, text=True, env=env, timeout=60
    )


@needs_plain_host
def test_build_sh_runs_trtexec_when_the_platform_matches(tmp_path):
    export = make_export(tmp_path / "export", "gpu")
    bundle = bundle_from_export(export, out=tmp_path / "bundle", target=load_target("gpu"))
    proc = run_build_sh(bundle, stub_tools(tmp_path, "10.13.0.35-1+cuda12.9"))
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "trtexec.args").read_text().splitlines()
    assert args == render_trtexec(plan_build(load_target("gpu"), IO), "model.onnx", "engine/unet.plan")[1:]
    assert (bundle / "engine" / "unet.plan").is_file()
    key = json.loads((bundle / "timing_trt10.13_sm80_cuda12.9.cache.json").read_text())
    assert key == {"trt_version": "10.13", "compute_capability": "8.0", "jetpack": None, "cuda": "12.9"}
    assert "polygraphy run engine/unet.plan" in proc.stdout
    # a second build reuses the cache: the key matches
    assert run_build_sh(bundle, stub_tools(tmp_path / "again", "10.13.0.35-1+cuda12.9")).returncode == 0


@needs_plain_host
def test_build_sh_refuses_another_tensorrt_or_a_foreign_timing_cache(tmp_path):
    export = make_export(tmp_path / "export", "gpu")
    bundle = bundle_from_export(export, out=tmp_path / "bundle", target=load_target("gpu"))
    proc = run_build_sh(bundle, stub_tools(tmp_path, "10.1.0.27-1+cuda12.4"))
    assert proc.returncode == 2 and not (tmp_path / "trtexec.args").exists()
    assert "this device has TensorRT 10.1.0.27-1+cuda12.4, the bundle is for TensorRT 10.13" in proc.stderr
    assert "quest-export build --target" in proc.stderr
    (bundle / "timing_trt10.13_sm80_cuda12.9.cache").write_bytes(b"x")
    (bundle / "timing_trt10.13_sm80_cuda12.9.cache.json").write_text('{"trt_version": "10.12"}\n')
    proc = run_build_sh(bundle, stub_tools(tmp_path / "b", "10.13.0.35-1+cuda12.9"))
    assert proc.returncode == 2 and "timing cache" in proc.stderr


@needs_plain_host
def test_build_sh_refuses_a_jetson_bundle_off_the_jetson_and_unverified_cells(tmp_path):
    env = stub_tools(tmp_path, "10.3.0.30-1+cuda12.5")
    export = make_export(tmp_path / "export", "jetson-orin-jp61")
    bundle = bundle_from_export(export, out=tmp_path / "bundle", target=load_target("jetson-orin-jp61"))
    proc = run_build_sh(bundle, env)
    assert proc.returncode == 2 and "has no L4T release (/etc/nv_tegra_release" in proc.stderr
    export = make_export(tmp_path / "a4", "jetson-orin-jp61", w_bits=4, a_bits=4)
    bundle = bundle_from_export(export, out=tmp_path / "a4_bundle", target=load_target("jetson-orin-jp61"))
    proc = run_build_sh(bundle, env)
    assert proc.returncode == 2 and "a4-container" in proc.stderr and "--allow-experimental" in proc.stderr
    proc = run_build_sh(bundle, env, "--allow-experimental")
    assert proc.returncode == 2 and "nv_tegra_release" in proc.stderr  # past the cell check, stopped by J-5


# -- build_engine.py without TensorRT, and import hygiene ---------------------------------------------------------


def copy_bundle(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    return dest


@pytest.mark.skipif(bool(__import__("importlib").util.find_spec("tensorrt")), reason="TensorRT is installed here")
def test_build_engine_py_without_tensorrt_fails_with_one_line_and_exit_2(tmp_path, jp61_bundle):
    device = copy_bundle(jp61_bundle, tmp_path / "on_device")  # away from the source tree
    proc = subprocess.run(
        [sys.executable, "-I", "build_engine.py"], cwd=device, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: building a TensorRT engine needs TensorRT, but `import tensorrt` failed")
    assert not list(device.rglob("__pycache__")) and not (device / "engine").exists()


def test_build_engine_py_without_the_runtime_says_how_to_install_it(tmp_path, jp61_bundle):
    device = copy_bundle(jp61_bundle, tmp_path / "on_device")
    proc = subprocess.run(  # -S: no site-packages, so no quest_export_runtime
        [sys.executable, "-I", "-S", "build_engine.py"], cwd=device, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "pip install --no-index --find-links wheels quest-export-runtime" in proc.stderr


def test_build_engine_py_verifies_the_bundle_first(tmp_path, jp61_bundle):
    device = copy_bundle(jp61_bundle, tmp_path / "on_device")
    (device / "model.onnx.data").write_bytes(b"truncated")
    proc = subprocess.run(
        [sys.executable, "-I", "build_engine.py"], cwd=device, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "file 'model.onnx.data' does not match its manifest hash" in proc.stderr


def test_build_engine_py_refuses_experimental_cells_unless_allowed(tmp_path):
    export = make_export(tmp_path / "export", "jetson-orin-jp61", a_bits=4)
    bundle = bundle_from_export(export, out=tmp_path / "bundle", target=load_target("jetson-orin-jp61"))
    proc = subprocess.run(
        [sys.executable, "-I", "build_engine.py"], cwd=bundle, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "experimental cells (a4-container)" in proc.stderr


@pytest.mark.parametrize(
    "module",
    [
        "quest_export.deploy.plan",
        "quest_export.deploy.trtexec",
        "quest_export.deploy.bundle",
        "quest_export_runtime.builder",
        "quest_export_runtime.build_cli",
    ],
)
def test_imports_without_torch(module):
    code = (f"import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None; import {module}; "
            "heavy = [m for m in ('tensorrt', 'onnx', 'numpy', 'polygraphy') if m in sys.modules]; "
            "stages = [m for m in sys.modules if m.startswith('quest_export.') "
            "and m.split('.')[1] not in ('deploy', 'recipe', 'errors')]; "
            "assert not heavy and not stages, (heavy, stages)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{module} pulls heavy or host-only modules on import:\n{proc.stderr}"


# -- refusals ---------------------------------------------------------------------------------------------------------------


def test_refuses_an_export_made_for_another_target(tmp_path):
    export = make_export(tmp_path / "export", "jetson-orin-jp61")
    with pytest.raises(TargetError, match="exported for target 'jetson-orin-jp61', not 'jetson-orin-jp60'") as e:
        bundle_from_export(export, out=tmp_path / "bundle", target=load_target("jetson-orin-jp60"))
    assert "\n" not in str(e.value) and not (tmp_path / "bundle").exists()
    cpu = make_export(tmp_path / "cpu_export", "cpu")
    with pytest.raises(TargetError, match="ONNX Runtime"):
        bundle_from_export(cpu, out=tmp_path / "bundle", target=load_target("cpu"))
    plan = plan_build(load_target("jetson-thor-jp7"), IO)
    with pytest.raises(TargetError, match="plan is for target 'jetson-thor-jp7'"):
        bundle_from_export(export, out=tmp_path / "bundle", target=load_target("jetson-orin-jp61"), plan=plan)


def test_refuses_a_tampered_or_incomplete_export(tmp_path):
    export = make_export(tmp_path / "export", "jetson-orin-jp61")
    (export / "reference" / "ref_float.json").unlink()
    with pytest.raises(ManifestMismatch, match="ref_float.json' listed in the manifest is missing"):
        bundle_from_export(export, out=tmp_path / "bundle", target=load_target("jetson-orin-jp61"))
    export = make_export(tmp_path / "export2", "jetson-orin-jp61")
    manifest = read_manifest(export)
    manifest["reference"].pop("ref_float")
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="reference data ref_float missing"):
        bundle_from_export(export, out=tmp_path / "bundle", target=load_target("jetson-orin-jp61"))
    assert not (tmp_path / "bundle").exists()
