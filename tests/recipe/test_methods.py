"""The method registry (recipe/methods.py): one declaration per method, its defaults resolved once, and no
other module branching on a method's name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from quest_export.errors import RecipeError
from quest_export.pipeline import resolve_recipe
from quest_export.recipe.config import METHODS, QuantRecipe
from quest_export.recipe.methods import get_method, method_names

REPO = Path(__file__).resolve().parents[2]


def test_every_method_is_registered_and_accepted_by_the_recipe():
    assert method_names() == METHODS == ("ptq", "qdiffusion", "quest", "dmq", "dmq+quest")
    for name in METHODS:
        assert get_method(name).name == name
        QuantRecipe(method=name)  # validates
    with pytest.raises(RecipeError, match=r"quant.method='dqm' is not a method; did you mean 'dmq'\?"):
        get_method("dqm")


# a branch on a method's name: `method == "quest"`, `method in ("ptq", ...)`, `.method != 'dmq'`
BRANCH = re.compile(r"""method\s*(==|!=|\bin\b|\bnot in\b)\s*[\(\[\{]?\s*["'](ptq|qdiffusion|quest|dmq)""")


def test_no_module_outside_the_registry_branches_on_a_method_name():
    hits = []
    for root in ("quest_export", "cli"):
        for f in sorted((REPO / root).rglob("*.py")):
            if f.name == "methods.py" and f.parent.name == "recipe":
                continue
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if BRANCH.search(line):
                    hits.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert not hits, "branch on the method name outside recipe/methods.py:\n" + "\n".join(hits)
    assert BRANCH.search('if recipe.quant.method == "quest":') and BRANCH.search("m.method in ('ptq', 'x')")


def test_dmq_defaults_are_a_layer_under_every_user_layer():
    r = resolve_recipe(method="dmq")
    q = r.quant
    assert (q.first_last, q.attention_quant) == ("fp", False)  # quest.md 2.7: DMQ's high-precision set
    assert [(o.pattern, o.quantize) for o in q.overrides] == [("time_embedding.*", False), ("*time_emb_proj", False)]
    assert (q.timestep_groups, q.split_shortcut, r.ptq.adaround, r.ptq.weight_init) == (10, True, True, "mse")
    assert r.dmq.les_iters == 200 and resolve_recipe(method="dmq", preset="paper").dmq.les_iters == 6000
    user = resolve_recipe(method="dmq", preset="paper", sets=["quant.first_last=a8", "dmq.les_iters=7"])
    assert user.quant.first_last == "a8" and user.dmq.les_iters == 7  # --set wins over the method's layer
    both = resolve_recipe(method="dmq+quest")  # QuEST's precision policy: Stage B needs a quantized time embedding
    assert (both.quant.first_last, both.quant.overrides, both.quant.attention_quant) == ("a8", (), True)
    assert resolve_recipe(method="quest").quant.first_last == "a8"


def test_dmq_dump_reproduces_the_recipe(tmp_path):
    r = resolve_recipe(method="dmq", bits="w4a8", target="jetson", preset="gpu")
    f = tmp_path / "r.json"
    f.write_text(r.to_json(indent=2))
    assert resolve_recipe(recipe=str(f)) == r


def test_stage_keys_hold_the_dmq_config_only_for_methods_that_read_it():
    from quest_export.pipeline import stage_keys

    for method, reads in (("quest", False), ("ptq", False), ("dmq", True), ("dmq+quest", True)):
        a = stage_keys(resolve_recipe(method=method), "h")["quantize"]
        b = stage_keys(resolve_recipe(method=method, sets=["dmq.les_iters=3"]), "h")["quantize"]
        assert (a != b) == reads, method
