"""Run every bench script of bench/ once, one after another, each writing its JSON (and log) under one folder.

    python bench/run_all.py [--out bench_results] [--full] [--only export_sizes,float_eval] [--list]

Default: the quick form of each script (small n, few iterations: minutes on a 2-core CPU); ``--full`` runs the
forms docs/BENCHMARKS.md quotes (n = 1000; quality's rows take a GPU to finish in reasonable time). A script
that fails does not stop the others; the summary lists each with its exit code, wall time and output file, and
the exit code is non-zero when any failed. engine_agreement.py needs a build: it runs on the ``cpu`` target build
that export_sizes.py leaves in its work folder, or is listed as skipped with the reason.

The numbers themselves (ratios measured side by side) are printed by each script and kept in its JSON; this
runner only sequences them. `make bench` calls it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def commands(out: Path, full: bool, work: Path) -> dict[str, list[str] | str]:
    """Script name -> argv after ``python`` (or a string: the reason it is skipped)."""
    n = "1000" if full else "100"
    cmds: dict[str, list[str] | str] = {
        "export_sizes": ["export_sizes.py", "--model", "fmnist-cond", "--latency", "--work", str(work / "sizes"),
                         "--repeats", "40" if full else "10", "--out", str(out / "export_sizes.json")],
        "float_eval": ["float_eval.py", "--n", n, "--guidance", "1.0,2.0,3.0" if full else "1.0,2.0",
                       "--steps", "50,20" if full else "20", "--out", str(out / "float_eval.json")],
        "recon_speed": ["recon_speed.py", "--model", "fmnist-cond", "--iters", "300" if full else "30",
                        "--work", str(work / "recon"), "--out", str(out / "recon_speed.json")],
        "ort_speed": ["ort_speed.py", "--model", "fmnist-cond", "--work", str(work / "ortspeed"),
                      "--repeats", "30" if full else "5", "--out", str(out / "ort_speed.json")],
        "ort_precision": ["ort_precision.py", "--work", str(work / "ortprec"), "--out", str(out / "ort_precision.json")],
        "quality": ["quality.py", "--rows", "standard", "--n", n, "--preset", "gpu" if full else "fast",
                    "--jobs", "2", "--threads", "1", "--work", str(work / "quality"),
                    "--out", str(out / "quality.json")] + ([] if full else ["--only", "ptq-w8a8,quest-w4a8"]),
        "ablation_w4a4": ["ablation_w4a4.py", "--methods", "dmq+quest,quest" if full else "quest",
                          "--preset", "gpu" if full else "fast", "--n", n, "--jobs", "6" if full else "2",
                          "--work", str(work / "ablation"), "--out", str(out / "ablation_w4a4.json")]
        + ([] if full else ["--variants", "full,fp,float-g9,only-g9,float-up_blocks"]),
    }  # fmt: skip
    cmds["sd_scale"] = (
        ["sd_scale.py", "--work", str(work / "sd15"), "--json", str(out / "sd_scale.json")]
        if full
        else "SD-1.5 size takes a GPU with 48 GB and about 30 minutes: run with --full on one"
    )
    builds = sorted((work / "sizes").glob("**/manifest.json"))
    cpu = [b.parent for b in builds if "cpu" in b.parent.name]
    cmds["engine_agreement"] = (
        ["engine_agreement.py", str(cpu[0]), "--n", n, "--out", str(out / "engine_agreement.json")]
        if cpu
        else "no cpu-target build in the export_sizes work folder (run export_sizes first)"
    )
    return cmds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_results", help="folder for every script's JSON and log")
    p.add_argument("--work", default=None, help="work folder of the scripts (default: OUT/work)")
    p.add_argument("--full", action="store_true", help="the forms docs/BENCHMARKS.md quotes (slow)")
    p.add_argument("--only", default=None, help="comma list of scripts (default: all)")
    p.add_argument("--list", action="store_true", help="print the commands and exit")
    args = p.parse_args()
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out / "work"
    order = ["export_sizes", "ort_speed", "ort_precision", "float_eval", "recon_speed", "quality", "ablation_w4a4",
             "engine_agreement", "sd_scale"]  # fmt: skip
    scripts = {s.stem for s in HERE.glob("*.py")} - {"run_all"}
    missing = sorted(scripts - set(order))
    if missing:  # a new bench script must be added here, not forgotten
        print(
            f"error: bench/run_all.py does not know {', '.join(missing)}: add it to commands() and order",
            file=sys.stderr,
        )
        return 2
    only = args.only.split(",") if args.only else order
    unknown = sorted(set(only) - set(order))
    if unknown:
        print(f"error: unknown bench script(s) {', '.join(unknown)}; choose from {', '.join(order)}", file=sys.stderr)
        return 2
    if args.list:
        for name, cmd in commands(out, args.full, work).items():
            if name in only:
                print(f"{name}: " + (cmd if isinstance(cmd, str) else "python bench/" + " ".join(cmd)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name in order:
        if name not in only:
            continue
        cmd = commands(out, args.full, work)[name]  # re-read: engine_agreement depends on earlier builds
        if isinstance(cmd, str):
            summary[name] = {"skipped": cmd}
            print(f"[bench] {name}: skipped ({cmd})", flush=True)
            continue
        print(f"[bench] {name}: python bench/{' '.join(cmd)}", flush=True)
        t0 = time.time()
        with open(out / f"{name}.log", "w") as log:
            rc = subprocess.call([sys.executable, str(HERE / cmd[0]), *cmd[1:]], stdout=log, stderr=subprocess.STDOUT)
        summary[name] = {"rc": rc, "seconds": round(time.time() - t0, 1), "log": str(out / f"{name}.log")}
        tail = (out / f"{name}.log").read_text(errors="replace").strip().splitlines()[-12:]
        print("\n".join("    " + ln for ln in tail), flush=True)
        print(f"[bench] {name}: exit {rc} in {summary[name]['seconds']} s", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    failed = [k for k, v in summary.items() if v.get("rc", 0) != 0]
    print(f"[bench] {len(summary) - len(failed)} of {len(summary)} ran cleanly; results in {out}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
