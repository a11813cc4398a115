"""The Python floor pyproject.toml claims (requires-python >= 3.10), checked on a real 3.10 interpreter.

torch has no CPU wheel for 3.10 on this project's machines (docs/dependencies.md), so the suite runs on 3.11 and
this test runs what 3.10 can run without the heavy wheels: every module of the package, the CLI and the runtime distribution compiles, and the
torch-free recipe layer loads every packaged target profile through the ``tomli`` fallback (tomllib is 3.11+) and
resolves a recipe to the same fingerprint as here. ``make setup`` creates .venv310 (tomli only) where a 3.10
interpreter is installed; $QUEST_EXPORT_PY310 names another one.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from quest_export.recipe.resolve import build_recipe, merge_layers
from quest_export.recipe.targets import list_targets

REPO = Path(__file__).resolve().parents[1]
PY310 = Path(os.environ.get("QUEST_EXPORT_PY310") or REPO / ".venv310" / "bin" / "python")
LAYERS = dict(bits="w4a8", effort="fast", target="jetson", recipe_file=None, shortcuts=None, sets=("calib.seed=3",))

PROBE = """
import importlib.util, json, sys
from pathlib import Path
repo = Path(sys.argv[1])
sys.path[:0] = [str(repo), str(repo / "runtime" / "python")]
assert sys.version_info[:2] == (3, 10), sys.version
assert importlib.util.find_spec("tomllib") is None  # so the tomli fallback is what runs
compiled = 0
for folder in ("quest_export", "cli", "runtime/python/quest_export_runtime"):
    for path in sorted((repo / folder).rglob("*.py")):
        compile(path.read_text(), str(path), "exec")
        compiled += 1
from quest_export.recipe.resolve import build_recipe, merge_layers
from quest_export.recipe.targets import list_targets, load_target
layers = json.loads(sys.argv[2])
layers["sets"] = tuple(layers["sets"])
recipe = build_recipe(merge_layers(**layers))
print(json.dumps({"compiled": compiled, "targets": [load_target(t).id for t in list_targets()],
                  "fingerprint": recipe.fingerprint(), "torch": "torch" in sys.modules}))
"""


@pytest.mark.skipif(not PY310.is_file(), reason=f"no Python 3.10 interpreter at {PY310} (make setup creates .venv310 "
                    "where python3.10 is installed); the 3.10 floor then rests on ruff's target-version only")  # fmt: skip
def test_python_310_compiles_the_package_and_resolves_recipes():
    proc = subprocess.run([str(PY310), "-I", "-B", "-c", PROBE, str(REPO), json.dumps(LAYERS)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["compiled"] > 50 and out["torch"] is False
    assert out["targets"] == list_targets() and len(out["targets"]) >= 6
    assert out["fingerprint"] == build_recipe(merge_layers(**LAYERS)).fingerprint()
