"""Graphs with external data (issue 15): `export.external_data=always` forces on a tiny UNet what the SD-1.5-size
graph gets past 256 MiB; the graph loads, ONNX Runtime builds it, the Jetson bundle carries and checks the data file,
and verify passes. The helpers that let onnx's checker, shape inference and version converter run on a proto past
2 GB (weights lifted out and put back) are checked to change nothing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from quest_export_runtime.manifest import read_manifest, verify_files

from quest_export.deploy.bundle import bundle_from_export
from quest_export.deploy.ort import ort_engine_from_export
from quest_export.export import graph as G
from quest_export.export.exporter import onnx_from_artifact
from quest_export.export.lint import lint_model
from quest_export.recipe.config import ExportConfig
from quest_export.recipe.targets import load_target
from quest_export.verify.harness import verify_build
from quest_export.zoo.architectures import SCHEDULER_CONFIG
from tests.export.test_export import FINGERPRINT, workshop_for


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    return workshop_for(tmp_path_factory)


def _export(shop, tmp_path, target_id: str):
    out = tmp_path / f"export-{target_id}"
    onnx_from_artifact(shop.artifact_for("cond", (8, 8), target_id), target=load_target(target_id),
                       cfg=ExportConfig(external_data="always"), out=out, calib=shop.calib("cond"),
                       recipe_fingerprint=FINGERPRINT, scheduler_config=SCHEDULER_CONFIG)  # fmt: skip
    return out


def _locations(path) -> set[str]:
    m = onnx.load(str(path), load_external_data=False)
    return {e.value for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}  # fmt: skip


def test_forced_external_data_exports_builds_and_verifies(shop, tmp_path):
    exp = _export(shop, tmp_path, "cpu")
    man = read_manifest(exp, stage="export")
    assert man["external_data"] == "model.onnx.data" and "model.onnx.data" in man["files"]
    assert _locations(exp / "model.onnx") == {"model.onnx.data"}
    assert (exp / "model.onnx.data").stat().st_size > 0  # initializers of 1 KiB and more; small scales stay inline
    m = onnx.load(str(exp / "model.onnx"))  # loads its data from beside it
    onnx.checker.check_model(str(exp / "model.onnx"), full_check=True)
    assert not lint_model(m, load_target("cpu")).errors
    build = tmp_path / "build"
    ort_engine_from_export(exp, out=build, target=load_target("cpu"))
    bman = read_manifest(build, stage="build-ort")
    verify_files(build, bman)
    assert "model.onnx.data" not in bman["files"]  # the export's data file goes with the export's graph
    assert bman["external_data"] in bman["files"] and _locations(build / "model.opt.onnx") == {bman["external_data"]}
    rep = verify_build(build, quantized=shop.artifact_for("cond", (8, 8), "cpu"), show_progress=False)
    assert rep["passed"], rep


def test_bundle_carries_hashes_and_checks_external_data(shop, tmp_path):
    exp = _export(shop, tmp_path, "jetson-orin-jp61")
    out = bundle_from_export(exp, out=tmp_path / "bundle", target=load_target("jetson-orin-jp61"))
    man = read_manifest(out, stage="bundle")
    verify_files(out, man)
    assert "model.onnx.data" in man["files"] and man["size_bytes"] > (out / "model.onnx.data").stat().st_size
    sh = (out / "build.sh").read_text()
    assert "[ -f model.onnx.data ]" in sh and man["files"]["model.onnx.data"] in sh
    assert sh.index("model.onnx.data") < sh.index('"$TRTEXEC"')  # checked before trtexec runs
    assert "Size:" in (out / "README.md").read_text()
    assert not lint_model(str(out / "model.onnx"), load_target("jetson-orin-jp61")).errors


def _toy() -> onnx.ModelProto:
    w = numpy_helper.from_array((np.arange(4096, dtype="float32").reshape(64, 64)), "w")
    shape = numpy_helper.from_array(np.array([1, 64], dtype="int64"), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["xr"]), helper.make_node("MatMul", ["xr", "w"], ["y"])]
    g = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w, shape])  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_strip_restore_and_large_helpers_change_nothing(tmp_path):
    m = _toy()
    before = m.SerializeToString()
    stash = G.strip(m)
    assert set(stash) == {"w"} and m.graph.initializer[0].data_location == TensorProto.EXTERNAL
    G.restore(m, stash)
    assert m.SerializeToString() == before
    G.check_model_large(m)
    G.check_model_large(m, limit=0)  # the route of graphs past 256 MiB: checked from a file with external data
    assert m.SerializeToString() == before
    conv = G.convert_version_large(m, 21)
    assert conv.opset_import[0].version == 21 and m.SerializeToString() == before
    assert numpy_helper.to_array(conv.graph.initializer[0]).sum() == sum(range(4096))
    assert G.save_graph(m, tmp_path / "m.onnx", external=True) == "m.onnx.data"
    assert m.SerializeToString() == before  # the writer leaves the proto as it was
    back = onnx.load(str(tmp_path / "m.onnx"))
    assert (
        numpy_helper.to_array(back.graph.initializer[0]).tolist()
        == numpy_helper.to_array(m.graph.initializer[0]).tolist()
    )
