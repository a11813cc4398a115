"""Every declared dependency is used (docs/dependencies.md says what for), and requirements/constraints.txt pins
only what the declared dependencies install: a package dropped from pyproject.toml cannot linger in either."""

from __future__ import annotations

import ast
import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Tools that are run, not imported: where each one is run.
RUN_NOT_IMPORTED = {"ruff": ("Makefile", r"\$\(BIN\)/ruff check")}


def declared() -> dict[str, str]:
    """Canonical name -> the group that declares it (base, or an extra)."""
    project = PYPROJECT["project"]
    out = {canonicalize_name(Requirement(r).name): "base" for r in project["dependencies"]}
    for extra, reqs in project["optional-dependencies"].items():
        out.update({canonicalize_name(Requirement(r).name): extra for r in reqs})
    return out


def imported_modules() -> set[str]:
    """Top-level modules imported anywhere in the package, the runtime distribution, the CLI, tests, bench/, tools/."""
    mods = set()
    for folder in ("quest_export", "runtime/python", "cli", "tests", "bench", "tools"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    mods.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    mods.add(node.module.split(".")[0])
    return mods


def test_every_declared_dependency_is_used():
    mods = imported_modules()
    unused = []
    for name in declared():
        if name in RUN_NOT_IMPORTED:
            file, pattern = RUN_NOT_IMPORTED[name]
            if not re.search(pattern, (REPO / file).read_text()):
                unused.append(name)
        elif name.replace("-", "_") not in mods:
            unused.append(name)
    assert not unused, f"declared in pyproject.toml but never imported (remove them, or use them): {unused}"


def test_dependencies_doc_names_every_dependency():
    doc = (REPO / "docs" / "dependencies.md").read_text()
    missing = [n for n in declared() if f"| {n} |" not in doc and f"`{n}`" not in doc]
    assert not missing, f"docs/dependencies.md does not say why these are there: {missing}"


def closure(names) -> set[str]:
    """The declared packages and everything they install here (markers evaluated for this interpreter)."""
    seen, stack = set(), list(names)
    while stack:
        name = canonicalize_name(stack.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # not installed here (tensorrt): it pins nothing
        for r in requires:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    return seen


def test_constraints_pin_only_what_the_dependencies_install():
    pins = [line.split("==")[0].strip() for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")]  # fmt: skip
    needed = closure(declared())
    stale = [p for p in pins if canonicalize_name(p) not in needed]
    assert not stale, f"requirements/constraints.txt pins packages nothing declared installs: {stale}"
