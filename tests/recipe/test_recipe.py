"""Recipes (style.md section 3, quest.md 5.4, deploy.md section 1): JSON round trip, fingerprint, errors that
name the key and the fix, --set parsing, merge order, target profiles, target refusals and model defaults."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import pytest

from quest_export.errors import QuestExportError, RecipeError, TargetError
from quest_export.pipeline import resolve_recipe
from quest_export.recipe import config as C
from quest_export.recipe import presets
from quest_export.recipe.config import RECIPE_VERSION, LayerOverride, QuantRecipe, Recipe
from quest_export.recipe.resolve import build_recipe, check_target, merge_layers, parse_set
from quest_export.recipe.targets import ALIASES, list_targets, load_target, targets_dir

REPO = Path(__file__).resolve().parents[2]
TARGET_FILES = sorted(p.stem for p in (REPO / "quest_export" / "data" / "targets").glob("*.toml"))
BITS = [None, *presets.BITS]
EFFORTS = [None, *presets.EFFORT]


def resolved(*, bits=None, effort=None, target=None, recipe_file=None, shortcuts=None, sets=()) -> Recipe:
    return build_recipe(merge_layers(bits=bits, effort=effort, target=target, recipe_file=recipe_file,
                                     shortcuts=shortcuts, sets=sets))  # fmt: skip


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# -- JSON round trip ---------------------------------------------------------------------------------------------


def test_default_recipe_round_trips_exactly():
    r = Recipe()
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.from_dict(json.loads(r.to_json())) == r
    assert Recipe.from_dict(json.loads(r.to_json(indent=2))) == r
    assert Recipe.from_dict({}) == r  # every field has a default
    # finetune=None (QuEST finetuning skipped) survives the trip as None, not as a default FinetuneConfig
    no_ft = dataclasses.replace(r, finetune=None)
    assert Recipe.from_dict(json.loads(no_ft.to_json())) == no_ft
    assert no_ft.fingerprint() != r.fingerprint()


@pytest.mark.parametrize("bits,effort", list(itertools.product(BITS, EFFORTS)))
def test_every_preset_combination_round_trips(bits, effort):
    for target in TARGET_FILES:
        r = resolved(bits=bits, effort=effort, target=target)
        text = r.to_json()
        assert Recipe.from_dict(r.to_dict()) == r, target
        back = Recipe.from_dict(json.loads(text))
        assert back == r, target
        assert back.to_json() == text and back.fingerprint() == r.fingerprint(), target
        # canonical form: sorted keys, no whitespace
        assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
        # the layers really applied
        assert r.target == load_target(target)
        if bits is not None:
            bq = presets.BITS[bits]["quant"]
            assert (r.quant.w_bits, r.quant.a_bits) == (bq["w_bits"], bq["a_bits"])
            sym = r.target.symmetric_only  # a TensorRT target forces symmetric grids over the preset's
            assert r.quant.a_symmetric == (sym or bq.get("a_symmetric", True)), target
        if effort is not None:
            assert r.finetune.preset == effort
            assert r.ptq.adaround_iters == presets.EFFORT[effort]["ptq"]["adaround_iters"]
            assert r.calib.samples_per_group == presets.EFFORT[effort]["calib"]["samples_per_group"]


def test_precision_presets_are_the_named_values():
    for name, value in (("w8a8", presets.W8A8), ("w4a8", presets.W4A8), ("w4a4", presets.W4A4)):
        assert QuantRecipe(**presets.BITS[name]["quant"]) == value
        assert value.name == name


def test_w4a4_is_asymmetric_where_the_target_allows_it():
    """W4A4 defaults to zero points on ONNX Runtime; TensorRT targets force symmetric grids back."""
    cpu = resolved(bits="w4a4", target="cpu").quant
    assert (cpu.w_symmetric, cpu.a_symmetric) == (False, False)
    for target in ("gpu", "jetson"):
        q = resolved(bits="w4a4", target=target).quant
        assert (q.w_symmetric, q.a_symmetric) == (True, True), target
    assert resolved(bits="w4a8", target="cpu").quant.a_symmetric is True  # 8-bit activations stay symmetric


# -- fingerprint -------------------------------------------------------------------------------------------------


def test_fingerprint_is_sha256_of_canonical_json():
    r = resolved(bits="w4a8", effort="paper", target="jetson")
    assert r.fingerprint() == hashlib.sha256(r.to_json().encode()).hexdigest()
    # independent of the key order of the input dict
    rev = json.loads(r.to_json(), object_pairs_hook=lambda kv: dict(reversed(kv)))
    assert list(rev) != sorted(rev)
    assert Recipe.from_dict(rev).fingerprint() == r.fingerprint()


def test_fingerprint_is_stable_across_processes():
    cases = [dict(), dict(bits="w4a4", effort="paper", target="jetson"), dict(bits="w4a8", target="gpu")]
    code = textwrap.dedent("""
        import json, sys
        from quest_export.recipe.config import Recipe
        from quest_export.recipe.resolve import build_recipe, merge_layers
        cases = json.loads(sys.argv[1])
        print(json.dumps([Recipe().fingerprint()] + [build_recipe(merge_layers(**c)).fingerprint() for c in cases]))
    """)
    here = [Recipe().fingerprint()] + [resolved(**c).fingerprint() for c in cases]
    for seed in ("0", "12345"):  # a different str-hash seed must not change anything
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True, env=env,
                              cwd=REPO, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.splitlines()[-1]) == here


def _leaves(d: dict, prefix: tuple = ()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _field_type(path: tuple):
    cls, tp = Recipe, None
    for part in path:
        tp = get_type_hints(cls)[part]
        if get_origin(tp) is not None and type(None) in get_args(tp):  # Optional[X] -> X
            tp = next(a for a in get_args(tp) if a is not type(None))
        cls = tp
    return tp


def _leaf_field_count(cls) -> int:
    n = 0
    for f in dataclasses.fields(cls):
        tp = _field_type((f.name,)) if cls is Recipe else get_type_hints(cls)[f.name]
        n += _leaf_field_count(tp) if dataclasses.is_dataclass(tp) else 1
    return n


_CHOICES = [getattr(C, n) for n in dir(C) if n.isupper() and isinstance(getattr(C, n), tuple)]


def _candidates(tp, v):
    """Values to try instead of v; at least one must be valid for every field."""
    if tp is bool:
        return [not v] if v is not None else [True]
    if tp is int:
        base = v or 0
        return [c for c in (base + 1, base - 1, 2, 8, 16, 17, 64, 128) if c != v]
    if tp is float:
        return [c for c in ((v or 0) * 2 + 0.5, 0.5, 0.25) if c != v]
    if tp is str:
        pool = [c for choices in _CHOICES for c in choices if isinstance(c, str)]
        return [c for c in pool if c != v] + [f"{v or ''}x"]
    if get_origin(tp) is tuple:
        if v:
            return [v[:-1]]
        return [[{"pattern": "conv_in"}]] if get_args(tp)[0] is LayerOverride else [["x"]]
    raise AssertionError(f"no candidates for type {tp}")


def test_fingerprint_changes_with_every_field():
    base = resolved()
    data = base.to_dict()
    assert len(list(_leaves(data))) == _leaf_field_count(Recipe)  # to_dict holds every field of the tree
    for path, value in _leaves(data):
        if path == ("version",):
            continue
        changed = None
        for cand in _candidates(_field_type(path), value):
            d = json.loads(json.dumps(data))
            node = d
            for p in path[:-1]:
                node = node[p]
            node[path[-1]] = cand
            try:
                changed = Recipe.from_dict(d)
            except RecipeError:
                continue
            break
        assert changed is not None, f"no valid alternative value found for {'.'.join(path)}"
        assert changed.fingerprint() != base.fingerprint(), f"fingerprint ignores {'.'.join(path)}"
        if len(path) > 1:  # the cache key of the sub-config changes too
            assert changed.stage_key(path[0]) != base.stage_key(path[0]), f"stage_key ignores {'.'.join(path)}"


# -- unknown keys and bad values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("data,bad,suggestion", [
    ({"quantt": {}}, "'quantt'", "did you mean 'quant'?"),
    ({"devise": "cpu"}, "'devise'", "did you mean 'device'?"),
    ({"quant": {"w_bit": 4}}, "'quant.w_bit'", "did you mean 'quant.w_bits'?"),
    ({"ptq": {"adaround_iter": 4}}, "'ptq.adaround_iter'", "did you mean 'ptq.adaround_iters'?"),
    ({"target": {"max_opsets": 4}}, "'target.max_opsets'", "did you mean 'target.max_opset'?"),
    ({"quant": {"overrides": [{"pattern": "x", "a_bit": 8}]}}, "'quant.overrides[0].a_bit'",
     "did you mean 'quant.overrides[0].a_bits'?"),
])  # fmt: skip
def test_unknown_key_names_the_key_and_the_close_match(data, bad, suggestion):
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict(data)
    msg = str(e.value)
    assert f"unknown recipe key {bad}" in msg and suggestion in msg


def test_unknown_key_without_close_match_lists_known_keys():
    with pytest.raises(RecipeError, match=r"unknown recipe key 'quant.zzzzzz'; known keys: method, w_bits, a_bits"):
        Recipe.from_dict({"quant": {"zzzzzz": 1}})


def test_unknown_key_from_set_reaches_the_user_with_its_path():
    with pytest.raises(RecipeError, match=r"'calib.sample_per_group'; did you mean 'calib.samples_per_group'\?"):
        resolved(sets=["calib.sample_per_group=8"])


@pytest.mark.parametrize("data,message", [
    ({"quant": {"method": "foo"}}, "quant.method='foo' is not allowed; choose one of ptq, qdiffusion, quest, dmq, dmq+quest"),
    ({"quant": {"w_bits": 1}}, "quant.w_bits=1 is out of range; allowed 2..16"),
    ({"quant": {"a_bits": 17}}, "quant.a_bits=17 is out of range; allowed 2..16"),
    ({"quant": {"overrides": [{"w_bits": 9}]}}, "quant.overrides[0].w_bits=9 is out of range; allowed 2..8"),
    ({"quant": {"w_granularity": "per-group"}},
     "quant.w_granularity='per-group' is not allowed; choose one of per-channel, per-tensor"),
    ({"quant": {"a_granularity": "per-token"}},
     "quant.a_granularity='per-token' is not allowed; choose one of per-tensor, per-channel"),
    ({"quant": {"softmax_bits": 4}}, "quant.softmax_bits=4 is not allowed; choose one of 8, 16"),
    ({"quant": {"first_last": "fp16"}}, "quant.first_last='fp16' is not allowed; choose one of a8, quantized, fp, w8a8"),
    ({"device": "tpu"}, "device='tpu' is not allowed; choose one of auto, cpu, cuda"),
    ({"sampler": {"sampler": "plms"}}, "sampler.sampler='plms' is not allowed; choose one of ddim, ddpm"),
    ({"export": {"scale_mode": "dynamic"}}, "export.scale_mode='dynamic' is not allowed; choose one of merged, per-group"),
    ({"quant": {"w_bits": "four"}}, "quant.w_bits='four' is not an integer"),
    ({"quant": {"w_bits": True}}, "quant.w_bits=True is not an integer"),
    ({"quant": {"attention_quant": "maybe"}}, "quant.attention_quant='maybe' is not a boolean"),
])  # fmt: skip
def test_bad_value_names_the_full_path_and_the_allowed_values(data, message):
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict(data)
    assert message in str(e.value)


# -- --set parsing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("item,expected", [
    ("quant.w_bits=4", {"quant": {"w_bits": 4}}),
    ("ptq.adaround_lr=1e-4", {"ptq": {"adaround_lr": 1e-4}}),
    ("quant.attention_quant=false", {"quant": {"attention_quant": False}}),
    ("finetune=null", {"finetune": None}),
    ("finetune.c_layers=[\"*.ff.net.2\", \"*.to_q\"]", {"finetune": {"c_layers": ["*.ff.net.2", "*.to_q"]}}),
    ("quant.method=quest", {"quant": {"method": "quest"}}),  # not JSON: a plain string
    ("model.name=/data/my model=v2", {"model": {"name": "/data/my model=v2"}}),  # split at the first '='
    (" device =cpu", {"device": "cpu"}),
    ("target.trt_version=\"10.3\"", {"target": {"trt_version": "10.3"}}),
])  # fmt: skip
def test_parse_set_values(item, expected):
    assert parse_set(item) == expected


@pytest.mark.parametrize("item,match", [
    ("quant.w_bits", "expected key=value"),
    ("=4", "bad key ''"),
    ("quant..w_bits=4", "bad key 'quant..w_bits'"),
    (".w_bits=4", "bad key '.w_bits'"),
    ("quant.=4", "bad key 'quant.'"),
])  # fmt: skip
def test_parse_set_bad_syntax(item, match):
    with pytest.raises(RecipeError, match=match) as e:
        parse_set(item)
    assert "--set" in str(e.value)


def test_set_builds_typed_values_lists_and_overrides():
    r = resolved(sets=['quant.overrides=[{"pattern": "conv_in", "w_bits": 8}, {"pattern": "*.to_q", "quantize": false}]',
                       "finetune.c_layers=*.ff.net.2,*.to_q", "quant.split_shortcut=off", "sampler.eta=0.5"])  # fmt: skip
    assert r.quant.overrides == (
        LayerOverride(pattern="conv_in", w_bits=8),
        LayerOverride(pattern="*.to_q", quantize=False),
    )
    assert r.finetune.c_layers == ("*.ff.net.2", "*.to_q")  # comma-separated string -> tuple
    assert r.quant.split_shortcut is False
    assert r.sampler.eta == 0.5
    assert resolved(sets=["finetune=null"]).finetune is None


def test_later_set_wins():
    assert resolved(sets=["quant.w_bits=4", "quant.w_bits=6"]).quant.w_bits == 6


# -- merge order: defaults < preset < target < recipe file < shortcuts/--set --------------------------------------


def test_merge_order(tmp_path):
    f = write_json(tmp_path / "r.json", {"quant": {"a_bits": 8, "attention_quant": True}, "ptq": {"adaround_iters": 7},
                                         "target": {"max_batch": 2}})  # fmt: skip
    data = merge_layers(bits="w4a4", effort="paper", target="gpu", recipe_file=f)
    assert data["quant"]["w_bits"] == 4  # preset over defaults
    assert data["quant"]["a_bits"] == 8  # file over preset
    assert data["ptq"]["adaround_iters"] == 7  # file over preset
    assert data["ptq"]["act_recon_iters"] == presets.EFFORT["paper"]["ptq"]["act_recon_iters"]  # preset over defaults
    assert data["target"]["trt_version"] == load_target("gpu").trt_version  # target over defaults
    assert data["target"]["max_batch"] == 2  # file over target
    assert data["quant"]["attention_quant"] is True  # file over the setting the target forces...
    with pytest.raises(TargetError, match="attention"):  # ...and the one validation pass sees the final value
        build_recipe(data)
    data = merge_layers(bits="w4a4", target="gpu", recipe_file=f, sets=["target.max_batch=3", "quant.a_bits=6"])
    assert data["target"]["max_batch"] == 3 and data["quant"]["a_bits"] == 6  # --set over file
    # without the file, the target's forced settings win over the defaults
    assert merge_layers(target="gpu")["quant"]["attention_quant"] is False
    # command-line shortcuts (--method, --model) are layer 6 as well; --set comes after them
    data = merge_layers(shortcuts={"quant": {"method": "ptq"}}, sets=["quant.method=qdiffusion"])
    assert data["quant"]["method"] == "qdiffusion"
    assert merge_layers(shortcuts={"quant": {"method": "ptq"}}, recipe_file=write_json(
        tmp_path / "m.json", {"quant": {"method": "quest"}}))["quant"]["method"] == "ptq"  # fmt: skip


def test_recipe_file_selects_the_target_profile(tmp_path):
    f = write_json(tmp_path / "r.json", {"target": {"id": "jetson-orin-jp60"}})
    assert resolved(recipe_file=f).target == load_target("jetson-orin-jp60")


def test_unknown_preset_suggests_close_name():
    with pytest.raises(RecipeError, match=r"--bits 'w4a9' is not a preset; did you mean 'w4a8'\?"):
        merge_layers(bits="w4a9")
    with pytest.raises(RecipeError, match=r"--preset 'papper' is not a preset; did you mean 'paper'\?"):
        merge_layers(effort="papper")


@pytest.mark.parametrize("how", ["set", "file-under-target"])
def test_target_id_always_loads_its_own_profile(how, tmp_path):
    if how == "set":
        r = resolved(sets=["target.id=gpu"])
    else:
        r = resolved(target="cpu", recipe_file=write_json(tmp_path / "r.json", {"target": {"id": "gpu"}}))
    assert r.target.id == "gpu"
    assert r.target.runtime == load_target("gpu").runtime  # today: 'ort' from the cpu profile under the id 'gpu'


# -- target profiles ----------------------------------------------------------------------------------------------


def test_every_profile_file_loads():
    assert list_targets() == TARGET_FILES and len(TARGET_FILES) >= 6
    for tid in TARGET_FILES:
        p = load_target(tid)
        assert p.id == tid
        assert p.is_tensorrt == (p.runtime == "tensorrt")


def test_jetson_alias_resolves_to_jp61():
    assert ALIASES["jetson"] == "jetson-orin-jp61"
    assert load_target("jetson") == load_target("jetson-orin-jp61")
    assert resolved(target="jetson").target.id == "jetson-orin-jp61"


@pytest.mark.parametrize("name,close", [("gpux", "gpu"), ("jetson-orin-jp5", "jetson-orin-jp51"),
                                        ("jetson-thor", "jetson-thor-jp7"), ("jetsn", "jetson")])  # fmt: skip
def test_unknown_target_suggests_close_id(name, close):
    with pytest.raises(TargetError) as e:
        load_target(name)
    msg = str(e.value)
    assert f"unknown target '{name}'; did you mean '{close}'?" in msg
    assert "known targets: " in msg and "jetson-orin-jp61" in msg


def test_profile_id_must_equal_file_name(tmp_path, monkeypatch):
    shutil.copy(REPO / "quest_export" / "data" / "targets" / "cpu.toml", tmp_path / "mycpu.toml")
    shutil.copy(REPO / "quest_export" / "data" / "targets" / "gpu.toml", tmp_path / "gpu.toml")
    monkeypatch.setenv("QUEST_EXPORT_TARGETS", str(tmp_path))
    assert targets_dir() == tmp_path
    assert list_targets() == ["gpu", "mycpu"]
    assert load_target("gpu").id == "gpu"
    with pytest.raises(TargetError, match=r"declares id='cpu'; it must equal its file name 'mycpu'"):
        load_target("mycpu")


def test_broken_profiles_are_refused_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("QUEST_EXPORT_TARGETS", str(tmp_path))
    (tmp_path / "bad.toml").write_text('id = "bad"\nruntime = "tvm"\n')
    with pytest.raises(TargetError) as e:
        load_target("bad")
    assert "bad.toml" in str(e.value) and "target.runtime='tvm' is not allowed; choose one of ort, tensorrt" in str(
        e.value
    )
    (tmp_path / "broken.toml").write_text('id = "broken\n')
    with pytest.raises(TargetError, match=r"broken.toml is not valid TOML"):
        load_target("broken")
    (tmp_path / "typo.toml").write_text('id = "typo"\nmax_opsets = 17\n')
    with pytest.raises(
        TargetError, match=r"typo.toml: unknown recipe key 'target.max_opsets'; did you mean 'target.max_opset'"
    ):
        load_target("typo")


# deploy.md section 1: TRT version, opset cap, typing and compute capabilities per profile
DEPLOY_TABLE = {
    # id: (runtime, trt_version, compute capabilities, max_opset, int4_opset, ir, typing, quantized_types, jetpack, cuda)
    "cpu": ("ort", None, (), 21, 21, 10, "none", ("int8", "int4-weight", "int4-act"), None, None),
    "gpu": ("tensorrt", "10.13", ("8.0", "8.6", "8.9", "9.0", "10.0"), 21, 21, 10, "strong",
            ("int8", "int4-gemm", "fp8"), None, "12.9"),
    "jetson-orin-jp51": ("tensorrt", "8.5.2", ("8.7", "7.2"), 17, 0, 8, "weak", ("int8",), "5.1", "11.4"),
    "jetson-orin-jp60": ("tensorrt", "8.6.2", ("8.7",), 17, 0, 8, "weak", ("int8",), "6.0", "12.2"),
    "jetson-orin-jp61": ("tensorrt", "10.3", ("8.7",), 20, 21, 9, "weak", ("int8", "int4-gemm"), "6.1", "12.6"),
    "jetson-thor-jp7": ("tensorrt", "10.13.3", ("11.0",), 21, 21, 10, "strong", ("int8", "int4-gemm", "fp8", "nvfp4"),
                        "7.0", "13.0"),
}  # fmt: skip


@pytest.mark.parametrize("tid", sorted(DEPLOY_TABLE))
def test_profile_values_match_deploy_table(tid):
    p = load_target(tid)
    runtime, trt, cc, opset, int4_opset, ir, typing, qtypes, jetpack, cuda = DEPLOY_TABLE[tid]
    assert (p.runtime, p.trt_version, p.compute_capability) == (runtime, trt, cc)
    assert (p.max_opset, p.int4_opset, p.ir_version, p.typing) == (opset, int4_opset, ir, typing)
    assert (p.quantized_types, p.jetpack, p.cuda) == (qtypes, jetpack, cuda)
    if p.is_tensorrt:  # E-1 and quest.md 2.6: symmetric only, attention kept in FP16
        assert p.symmetric_only and not p.attention_quant and not p.native_a4
        assert "fp8" not in p.quantized_types or tid in ("gpu", "jetson-thor-jp7")  # Orin has no FP8
    else:
        assert not p.symmetric_only and p.attention_quant and p.native_a4
    assert p.on_device_build == tid.startswith("jetson")


def test_profile_table_covers_every_profile():
    assert sorted(DEPLOY_TABLE) == TARGET_FILES


# -- check_target refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("target,sets,match", [
    ("gpu", ["quant.a_symmetric=false"], r"TensorRT\) accepts only symmetric"),
    ("jetson", ["quant.w_symmetric=false"], r"TensorRT\) accepts only symmetric"),
    ("gpu", ["quant.attention_quant=true"], r"TensorRT\) has no INT8 attention; set quant.attention_quant=false"),
    ("jetson-orin-jp60", ["quant.a_bits=4", "quant.a_granularity=per-channel"],
     r"needs per-tensor activation scales; set quant.a_granularity=per-tensor"),
    ("jetson-orin-jp51", ["export.int4_gemm=true"], r"TensorRT 8.5.2\) has no INT4 weights; set export.int4_gemm=false"),
    ("jetson-orin-jp60", ["export.int4_gemm=true"], r"TensorRT 8.6.2\) has no INT4 weights"),
    ("gpu", ["quant.output_quant=true"], r"quant.output_quant \(the QLinearConv form\) is an ONNX Runtime CPU form"),
    ("jetson-thor-jp7", ["quant.output_quant=true"], r"set quant.output_quant=false"),
    ("cpu", ["quant.output_quant=true", "quant.a_bits=4"], r"output_quant is the W8A8 / W4A8 ONNX Runtime speed form; w8a4"),
    ("cpu", ["quant.output_quant=true", "quant.w_bits=6"], r"speed form; w6a8 gains nothing"),
    ("jetson-orin-jp51", ["export.scale_mode=scale-input"], r"scale-input mode needs TensorRT >= 8.6"),
])  # fmt: skip
def test_check_target_refusals(target, sets, match):
    with pytest.raises(TargetError, match=match) as e:
        resolved(target=target, sets=sets)
    assert isinstance(e.value, QuestExportError) and e.value.exit_code == 2


@pytest.mark.parametrize("target,sets", [
    ("gpu", ["export.int4_gemm=true"]),
    ("jetson", ["export.int4_gemm=true"]),
    ("cpu", ["quant.output_quant=true"]),  # the fused in/out form: W8A8 on ONNX Runtime
    ("cpu", ["quant.output_quant=true", "quant.w_bits=4"]),  # W4A8: INT4 widened to INT8 at load (issue 17)
    ("cpu", ["quant.a_symmetric=false", "quant.a_bits=4", "quant.a_granularity=per-channel"]),
    ("jetson-orin-jp60", ["export.scale_mode=scale-input"]),  # TensorRT 8.6.2
    ("gpu", ["quant.a_bits=4"]),  # A4 in the INT8 container
])  # fmt: skip
def test_check_target_accepts_what_the_target_runs(target, sets):
    r = resolved(target=target, sets=sets)
    check_target(r)  # idempotent on a built recipe


# -- resolve_recipe: model defaults ------------------------------------------------------------------------------


def test_resolve_fills_sampler_and_family_from_the_bundled_model():
    zoo = REPO / "quest_export" / "zoo" / "models"
    for name in ("fmnist-cond", "fmnist-uncond"):
        meta = json.loads((zoo / name / "quest_model.json").read_text())
        r = resolve_recipe(model=name)
        assert dataclasses.asdict(r.sampler) == {"clip_output": True, **meta["sampling"]}  # images: clamped
        assert r.model.family == meta["family"]
    assert resolve_recipe().model.name == "fmnist-cond"
    assert (
        resolve_recipe().sampler.guidance_scale == 2.0
        and resolve_recipe(model="fmnist-uncond").sampler.guidance_scale == 1.0
    )


@pytest.mark.parametrize("kw,groups", [
    (dict(method="ptq"), 1),
    (dict(method="qdiffusion"), 1),
    (dict(method="ptq", preset="paper"), 1),
    (dict(method="quest"), 10),  # fast (the default effort)
    (dict(method="quest", preset="fast"), 10),
    (dict(method="quest", preset="paper"), 25),  # quest.md 3.2: 25 groups for a 50-step sampler
    (dict(method="quest", preset="paper", sets=["sampler.steps=20"]), 20),
    (dict(method="dmq", preset="paper", sets=["sampler.steps=40"]), 20),
    (dict(method="quest", sets=["sampler.steps=4"]), 4),  # never more groups than steps
    (dict(method="quest", preset="paper", sets=["quant.timestep_groups=7"]), 7),  # the user's value wins
    (dict(method="ptq", sets=["quant.timestep_groups=3"]), 3),
])  # fmt: skip
def test_resolve_default_timestep_groups(kw, groups):
    r = resolve_recipe(**kw)
    assert r.quant.timestep_groups == groups


def test_resolve_method_defaults_and_user_values():
    ptq, quest = resolve_recipe(method="ptq"), resolve_recipe(method="quest")
    assert (ptq.quant.split_shortcut, ptq.ptq.weight_init, ptq.ptq.adaround) == (False, "absmax", False)
    assert (quest.quant.split_shortcut, quest.ptq.weight_init, quest.ptq.adaround) == (True, "mse", True)
    user = resolve_recipe(method="quest", sets=["quant.split_shortcut=false", "ptq.weight_init=absmax", "ptq.adaround=false",
                                                "sampler.steps=12", "sampler.guidance_scale=3.5", "model.family=text"])  # fmt: skip
    assert (user.quant.split_shortcut, user.ptq.weight_init, user.ptq.adaround) == (False, "absmax", False)
    assert (user.sampler.steps, user.sampler.guidance_scale, user.sampler.sampler) == (12, 3.5, "ddim")
    assert user.model.family == "text"


def test_resolve_paper_b_epochs_per_family_and_user_value(tmp_path):
    assert resolve_recipe(preset="paper").finetune.b_epochs == presets.PAPER_B_EPOCHS["class-cond"] == 300
    assert (
        resolve_recipe(preset="paper", model="fmnist-uncond").finetune.b_epochs
        == presets.PAPER_B_EPOCHS["uncond"]
        == 200
    )
    fast = presets.EFFORT["fast"]["finetune"]["b_epochs"]
    assert resolve_recipe(preset="fast", model="fmnist-uncond").finetune.b_epochs == fast  # paper only
    assert resolve_recipe(preset="paper", sets=["finetune.b_epochs=7"]).finetune.b_epochs == 7
    f = write_json(tmp_path / "r.json", {"finetune": {"b_epochs": 9}})
    assert resolve_recipe(preset="paper", model="fmnist-uncond", recipe=str(f)).finetune.b_epochs == 9


def test_resolve_is_reproducible_from_its_dump(tmp_path):
    r = resolve_recipe(bits="w4a8", preset="paper", method="quest", target="jetson", sets=["calib.seed=3"])
    f = tmp_path / "resolved.json"
    f.write_text(r.to_json(indent=2))
    assert resolve_recipe(recipe=str(f)) == r
    assert resolve_recipe(recipe=str(f)).fingerprint() == r.fingerprint()


def test_newer_recipe_version_is_refused(tmp_path):
    f = write_json(tmp_path / "new.json", {"version": RECIPE_VERSION + 1})
    with pytest.raises(
        RecipeError, match=f"recipe version {RECIPE_VERSION + 1} .*upgrade quest-export to read this recipe"
    ):
        resolve_recipe(recipe=str(f))
    with pytest.raises(RecipeError, match="upgrade quest-export"):
        Recipe.from_dict({"version": RECIPE_VERSION + 1})


def test_bad_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        resolve_recipe(recipe=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RecipeError, match=r"bad.json is not valid JSON"):
        resolve_recipe(recipe=str(tmp_path / "bad.json"))
    with pytest.raises(RecipeError, match="must hold a JSON object"):
        resolve_recipe(recipe=str(write_json(tmp_path / "list.json", [1, 2])))


def test_w4a6_preset_resolves_for_every_target():
    """DMQ's headline setting (quest.md 7.6): 6-bit per-tensor activations, exported in an INT8 container."""
    for target in ("cpu", "jetson", "jetson-orin-jp51", "gpu"):
        q = resolve_recipe(bits="w4a6", target=target).quant
        assert (q.w_bits, q.a_bits, q.a_granularity, q.name) == (4, 6, "per-tensor", "w4a6")
