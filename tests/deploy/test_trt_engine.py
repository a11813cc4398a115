"""Engines built with the TensorRT Python API, compared with ONNX Runtime (`make test-trt`: GPU host or Jetson).

Every test here needs TensorRT (builder + ONNX parser) and a CUDA GPU; without them the module skips with
the reason. TensorRT is never mocked (deploy.md B-3).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from quest_export_runtime.audit import AuditReport
from quest_export_runtime.build_cli import main
from quest_export_runtime.builder import engine_from_onnx, engines_from_bundle
from quest_export_runtime.device import (
    compute_capability,
    l4t_release,
    require_tensorrt,
    trt_matches_target,
    version_tuple,
)
from quest_export_runtime.manifest import read_manifest, sha256_file, write_manifest

from quest_export.deploy.plan import plan_build
from quest_export.errors import ExportError, ManifestMismatch
from quest_export.recipe.targets import list_targets, load_target

requires_trt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None,
    reason="TensorRT not installed; run `make test-trt` on a GPU host or the Jetson",
)
pytestmark = [pytest.mark.trt, requires_trt]

CIN, COUT, H, W, L, D = 16, 16, 8, 8, 3, 16
ACT_SCALE = 0.05  # INT8 activation scale: |x| <= 6.35 is representable, N(0, 1) inputs almost never clip
# Assumed, not yet measured (no TensorRT where this was written): INT8 conv kernels are exact; the rest is FP16
# output rounding (weak typing) and rare one-LSB rounding flips of x/s (each moves an output by ~s*|w| ~ 4e-3).
MEAN_ABS_MAX = 1e-2  # mean |TRT - ORT| / std(ORT)
MAX_ABS_MAX = 6e-2  # max |TRT - ORT| / std(ORT)


def qdq_unet(path: Path, *, seed: int = 0) -> Path:
    """A contract-shaped UNet stand-in with one W8A8 Q/DQ 3x3 conv (E-14): Q->DQ on the input, DQ on the weight."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((COUT, CIN, 3, 3)).astype(np.float32) / 12.0
    w_scale = (np.abs(w).reshape(COUT, -1).max(axis=1) / 127).astype(np.float32)
    w_int = np.clip(np.rint(w / w_scale[:, None, None, None]), -128, 127).astype(np.int8)  # E-5
    inits = [
        numpy_helper.from_array(w_int, "conv.weight_int8"),
        numpy_helper.from_array(w_scale, "conv.weight_scale"),
        numpy_helper.from_array(np.zeros(COUT, np.int8), "conv.weight_zp"),
        numpy_helper.from_array(np.array(ACT_SCALE, np.float32), "conv.input_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "conv.input_zp"),
        numpy_helper.from_array(rng.standard_normal(COUT).astype(np.float32) * 0.1, "conv.bias"),
        numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "t_shape"),
        numpy_helper.from_array(np.array(1e-3, np.float32), "t_scale"),
        numpy_helper.from_array(np.array([3], np.int64), "axes3"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["sample", "conv.input_scale", "conv.input_zp"], ["xq"], name="/conv/input_quantizer/QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["xq", "conv.input_scale", "conv.input_zp"], ["xdq"], name="/conv/input_quantizer/DequantizeLinear"),
        helper.make_node("DequantizeLinear", ["conv.weight_int8", "conv.weight_scale", "conv.weight_zp"], ["wdq"], axis=0, name="/conv/weight_quantizer/DequantizeLinear"),
        helper.make_node("Conv", ["xdq", "wdq", "conv.bias"], ["conv"], pads=[1, 1, 1, 1], name="/conv/Conv"),
        helper.make_node("Reshape", ["timestep", "t_shape"], ["t4"], name="/t/Reshape"),
        helper.make_node("Mul", ["t4", "t_scale"], ["temb"], name="/t/Mul"),
        helper.make_node("ReduceMean", ["encoder_hidden_states"], ["cm"], axes=[1, 2], keepdims=1, name="/c/ReduceMean"),
        helper.make_node("Unsqueeze", ["cm", "axes3"], ["c4"], name="/c/Unsqueeze"),
        helper.make_node("Add", ["conv", "temb"], ["a"], name="/add0"),
        helper.make_node("Add", ["a", "c4"], ["noise_pred"], name="/add1"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "qdq_unet",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", CIN, H, W]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["batch", L, D])],
        [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, ["batch", COUT, H, W])],
        initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])  # 17: every TensorRT target parses it
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path)
    return path


IO = {
    "inputs": [{"name": "sample", "dtype": "float32", "shape": ["batch", CIN, H, W]},
               {"name": "timestep", "dtype": "float32", "shape": ["batch"]},
               {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["batch", L, D]}],
    "outputs": [{"name": "noise_pred", "dtype": "float32", "shape": ["batch", COUT, H, W]}],
}  # fmt: skip


@pytest.fixture(scope="module")
def local_profile():
    """The target profile of this machine: its Jetson profile, or `gpu` with this host's TensorRT and GPU."""
    trt = require_tensorrt(attempted="building a TensorRT engine")
    cc = compute_capability()
    if cc is None:
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    if l4t_release():
        matches = [
            t
            for t in list_targets()
            if load_target(t).jetpack and trt_matches_target(trt.__version__, load_target(t).trt_version)
        ]
        if not matches:
            pytest.skip(f"no Jetson profile for TensorRT {trt.__version__}")
        return load_target(matches[0])
    v = version_tuple(trt.__version__)
    return dataclasses.replace(load_target("gpu"), trt_version=f"{v[0]}.{v[1]}", compute_capability=(cc,),
                               typing="strong" if v >= (10, 12) else "weak")  # fmt: skip


def feed(batch: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, CIN, H, W)).astype(np.float32),
            "timestep": rng.integers(0, 1000, batch).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, L, D)).astype(np.float32)}  # fmt: skip


def run_engine(plan_file: Path, feeds: list[dict]) -> list[np.ndarray]:
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(plan_file.read_bytes())) as runner:
        return [np.array(runner.infer(f)["noise_pred"]) for f in feeds]


def run_ort(onnx_file: Path, feeds: list[dict]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the exact reference (O-5)
    sess = ort.InferenceSession(str(onnx_file), so, providers=["CPUExecutionProvider"])
    return [sess.run(["noise_pred"], f)[0] for f in feeds]


def test_engine_matches_onnxruntime_and_writes_its_manifest(tmp_path, local_profile):
    trt = require_tensorrt(attempted="building a TensorRT engine")
    src = qdq_unet(tmp_path / "export" / "model.onnx")
    write_manifest(src.parent, stage="export", recipe_fingerprint="ab" * 32, extra={"io": IO})
    plan = plan_build(local_profile, IO, batch_max=2)
    out = engine_from_onnx(src, plan, out_dir=tmp_path / "engine", progress=False)

    manifest = read_manifest(out, stage="build-trt")
    assert manifest["trt_version"] == trt.__version__ and manifest["compute_capability"] == compute_capability()
    assert manifest["recipe_fingerprint"] == "ab" * 32 and manifest["io"] == IO
    assert manifest["profiles"] == plan.profiles and manifest["engines"][0]["file"] == "unet.plan"
    layers = json.loads((out / "layers.json").read_text())
    assert all(isinstance(layer, dict) for layer in layers["Layers"])  # DETAILED verbosity
    audit = AuditReport.from_dict(manifest["audit"]["unet.plan"])
    assert audit.checked == ("/conv/Conv",), "the network's Q/DQ conv is what H-5 expects on an INT8 kernel"
    assert audit.quantized == ("/conv/Conv",), audit.summary()

    feeds = [feed(1), feed(2, seed=2), feed(4, seed=3)]  # min, opt, max of the profile
    for got, ref in zip(run_engine(out / "unet.plan", feeds), run_ort(src, feeds)):
        assert got.shape == ref.shape
        scale = float(ref.std())
        assert float(np.mean(np.abs(got - ref))) <= MEAN_ABS_MAX * scale
        assert float(np.max(np.abs(got - ref))) <= MAX_ABS_MAX * scale


def test_timing_cache_is_saved_with_its_key_and_reused(tmp_path, local_profile):
    src = qdq_unet(tmp_path / "model.onnx")
    plan = plan_build(local_profile, IO, batch_max=1)
    engine_from_onnx(src, plan, out_dir=tmp_path / "e1", progress=False)
    caches = list(tmp_path.glob("timing_trt*.cache"))
    assert len(caches) == 1 and caches[0].stat().st_size > 0
    key = json.loads(caches[0].with_name(caches[0].name + ".json").read_text())
    assert key["trt_version"] == plan.trt_version and key["compute_capability"] == compute_capability()
    engine_from_onnx(src, plan, out_dir=tmp_path / "e2", progress=False)  # loads the cache it wrote
    assert read_manifest(tmp_path / "e2")["timing_cache"] == caches[0].name
    caches[0].with_name(caches[0].name + ".json").write_text(json.dumps({**key, "cuda": "0.0"}))
    with pytest.raises(ManifestMismatch, match="was made for"):
        engine_from_onnx(src, plan, out_dir=tmp_path / "e3", progress=False)


def test_every_parser_error_is_reported(tmp_path, local_profile):
    src = qdq_unet(tmp_path / "model.onnx")
    model = onnx.load(str(src))
    model.graph.node.append(
        helper.make_node("NoSuchOp", ["noise_pred"], ["extra"], domain="quest.test", name="/bad/NoSuchOp")
    )
    model.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    model.opset_import.append(helper.make_opsetid("quest.test", 1))
    onnx.save_model(model, src)
    with pytest.raises(ExportError, match="cannot parse model.onnx") as e:
        engine_from_onnx(src, plan_build(local_profile, IO, batch_max=1), out_dir=tmp_path / "engine", progress=False)
    assert "NoSuchOp" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "engine").exists()


def test_bundle_builds_on_this_device(tmp_path, local_profile, capsys):
    spec = importlib.util.spec_from_file_location("bundle_tests", Path(__file__).with_name("test_bundle.py"))
    bundle_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bundle_tests)
    from quest_export.deploy.bundle import bundle_from_export

    export = bundle_tests.make_export(tmp_path / "export", local_profile.id)
    bundle = bundle_from_export(export, out=tmp_path / "bundle", target=local_profile)
    assert main([str(bundle), "--quiet"]) == 0
    assert "engine folder:" in capsys.readouterr().out
    engines_from_bundle(bundle, out_dir=tmp_path / "again", progress=False)
    manifest = read_manifest(tmp_path / "again", stage="build-trt")
    assert manifest["inputs"] == {"bundle": sha256_file(bundle / "manifest.json")}
    f = {k: np.asarray(v) for k, v in bundle_tests.load_json(bundle / "reference" / "inputs.json")[0].items()}
    got = run_engine(tmp_path / "again" / "unet.plan", [f])[0]
    ref = run_ort(bundle / "model.onnx", [f])[0]
    assert float(np.max(np.abs(got - ref))) <= MAX_ABS_MAX * float(ref.std())  # float graph: FP16 rounding only
