"""Import direction (style.md section 2): what runs on the device imports without torch; the recipe package
is standard library only; export never loads finetune; the CLI talks to quest_export.pipeline only."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNTIME_MODULES = sorted(f"quest_export_runtime.{p.stem}" for p in (REPO / "runtime" / "python" / "quest_export_runtime").glob("*.py")
                         if p.stem != "__init__")  # fmt: skip
TORCH_FREE = ["quest_export_runtime", *RUNTIME_MODULES, "quest_export.recipe", "quest_export.errors",
              "quest_export.deploy.plan", "quest_export.deploy.trtexec", "quest_export.deploy.ort", "quest_export.deploy.bundle", "quest_export.report",
              "quest_export.verify", "quest_export.verify.metrics", "quest_export.export.lint", "quest_export.export.lint.cli", "cli.main"]  # fmt: skip
VERBS = ["info", "calibrate", "quantize", "export", "build", "verify", "sample", "eval", "report", "lint"]


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)  # fmt: skip


@pytest.mark.parametrize("module", TORCH_FREE)
def test_imports_with_torch_blocked(module):
    proc = python(f"import sys; sys.modules['torch'] = None; import {module}")  # any `import torch` now raises
    assert proc.returncode == 0, f"{module} needs torch on import:\n{proc.stderr}"


def test_runtime_modules_are_found():
    assert {"quest_export_runtime.bundle", "quest_export_runtime.session", "quest_export_runtime.builder"} <= set(
        RUNTIME_MODULES
    )


def test_runtime_imports_nothing_of_the_host_package():
    """quest_export_runtime is its own distribution: it may not import quest_export (nor torch) at any depth."""
    bad = [f"{f.relative_to(REPO)}:{line}: {name}" for f in sorted((REPO / "runtime" / "python").rglob("*.py"))
           for line, name in _quest_imports(f)]  # fmt: skip
    assert bad == [], "quest_export_runtime may not import quest_export:\n" + "\n".join(bad)


def test_runtime_version_is_quest_export_version():
    import quest_export_runtime
    import tomllib

    import quest_export

    main = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = tomllib.loads((REPO / "runtime" / "python" / "pyproject.toml").read_text())["project"]
    assert runtime["version"] == main["version"] == quest_export.__version__ == quest_export_runtime.__version__
    assert f"quest-export-runtime=={main['version']}" in [
        d.split(";")[0].replace(" ", "") for d in main["dependencies"]
    ]
    assert not [d for d in runtime["dependencies"] if d.split(">")[0].split("=")[0].strip() in ("torch", "tensorrt")]


def test_blocking_torch_is_detected():
    """The harness itself: a module that imports torch fails under the block."""
    proc = python("import sys; sys.modules['torch'] = None; import quest_export.quant.primitives")
    assert proc.returncode != 0 and "torch" in proc.stderr


def test_recipe_imports_only_the_standard_library():
    proc = python("""
        import json, sys
        before = set(sys.modules)
        import quest_export.recipe
        new = sorted(set(sys.modules) - before)
        print(json.dumps(new))
    """)
    assert proc.returncode == 0, proc.stderr
    new = json.loads(proc.stdout.splitlines()[-1])
    assert "quest_export.recipe" in new
    ours = ("quest_export", "quest_export_runtime")
    foreign = [m for m in new if m.split(".")[0] not in (*sys.stdlib_module_names, *ours)]
    assert foreign == [], f"import quest_export.recipe loaded {foreign}"


def test_export_does_not_load_finetune():
    proc = python("""
        import sys
        import quest_export.export.exporter
        import quest_export.export
        print(sorted(m for m in sys.modules if m.startswith("quest_export.")))
    """)
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.splitlines()[-1]
    assert "quest_export.quant" in loaded  # the exporter really was imported
    assert "quest_export.finetune" not in loaded


def _quest_imports(path: Path) -> list[tuple[int, str]]:
    """(line, what) of every quest_export import in a file, at any depth (lazy imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "quest_export"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "quest_export":
            if node.module == "quest_export":
                found += [(node.lineno, f"quest_export.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def test_ast_scan_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from quest_export import pipeline\nimport quest_export.pipeline\n"
                 "def f():\n    from quest_export.errors import QuestExportError\n    import quest_export.log as l\n")  # fmt: skip
    assert _quest_imports(f) == [(1, "quest_export.pipeline"), (2, "quest_export.pipeline"), (4, "quest_export.errors"),
                                 (5, "quest_export.log")]  # fmt: skip


def test_cli_imports_only_pipeline():
    files = sorted((REPO / "cli").glob("*.py"))
    assert REPO / "cli" / "main.py" in files
    bad = [f"{f.relative_to(REPO)}:{line}: {name}" for f in files for line, name in _quest_imports(f)
           if name != "quest_export.pipeline"]  # fmt: skip
    assert bad == [], "cli may import quest_export.pipeline only:\n" + "\n".join(bad)


@pytest.mark.parametrize("how", ["console-script", "module"])
def test_help_lists_every_verb(how):
    script = Path(sys.executable).parent / "quest-export"
    if how == "console-script":
        if not script.exists():
            pytest.skip(f"no console script next to {sys.executable}; `pip install -e .` creates it")
        cmd = [str(script), "--help"]
    else:
        cmd = [sys.executable, "-m", "cli.main", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    commands = proc.stdout.split("Commands:")[1]
    listed = re.findall(r"^\s{2}(\S+)", commands, flags=re.M)
    assert sorted(listed) == sorted(VERBS), listed


@pytest.mark.parametrize("module", ["quest_export_runtime", *RUNTIME_MODULES, "quest_export.report", "cli.main"])
def test_imports_with_matplotlib_blocked(module):
    """matplotlib is for `quest-export report`'s figures only (quest_export.report.plots, imported when drawing):
    the runtime distribution and the CLI never load it."""
    proc = python(f"import sys; sys.modules['matplotlib'] = None; sys.modules['torch'] = None; import {module}")
    assert proc.returncode == 0, f"{module} needs matplotlib (or torch) on import:\n{proc.stderr}"
