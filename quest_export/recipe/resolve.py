"""Merge recipe layers in a fixed order (later wins) and validate once.

    1. defaults, then the method's own defaults (recipe/methods.py)  2. precision preset (--bits)
    3. effort preset (--preset)  4. target profile  5. the user's recipe file (--recipe)
    6. command-line shortcuts and --set key=value

The method is read from the merged result (any layer may name it); its defaults are layer 1b.

The layers are plain dicts until the end, so one validation pass sees the final values.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from quest_export.errors import RecipeError, TargetError
from quest_export.recipe import presets
from quest_export.recipe.config import Recipe, to_jsonable
from quest_export.recipe.methods import get_method, method_names
from quest_export.recipe.targets import load_target, trt_version_tuple


def deep_merge(base: dict, layer: dict) -> dict:
    """Return base updated by layer, recursing into nested dicts."""
    out = copy.deepcopy(base)
    for k, v in layer.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_set(item: str) -> dict:
    """'quant.w_bits=4' -> {'quant': {'w_bits': 4}}; values are JSON where they parse, else strings."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key=value, for example --set quant.w_bits=4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise RecipeError(f"--set {item!r}: bad key {key!r}; use a dotted path such as quant.w_bits")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_recipe_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(
            f"recipe file {p} does not exist; write one with `quest-export build --dump-recipe > {p.name}`"
        )
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise RecipeError(f"recipe file {p} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {p} must hold a JSON object")
    return data


def target_layer(target_id: str) -> dict:
    """Layer 4: the profile itself plus the quantization settings it forces (quest.md 9.1, 9.4)."""
    profile = load_target(target_id)
    layer: dict = {"target": to_jsonable(profile)}
    if profile.symmetric_only:
        layer["quant"] = {"w_symmetric": True, "a_symmetric": True, "a_granularity": "per-tensor"}
    if not profile.attention_quant:
        layer.setdefault("quant", {})["attention_quant"] = False
    return layer


def merge_layers(
    *,
    bits: str | None = None,
    effort: str | None = None,
    target: str | None = None,
    recipe_file: str | Path | None = None,
    shortcuts: dict | None = None,
    sets: Iterable[str] = (),
) -> dict:
    """Merge layers 1-6 into one plain dict (not validated yet)."""
    kw = dict(bits=bits, effort=effort, target=target, recipe_file=recipe_file, shortcuts=shortcuts, sets=tuple(sets))
    data = _merge_layers(**kw, method_layer={})
    method = data.get("quant", {}).get("method")
    if method in method_names():  # an unknown name is refused by validation, with the list of methods
        layer = get_method(method).defaults_layer(effort)
        if layer:
            data = _merge_layers(**kw, method_layer=layer)
    return data


def _merge_layers(*, bits, effort, target, recipe_file, shortcuts, sets, method_layer: dict) -> dict:
    data = deep_merge(Recipe().to_dict(), method_layer)
    if bits is not None:
        data = deep_merge(data, _named(presets.BITS, bits, "--bits"))
    if effort is not None:
        data = deep_merge(data, _named(presets.EFFORT, effort, "--preset"))
    file_layer = load_recipe_file(recipe_file) if recipe_file is not None else {}
    set_layers = [parse_set(item) for item in sets]
    # the profile is loaded whole for the id that wins the merge order, so an id never relabels another profile
    tid = target or (shortcuts or {}).get("target") or data["target"]["id"]
    for layer in [file_layer, *set_layers]:
        tid = (layer.get("target") or {}).get("id", tid) if isinstance(layer.get("target"), dict) else tid
    data = deep_merge(data, target_layer(tid))
    data = deep_merge(data, file_layer)
    data = deep_merge(data, {k: v for k, v in (shortcuts or {}).items() if k != "target"})
    for layer in set_layers:
        data = deep_merge(data, layer)
    return data


def fill_method_defaults(data: dict, *, effort: str) -> None:
    """Fill the fields a merged recipe dict left at None from its method's declaration."""
    method = data["quant"]["method"]
    if method in method_names():
        get_method(method).fill_defaults(data, effort=effort)


def _named(table: dict, name: str, flag: str) -> dict:
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise RecipeError(f"{flag} {name!r} is not a preset; {hint}choose one of {', '.join(table)}")
    return table[name]


def check_target(recipe: Recipe) -> None:
    """Refuse a recipe the target cannot run, naming what the target can run (deploy.md section 1)."""
    t, q = recipe.target, recipe.quant
    where = f"target '{t.id}'"
    if t.is_tensorrt:
        if not (q.w_symmetric and q.a_symmetric):
            raise TargetError(f"{where} (TensorRT) accepts only symmetric zero-point-free grids; "
                              "set quant.w_symmetric=true quant.a_symmetric=true or use --target cpu")  # fmt: skip
        if q.a_granularity != "per-tensor":
            raise TargetError(f"{where} (TensorRT) needs per-tensor activation scales; set quant.a_granularity=per-tensor "
                              "or use --target cpu for per-channel A4")  # fmt: skip
        if q.attention_quant:
            raise TargetError(f"{where} (TensorRT) has no INT8 attention; set quant.attention_quant=false "
                              "or use --target cpu")  # fmt: skip
        if recipe.export.int4_gemm and "int4-gemm" not in t.quantized_types:
            raise TargetError(f"{where} (TensorRT {t.trt_version}) has no INT4 weights; set export.int4_gemm=false "
                              f"(W4 stays exact in an INT8 container) or use a TensorRT >= 10 target")  # fmt: skip
        if q.output_quant:
            raise TargetError(f"{where}: quant.output_quant (the QLinearConv form) is an ONNX Runtime CPU form; "
                              "TensorRT fuses input-only Q/DQ itself (E-15); set quant.output_quant=false")  # fmt: skip
        if recipe.export.scale_mode == "scale-input" and trt_version_tuple(t) < (8, 6):
            raise TargetError(
                f"{where}: scale-input mode needs TensorRT >= 8.6; use export.scale_mode=merged or per-group"
            )
    if q.output_quant and (q.w_bits not in (4, 8) or q.a_bits != 8):
        raise TargetError(f"quant.output_quant is the W8A8 / W4A8 ONNX Runtime speed form; {q.name} gains nothing "
                          "from it (deploy.md E-22); set quant.output_quant=false")  # fmt: skip


def build_recipe(data: dict) -> Recipe:
    recipe = Recipe.from_dict(data)
    check_target(recipe)
    return recipe


__all__ = [
    "build_recipe",
    "check_target",
    "deep_merge",
    "fill_method_defaults",
    "load_recipe_file",
    "merge_layers",
    "parse_set",
    "TargetError",
]
