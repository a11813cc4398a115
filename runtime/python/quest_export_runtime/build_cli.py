"""``python -m quest_export_runtime.build_cli BUNDLE``: build a bundle's TensorRT engine(s) on this device.

The bundle's ``build_engine.py`` calls ``main``. Standard library and ``quest_export_runtime`` only.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from quest_export_runtime.audit import AuditReport
from quest_export_runtime.builder import engines_from_bundle
from quest_export_runtime.errors import QuestExportError
from quest_export_runtime.manifest import read_manifest
from quest_export_runtime.outputs import check_output


def main(argv: list[str] | None = None) -> int:
    """``python -m quest_export_runtime.build_cli BUNDLE_DIR [--out DIR] [--allow-experimental]``: build on the device.

    Returns:
        0 on success; the error's exit code (2: fixable by the user) after printing its one-line message.
    """
    p = argparse.ArgumentParser(prog="python -m quest_export_runtime.build_cli",
                                description="Build the TensorRT engine(s) of a quest-export bundle on this device.")  # fmt: skip
    p.add_argument("bundle", help="bundle folder (manifest.json with stage 'bundle')")
    p.add_argument("--out", default=None, help="engine folder (default: BUNDLE/engine)")
    p.add_argument("--allow-experimental", action="store_true", help="build cells not yet verified on hardware")
    p.add_argument("--timing-cache", default=None, help="timing cache file (default: keyed name beside the engines)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        check_output(args.out or Path(args.bundle) / "engine", "dir")  # the default is BUNDLE/engine
        out = engines_from_bundle(args.bundle, out_dir=args.out, timing_cache=args.timing_cache,
                                  progress=not args.quiet, allow_experimental=args.allow_experimental)  # fmt: skip
        manifest = read_manifest(out, stage="build-trt")
    except QuestExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for engine in manifest["engines"]:
        report = AuditReport.from_dict(manifest["audit"][engine["file"]])
        print(f"{out / engine['file']}: audit {'ok' if report.ok else 'FAILED'}: {report.summary()}")
    print(f"engine folder: {out} (TensorRT {manifest['trt_version']}, SM {manifest['compute_capability']}, "
          f"{manifest['build_seconds']} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
