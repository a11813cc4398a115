"""What ``lint_model`` returns: one ``Violation`` per broken rule and node, gathered in a ``LintReport``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from quest_export.errors import ExportError


@dataclass(frozen=True)
class Violation:
    """One broken rule at one node: what is wrong and how to fix it."""

    rule_id: str  # deploy.md rule id, e.g. "E-1"
    node: str  # the node (or tensor, or "<model>") at fault
    message: str
    fix: str
    severity: str = "error"  # error | warning

    def __str__(self) -> str:
        return f"{self.rule_id} [{self.node}] {self.message} Fix: {self.fix}"

    def to_dict(self) -> dict[str, str]:
        return {
            "rule": self.rule_id,
            "severity": self.severity,
            "node": self.node,
            "message": self.message,
            "fix": self.fix,
        }


@dataclass
class LintReport:
    """Result of ``lint_model``: errors break the target, warnings cost speed."""

    errors: list[Violation] = field(default_factory=list)
    warnings: list[Violation] = field(default_factory=list)
    target: str = ""
    model: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "target": self.target,
            "ok": self.ok,
            "errors": [v.to_dict() for v in self.errors],
            "warnings": [v.to_dict() for v in self.warnings],
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def format_text(self) -> str:
        head = (
            f"lint {self.model or 'model'} for target {self.target}: "
            f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        )
        lines = [head]
        for v in self.errors + self.warnings:
            lines.append(f"{v.severity:7s} {v.rule_id:5s} {v.node}: {v.message}")
            lines.append(f"{'':14s}fix: {v.fix}")
        if self.ok:
            lines.append(self.verdict())
        return "\n".join(lines)

    def verdict(self) -> str:
        """The last line of a graph with no error: plain OK only when there is no warning either, and a graph the
        target's rules are not about (G-1: not quantized, G-2: not the UNet interface) is not called OK at all."""
        scope = sorted({v.rule_id for v in self.warnings if v.rule_id.startswith("G-")})
        if scope:
            return (f"NOT CHECKED: no hard rule is broken, but this is not a graph the target's rules are about "
                    f"({', '.join(scope)} above); exit 0, it may still run")  # fmt: skip
        if self.warnings:
            return f"OK: no hard rule of the target is broken ({len(self.warnings)} warning(s) above cost speed)"
        return "OK: no hard rule of the target is broken"

    def raise_for_errors(self) -> None:
        """Raise ``ExportError`` listing every error; do nothing when the graph is ok.

        Raises:
            ExportError: the graph breaks at least one hard rule of the target.
        """
        if self.errors:
            listed = "\n".join(f"  {v}" for v in self.errors)
            raise ExportError(
                f"{self.model or 'the graph'} breaks {len(self.errors)} hard rule(s) of target '{self.target}':\n"
                f"{listed}\nFix the export, then re-check with `quest-export lint MODEL --target {self.target}`."
            )
