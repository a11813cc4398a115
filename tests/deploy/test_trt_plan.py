"""Build plans, trtexec command lines, timing-cache keys, device checks and the layer audit (no TensorRT)."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from quest_export_runtime.audit import AuditReport, audit_layers
from quest_export_runtime.builder import check_device, engine_from_onnx
from quest_export_runtime.device import l4t_release, require_tensorrt, trt_matches_target
from quest_export_runtime.plan import BuildPlan, engine_files
from quest_export_runtime.timing_cache import load_timing_cache, save_timing_cache, timing_cache_key, timing_cache_name

from quest_export.deploy.plan import plan_build
from quest_export.deploy.trtexec import render_trtexec, render_trtexec_shell
from quest_export.errors import ArtifactError, InputError, ManifestMismatch, TargetError, TensorRTUnavailableError
from quest_export.recipe.targets import list_targets, load_target

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "fixtures" / "golden" / "trtexec"
LAYER_INFO = ROOT / "tests" / "fixtures" / "layer_info"
UPDATE_GOLDEN = os.environ.get("QUEST_EXPORT_UPDATE_GOLDEN") == "1"  # `make golden` sets it; review the diff
TRT_TARGETS = [t for t in list_targets() if load_target(t).is_tensorrt]

# The contract's UNet I/O (docs/formats.md): SD-like latent 4x32x32, text conditioning 77x768.
IO = {
    "inputs": [
        {"name": "sample", "dtype": "float32", "shape": ["batch", 4, 32, 32]},
        {"name": "timestep", "dtype": "float32", "shape": ["batch"]},
        {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["batch", 77, 768]},
    ],
    "outputs": [{"name": "noise_pred", "dtype": "float32", "shape": ["batch", 4, 32, 32]}],
}


def with_version(target: str, version: str, **changes):
    return dataclasses.replace(load_target(target), trt_version=version, **changes)


def flag_set(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args[1:]}


# -- typing and precision flags per version (deploy.md section 6, B-7) -------------------------------


@pytest.mark.parametrize(
    "profile, typing, flags",
    [
        (load_target("jetson-orin-jp51"), "weak", ("--fp16", "--int8")),  # 8.5.2
        (load_target("jetson-orin-jp60"), "weak", ("--fp16", "--int8")),  # 8.6.2
        (load_target("jetson-orin-jp61"), "weak", ("--fp16", "--int8")),  # 10.3: weak by default (Q4)
        (with_version("jetson-orin-jp61", "10.11", typing="weak"), "weak", ("--fp16", "--int8")),
        (load_target("jetson-thor-jp7"), "strong", ("--stronglyTyped",)),  # 10.13.3
        (load_target("gpu"), "strong", ("--stronglyTyped",)),  # 10.13
        (with_version("gpu", "10.12", typing="weak"), "strong", ("--stronglyTyped",)),  # weak deprecated
        (with_version("gpu", "11.1"), "strong", ()),  # always strong, no precision flags
    ],
    ids=["8.5.2", "8.6.2", "10.3", "10.11", "10.13.3-thor", "10.13-gpu", "10.12", "11.1"],
)
def test_b7_typing_and_flags_per_version(profile, typing, flags):
    plan = plan_build(profile, IO)
    assert (plan.typing, plan.flags) == (typing, flags)
    args = render_trtexec(plan, "model.onnx", "engine/unet.plan")
    for f in ("--fp16", "--int8", "--int4", "--stronglyTyped"):
        assert (f in args) == (f in flags), f


def test_jp61_strong_typing_is_opt_in_and_experimental():
    plan = plan_build(load_target("jetson-orin-jp61"), IO, strongly_typed=True)
    assert (plan.typing, plan.flags) == ("strong", ("--stronglyTyped",))
    assert plan.experimental == ("strong-typing",)
    assert plan_build(load_target("jetson-orin-jp61"), IO).experimental == ()


@pytest.mark.parametrize(
    "profile, kwargs, match",
    [
        (load_target("jetson-orin-jp51"), {"strongly_typed": True}, "no strongly typed"),
        (load_target("jetson-orin-jp60"), {"strongly_typed": True}, "no strongly typed"),
        (load_target("jetson-thor-jp7"), {"strongly_typed": False}, "deprecated weak typing"),
        (with_version("gpu", "11.1"), {"strongly_typed": False}, "removed weak typing"),
        (load_target("jetson-orin-jp60"), {"int4": True}, "no INT4"),
        (load_target("jetson-orin-jp51"), {"opt_level": 2}, "no builder optimization level"),
        (load_target("jetson-orin-jp61"), {"precision": {"mode": "FP8"}}, "has no FP8"),
        (load_target("jetson-orin-jp51"), {"compute_capability": "9.0"}, "not a device"),
        (load_target("cpu"), {}, "not TensorRT"),
        (with_version("gpu", "9.3"), {}, "TensorRT 9.3"),
        (with_version("gpu", "8.4"), {}, "TensorRT 8.4"),
    ],
)
def test_plan_refuses_what_the_target_cannot_do(profile, kwargs, match):
    with pytest.raises(TargetError, match=match) as e:
        plan_build(profile, IO, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs", [{"opt_level": 6}, {"opt_level": -1}, {"batch_max": 0}, {"workspace_mib": 0}])
def test_plan_refuses_out_of_range_options(kwargs):
    with pytest.raises(InputError):
        plan_build(load_target("gpu"), IO, **kwargs)


def test_int4_adds_int4_flag_only_in_weak_mode():
    weak = plan_build(load_target("jetson-orin-jp61"), IO, int4=True)
    assert weak.flags == ("--fp16", "--int8", "--int4") and "int4-gemm" in weak.experimental
    strong = plan_build(load_target("jetson-thor-jp7"), IO, int4=True)
    assert strong.flags == ("--stronglyTyped",) and strong.int4


def test_experimental_cells_follow_the_profile():
    io = {"inputs": [*IO["inputs"], {"name": "act_scale_ratios", "dtype": "float32", "shape": [64]}], "outputs": []}
    plan = plan_build(load_target("jetson-orin-jp61"), io, precision={"w_bits": 4, "a_bits": 4, "mode": "W4A4"})
    assert plan.experimental == ("scale-input", "a4-container")
    thor = plan_build(load_target("jetson-thor-jp7"), IO, precision={"mode": "FP8"})
    assert thor.experimental == ("fp8",)
    # a cell the profile does not list as experimental is simply supported
    jp60 = plan_build(load_target("jetson-orin-jp60"), io)
    assert jp60.experimental == ()


# -- profiles (B-9) ----------------------------------------------------------------------------------


def test_b9_profiles_span_the_batch_and_follow_the_export_shapes():
    plan = plan_build(load_target("jetson-orin-jp61"), IO)  # max_batch 4 -> UNet batch 8 under guidance
    assert plan.profiles == {
        "sample": {"min": [1, 4, 32, 32], "opt": [2, 4, 32, 32], "max": [8, 4, 32, 32]},
        "timestep": {"min": [1], "opt": [2], "max": [8]},
        "encoder_hidden_states": {"min": [1, 77, 768], "opt": [2, 77, 768], "max": [8, 77, 768]},
    }
    assert plan_build(load_target("gpu"), IO).profiles["sample"]["max"] == [16, 4, 32, 32]  # max_batch 8
    assert plan_build(load_target("gpu"), IO, batch_max=3).profiles["timestep"]["max"] == [6]
    assert plan_build(load_target("gpu"), IO, batch_max=1).profiles["timestep"] == {"min": [1], "opt": [2], "max": [2]}


def test_static_inputs_get_no_profile():
    io = {"inputs": [*IO["inputs"], {"name": "act_scale_ratios", "dtype": "float32", "shape": [12]}], "outputs": []}
    plan = plan_build(load_target("gpu"), io)
    assert "act_scale_ratios" not in plan.profiles
    assert "act_scale_ratios" not in " ".join(render_trtexec(plan, "m.onnx", "unet.plan"))


@pytest.mark.parametrize(
    "io, match",
    [
        ({"inputs": [{"name": "x", "shape": ["batch", 4, 8, 8]}]}, "no 4-D 'sample'"),
        ({"inputs": [{"name": "sample", "shape": ["batch", 4, "height", 32]}]}, "symbolic dim 'height' at axis 2"),
    ],
)
def test_profiles_refuse_unusable_io(io, match):
    with pytest.raises(ArtifactError, match=match):
        plan_build(load_target("gpu"), io)


# -- trtexec per version (B-10..B-12) ------------------------------------------------------------------


def test_trtexec_options_exist_only_where_trtexec_has_them():
    a85 = render_trtexec(plan_build(load_target("jetson-orin-jp51"), IO), "model.onnx", "engine/unet.plan")
    assert "--memPoolSize=workspace:2048" in a85  # plain MiB: 8.x has no unit suffixes
    assert not flag_set(a85) & {"--builderOptimizationLevel", "--maxAuxStreams", "--workspace"}  # 8.6+ / deprecated
    a86 = render_trtexec(plan_build(load_target("jetson-orin-jp60"), IO), "model.onnx", "engine/unet.plan")
    assert {"--builderOptimizationLevel=3", "--maxAuxStreams=0", "--memPoolSize=workspace:2048"} <= set(a86)
    a100 = render_trtexec(plan_build(with_version("jetson-orin-jp61", "10.0"), IO), "m.onnx", "unet.plan")
    assert "--memPoolSize=workspace:2048" in a100  # 10.0 would read "2048M" as 2048 * 2^20 MiB
    a103 = render_trtexec(plan_build(load_target("jetson-orin-jp61"), IO, opt_level=2), "m.onnx", "unet.plan")
    assert {"--memPoolSize=workspace:2048M", "--builderOptimizationLevel=2"} <= set(a103)
    a11 = render_trtexec(plan_build(with_version("gpu", "11.1"), IO), "m.onnx", "unet.plan")
    assert "--separateProfileRun" not in a11 and "--separateProfileRun" in a103  # a deprecated no-op on 11
    for args in (a85, a86, a100, a103, a11):
        assert {"--profilingVerbosity", "--exportLayerInfo", "--exportProfile", "--timingCacheFile"} <= flag_set(args)


def test_trtexec_names_sidecar_files_per_engine():
    plan = plan_build(load_target("jetson-orin-jp61"), IO)
    args = render_trtexec(plan, "model_g03.onnx", "engine/unet_g03.plan", timing_cache="cache/t.cache")
    assert args[:3] == ["trtexec", "--onnx=model_g03.onnx", "--saveEngine=engine/unet_g03.plan"]
    assert "--exportLayerInfo=engine/layers_g03.json" in args and "--exportProfile=engine/profile_g03.json" in args
    assert "--timingCacheFile=cache/t.cache" in args
    assert engine_files(3) == ("unet_g03.plan", "layers_g03.json", "profile_g03.json")
    assert engine_files(None) == ("unet.plan", "layers.json", "profile.json")
    assert shlex.split(render_trtexec_shell(plan, "a b.onnx", "unet.plan"))[1] == "--onnx=a b.onnx"


@pytest.mark.parametrize("target", TRT_TARGETS)
def test_golden_trtexec_command_per_target(target):
    line = render_trtexec_shell(plan_build(load_target(target), IO), "model.onnx", "engine/unet.plan") + "\n"
    path = GOLDEN / f"{target}.txt"
    if UPDATE_GOLDEN:
        path.write_text(line)
    assert path.is_file(), f"missing golden file {path}; run `make golden` (QUEST_EXPORT_UPDATE_GOLDEN=1)"
    assert line == path.read_text(), f"trtexec command for {target} changed; if intended, run `make golden`"


def test_every_trt_profile_has_a_golden_file():
    assert TRT_TARGETS and sorted(p.stem for p in GOLDEN.glob("*.txt")) == sorted(TRT_TARGETS)


# -- plan serialisation ----------------------------------------------------------------------------------


def test_plan_round_trips_through_json():
    plan = plan_build(load_target("jetson-orin-jp61"), IO, int4=True)
    data = json.loads(json.dumps(plan.to_dict()))
    assert BuildPlan.from_dict(data) == plan
    for key in ("trt_version", "typing", "flags", "profiles", "workspace_mib", "builder_opt_level", "max_aux_streams",
                "timing_cache", "compute_capability", "jetpack"):  # fmt: skip
        assert key in data  # docs/formats.md, bundle `build` keys
    with pytest.raises(ArtifactError, match="unknown keys"):
        BuildPlan.from_dict({**data, "future_knob": 1})
    with pytest.raises(ArtifactError, match="incomplete"):
        BuildPlan.from_dict({k: v for k, v in data.items() if k != "typing"})


# -- timing cache (B-10) ---------------------------------------------------------------------------------


def test_b10_timing_cache_name_encodes_the_key():
    names = {t: plan_build(load_target(t), IO).timing_cache for t in TRT_TARGETS}
    assert names["jetson-orin-jp61"] == "timing_trt10.3_sm87_jp6.1.cache"
    assert names["gpu"] == "timing_trt10.13_sm80_cuda12.9.cache"
    assert len(set(names.values())) == len(names)
    xavier = plan_build(load_target("jetson-orin-jp51"), IO, compute_capability="7.2")
    assert xavier.timing_cache == "timing_trt8.5.2_sm72_jp5.1.cache"


def test_b10_timing_cache_with_another_key_is_refused(tmp_path):
    plan = plan_build(load_target("jetson-orin-jp61"), IO)
    key = timing_cache_key(plan)
    path = tmp_path / timing_cache_name(key)
    assert load_timing_cache(path, key) == b""  # nothing yet: start empty
    save_timing_cache(path, key, b"\x01cache")
    assert load_timing_cache(path, key) == b"\x01cache"
    assert json.loads((tmp_path / (path.name + ".json")).read_text()) == key
    other = timing_cache_key(plan, compute_capability="7.2")
    with pytest.raises(ManifestMismatch, match="another TensorRT/GPU/JetPack"):
        load_timing_cache(path, other)  # the name says sm87
    renamed = tmp_path / timing_cache_name(other)
    path.rename(renamed)
    (tmp_path / (path.name + ".json")).rename(tmp_path / (renamed.name + ".json"))  # still the sm87 key inside
    with pytest.raises(ManifestMismatch, match="was made for"):
        load_timing_cache(renamed, other)  # the name fits, the sidecar does not
    custom = tmp_path / "mine.cache"
    custom.write_bytes(b"x")
    with pytest.raises(ManifestMismatch, match="no readable key file"):
        load_timing_cache(custom, key)


# -- device checks (J-5) -------------------------------------------------------------------------------------


def test_j5_check_device_accepts_the_target_and_refuses_others():
    jp61 = plan_build(load_target("jetson-orin-jp61"), IO)
    check_device(jp61, trt_version="10.3.0.30", compute_capability="8.7", l4t="36.4.3")
    cases = [
        (jp61, dict(trt_version="10.13.3.9", compute_capability="8.7", l4t="36.4.0"), "TensorRT 10.13.3.9"),
        (jp61, dict(trt_version="8.6.2.3", compute_capability="8.7", l4t="36.3.0"), "TensorRT 8.6.2.3"),
        (jp61, dict(trt_version="10.3.0.30", compute_capability="7.2", l4t="36.4.0"), "SM 7.2"),
        (jp61, dict(trt_version="10.3.0.30", compute_capability="8.7", l4t="36.3.0"), "L4T 36.3.0"),
        (jp61, dict(trt_version="10.3.0.30", compute_capability="8.7", l4t=None), "nv_tegra_release"),
        (jp61, dict(trt_version="10.3.0.30", compute_capability=None, l4t="36.4.0"), "no CUDA GPU"),
    ]
    gpu = plan_build(load_target("gpu"), IO)
    check_device(gpu, trt_version="10.13.0.35", compute_capability="9.0", l4t=None)
    cases.append((gpu, dict(trt_version="10.13.0.35", compute_capability="8.7", l4t="36.4.0"), "SM 8.7"))
    cases.append((gpu, dict(trt_version="10.13.0.35", compute_capability="9.0", l4t="36.4.0"), "is a Jetson"))
    for plan, kwargs, match in cases:
        with pytest.raises(ManifestMismatch, match=match):
            check_device(plan, **kwargs)


def test_version_matching_and_l4t_parsing(tmp_path):
    assert trt_matches_target("10.3.0.30", "10.3") and trt_matches_target("8.5.2-1+cuda11.4", "8.5.2")
    assert not trt_matches_target("10.13.3", "10.1") and not trt_matches_target("10.3", "10.3.0.30")
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: x\n")
    assert l4t_release(release) == "36.4.3"
    assert l4t_release(tmp_path / "absent", dpkg=False) is None


# -- layer audit (H-5) --------------------------------------------------------------------------------------------


def test_h5_audit_flags_float_kernels_missing_layers_and_stray_qdq():
    info = json.loads((LAYER_INFO / "unet_mixed.json").read_text())
    expected = ["/conv_in/Conv", "/down_blocks.0/resnets.0/conv1/Conv", "/down_blocks.0/resnets.0/conv2/Conv",
                "/up_blocks.0/resnets.0/conv1/Conv", "/mid_block/attentions.0/to_q/MatMul", "/conv_out/Conv",
                "/up_blocks.1/resnets.0/conv2/Conv"]  # fmt: skip
    report = audit_layers(info, expected)
    assert report.quantized == ("/conv_in/Conv", "/up_blocks.0/resnets.0/conv1/Conv",
                                "/mid_block/attentions.0/to_q/MatMul", "/conv_out/Conv")  # fmt: skip
    assert [f.name for f in report.not_int8] == [
        "/down_blocks.0/resnets.0/conv1/Conv",
        "/down_blocks.0/resnets.0/conv2/Conv",
    ]
    assert report.not_int8[0].input_types == ("Channel major FP16 format where channel % 8 == 0",)
    assert report.missing == ("/up_blocks.1/resnets.0/conv2/Conv",)
    # the unfused DQ (Scale) and the reformat inside the network; the I/O-boundary reformats are fine
    assert [(f.layer_type, f.name) for f in report.stray] == [
        ("Scale", "/down_blocks.0/resnets.0/conv2/input_quantizer/DequantizeLinear"),
        ("Reformat", "Reformatting CopyNode for Input Tensor 0 to /up_blocks.0/resnets.0/conv1/Conv"),
    ]
    assert not report.ok
    assert report.summary().startswith("4/7 quantized layers run INT8/FP8 kernels; 2 on float kernels")
    assert AuditReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_h5_audit_passes_a_clean_engine_and_matches_module_names():
    info = json.loads((LAYER_INFO / "unet_clean.json").read_text())
    report = audit_layers(info, ["conv_in", "conv_out"])  # module names match the ONNX names' tokens
    assert report.ok and report.quantized == ("conv_in", "conv_out") and report.to_dict()["ok"] is True


def test_h5_audit_matches_whole_name_tokens_only():
    info = {"Layers": [{"Name": "/blocks/conv10/Conv", "LayerType": "CaskConvolution",
                        "Inputs": [{"Format/Datatype": "Int8 NC/32HW32"}]}]}  # fmt: skip
    assert audit_layers(info, ["/blocks/conv1/Conv"]).missing == ("/blocks/conv1/Conv",)
    assert audit_layers(info, ["blocks.conv10"]).quantized == ("blocks.conv10",)


def test_h5_audit_needs_detailed_layer_info():
    with pytest.raises(ArtifactError, match="detailed"):
        audit_layers({"Layers": ["/conv_in/Conv", "/conv_out/Conv"]}, ["/conv_in/Conv"])


# -- without TensorRT (B-1, B-2) -----------------------------------------------------------------------------------


def test_b2_missing_tensorrt_raises_one_actionable_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError
    with pytest.raises(TensorRTUnavailableError) as e:
        require_tensorrt(attempted="building a TensorRT engine")
    msg = str(e.value)
    assert "\n" not in msg and "`import tensorrt` failed" in msg and "Python " in msg
    assert "quest-export build --target" in msg  # the off-device way out
    plan = plan_build(load_target("jetson-orin-jp61"), IO)
    with pytest.raises(TensorRTUnavailableError):
        engine_from_onnx(tmp_path / "model.onnx", plan, out_dir=tmp_path / "engine")
    assert not (tmp_path / "engine").exists()


def test_experimental_plan_is_refused_before_anything_is_built(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    plan = plan_build(load_target("jetson-orin-jp61"), IO, strongly_typed=True)
    with pytest.raises(TargetError, match="--allow-experimental"):
        engine_from_onnx(tmp_path / "model.onnx", plan, out_dir=tmp_path / "engine")
    with pytest.raises(TensorRTUnavailableError):  # allowed: goes on to import TensorRT
        engine_from_onnx(tmp_path / "model.onnx", plan, out_dir=tmp_path / "engine", allow_experimental=True)


def test_main_on_a_folder_that_is_no_bundle_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "quest_export_runtime.build_cli", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
