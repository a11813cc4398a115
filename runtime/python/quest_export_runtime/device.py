"""What the Python side knows about a device (deploy.md B-1, B-2, B-13, J-5), in one place.

- TensorRT: ``require_tensorrt`` imports it or raises ``TensorRTUnavailableError`` with one line that says what was
  attempted, what this machine is and how to get TensorRT here.
- The platform: the L4T release of a Jetson (``/etc/nv_tegra_release``, else the ``nvidia-l4t-core`` package),
  the JetPack releases each L4T belongs to, and the compute capability of a CUDA device (driver API, else
  ``nvidia-smi``; never torch, never the CUDA runtime library).
- The rules: a TensorRT build fits a target when the installed version starts with every part of the target's
  (``trt_matches_target``); an engine loads only on the TensorRT that built it, major.minor.patch
  (``engine_loads_on``); compute capabilities compare after ``normalize_compute_capability``; a JetPack target
  needs one of its L4T releases (``jetpack_matches_l4t``).

The builder (``builder``), the runtime (``bundle``, ``session``) and the bundle's build.sh (through
``shell_functions``) all use these. ``tests/fixtures/device/rules.json`` holds the cases every implementation
(this module, build.sh, the C++ runtime) must agree on. Standard library only; tensorrt is imported by
``require_tensorrt`` alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quest_export_runtime.errors import ArtifactError, ManifestMismatch, TensorRTUnavailableError

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")
L4T_CORE_PACKAGE = "nvidia-l4t-core"  # its Debian version is the L4T release on every JetPack
# L4T releases of each JetPack a target profile names (J-5); a build for the target refuses any other release.
JETPACK_L4T = {"5.1": ("35.2", "35.3", "35.4", "35.5", "35.6"), "6.0": ("36.3",), "6.1": ("36.4",),
               "6.2": ("36.4",), "7.0": ("38.2",)}  # fmt: skip
# An engine records the TensorRT that built it; this many leading parts must equal the installed version's
# (major.minor.patch: the C++ runtime sees no more than that through getInferLibVersion()).
ENGINE_VERSION_PARTS = 3


# -- versions ----------------------------------------------------------------------------------


def version_tuple(text: str) -> tuple[int, ...]:
    """Leading numeric parts of a version string: '10.3.0.30-1+cuda12.5' -> (10, 3, 0, 30); 'x' -> ()."""
    parts = []
    for p in re.split(r"[^0-9.]", str(text).strip(), maxsplit=1)[0].split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts)


def trt_matches_target(installed: str, target: str) -> bool:
    """Whether installed TensorRT ``installed`` is the target's ``target`` or a patch of it.

    '10.3.0.30' and '10.3.0.30-1+cuda12.5' match '10.3'; '10.13.3' does not match '10.1'; '10.3' does not
    match '10.3.0.30' (it may be another patch). Also the rule for an L4T release against a JetPack's.
    """
    found, expected = version_tuple(installed), version_tuple(target)
    return bool(expected) and found[: len(expected)] == expected


def engine_loads_on(built: str, installed: str) -> bool:
    """Whether an engine built with TensorRT ``built`` loads on TensorRT ``installed`` (B-13).

    TensorRT deserializes only plans of its own release: major.minor.patch must be equal, as far as ``built``
    states them (at least major.minor); a fourth (build) part is not compared.
    """
    b, i = version_tuple(built)[:ENGINE_VERSION_PARTS], version_tuple(installed)[:ENGINE_VERSION_PARTS]
    return len(b) >= 2 and i[: len(b)] == b


def normalize_compute_capability(cc: Any) -> str:
    """'8.7' from '8.7', 8.7, [8, 7], '87' or 'sm_87'.

    Raises:
        ArtifactError: anything else (the value comes from a manifest or a profile).
    """
    if isinstance(cc, (list, tuple)) and len(cc) == 2:
        return f"{int(cc[0])}.{int(cc[1])}"
    s = str(cc).strip().lower().removeprefix("sm_")
    if re.fullmatch(r"\d+\.\d+", s):
        return s
    if re.fullmatch(r"\d{2,3}", s):
        return f"{s[:-1]}.{s[-1]}"
    raise ArtifactError(f"compute_capability {cc!r} is not of the form 'major.minor'")


# -- the platform (J-5) --------------------------------------------------------------------------


def parse_tegra_release(text: str) -> str | None:
    """'36.4.3' from the first line of /etc/nv_tegra_release ('# R36 (release), REVISION: 4.3, GCID: ...')."""
    first = (text.splitlines() or [""])[0]
    m = re.match(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)", first)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def parse_l4t_core_version(text: str) -> str | None:
    """'36.4.3' from the Debian version of nvidia-l4t-core ('36.4.3-20250107174145')."""
    m = re.match(r"\s*(\d+\.\d+(?:\.\d+)*)", text)
    return m.group(1) if m else None


def l4t_release(path: str | os.PathLike = TEGRA_RELEASE, *, dpkg: bool = True) -> str | None:
    """The L4T release of this Jetson ('36.4.3'), from ``path``, else from dpkg's nvidia-l4t-core; None elsewhere."""
    try:
        found = parse_tegra_release(Path(path).read_text())
    except OSError:
        found = None
    if found or not dpkg or not shutil.which("dpkg-query"):
        return found
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", L4T_CORE_PACKAGE], capture_output=True, text=True,
                             timeout=30, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_l4t_core_version(out)


def jetpack_matches_l4t(jetpack: str, l4t: str) -> bool:
    """Whether L4T release ``l4t`` belongs to JetPack ``jetpack`` (a JetPack not in JETPACK_L4T is not checked)."""
    releases = JETPACK_L4T.get(jetpack, ())
    return not releases or any(trt_matches_target(l4t, r) for r in releases)


def same_jetpack(a: str, b: str) -> bool:
    """JetPack '6.1.0' vs '6.1': the same release when major.minor agree, as far as both state them."""
    x, y = version_tuple(a)[:2], version_tuple(b)[:2]
    n = min(len(x), len(y))
    return n > 0 and x[:n] == y[:n]


def compute_capability(device: int = 0) -> str | None:
    """Compute capability of CUDA device ``device`` ('8.7') through the driver API or nvidia-smi; None without a GPU."""
    try:
        cuda = ctypes.WinDLL("nvcuda.dll") if os.name == "nt" else ctypes.CDLL("libcuda.so.1")
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        if cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(dev), device) == 0:
            # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
            if cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) == 0:
                if cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev) == 0:
                    return f"{major.value}.{minor.value}"
    except (OSError, AttributeError):
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader", f"--id={device}"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        return out if re.fullmatch(r"\d+\.\d+", out) else None
    return None


def platform_facts(l4t: str | None = None) -> str:
    """'Python 3.10.12 on Linux aarch64, Jetson (L4T 36.4.3)': what a TensorRT error message says about this machine."""
    l4t = l4t or l4t_release()
    if l4t:
        where = f"Jetson (L4T {l4t})"
    else:
        gpu = "NVIDIA driver found" if NVIDIA_DRIVER.exists() else f"no NVIDIA driver ({NVIDIA_DRIVER.parent})"
        where = f"not a Jetson ({TEGRA_RELEASE} absent), {gpu}"
    return f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, {where}"


# -- TensorRT (B-1, B-2) ---------------------------------------------------------------------------


def tensorrt_unavailable_message(attempted: str, err: BaseException) -> str:
    """The one line of TensorRTUnavailableError: what was attempted, why it failed, this machine, what to do."""
    l4t = l4t_release()
    if l4t:
        how = ("install TensorRT with JetPack (sudo apt install nvidia-jetpack, or python3-libnvinfer for the system "
               "Python) and use the system Python or a venv made with --system-site-packages")  # fmt: skip
    else:
        how = ("install it from NVIDIA's package index (pip install tensorrt-cu12, or -cu13 for CUDA 13, "
               "--extra-index-url https://pypi.nvidia.com) or run in an NGC TensorRT container (nvcr.io/nvidia/tensorrt)")  # fmt: skip
    found = " ".join(f"{type(err).__name__}: {err}".split())
    return (f"{attempted} needs TensorRT, but `import tensorrt` failed ({found}); {platform_facts(l4t)}. "
            f"To proceed: {how}; or, off the device, `quest-export build --target T` writes a bundle whose build.sh "
            "needs only trtexec")  # fmt: skip


def require_tensorrt(*, attempted: str):
    """Import ``tensorrt``, or raise TensorRTUnavailableError saying how to get it.

    Args:
        attempted: what needed TensorRT, e.g. "loading the TensorRT engine unet.plan".

    Raises:
        TensorRTUnavailableError: ``import tensorrt`` failed (deploy.md B-2).
    """
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the bindings load but libnvinfer does not
        raise TensorRTUnavailableError(tensorrt_unavailable_message(attempted, e)) from None
    return tensorrt


@dataclass(frozen=True)
class DeviceInfo:
    """What an engine must match on this machine (deploy.md B-13, J-5)."""

    trt_version: str  # e.g. "10.3.0.30"
    compute_capability: str | None  # e.g. "8.7"; None: no CUDA GPU found
    l4t: str | None = None  # the L4T release ("36.4.3"), None off a Jetson
    jetpack: str | None = None  # the JetPack release where known (the simulated test device gives it)


def query_device(*, attempted: str = "checking a TensorRT engine against this device") -> DeviceInfo:
    """The installed TensorRT version, the compute capability of CUDA device 0, and the L4T release.

    Raises:
        TensorRTUnavailableError: tensorrt cannot be imported.
        ManifestMismatch: no CUDA GPU can be found.
    """
    trt = require_tensorrt(attempted=attempted)
    cc = compute_capability(0)
    if cc is None:
        raise ManifestMismatch(f"{attempted}: no CUDA GPU found (driver API and nvidia-smi); {platform_facts()}. "
                               "Check the NVIDIA driver")  # fmt: skip
    return DeviceInfo(trt.__version__, cc, l4t_release())


# -- the same rules in bash (build.sh) --------------------------------------------------------------


def shell_functions() -> str:
    """Bash functions for build.sh with the rules of this module (checked against the same fixture):

    ``version_parts V`` prints V's leading numeric parts ('10.3.0.30-1+cuda12.5' -> '10.3.0.30');
    ``trt_matches_target INSTALLED TARGET`` succeeds as ``trt_matches_target`` does;
    ``jetpack_matches_l4t JETPACK L4T`` succeeds as ``jetpack_matches_l4t`` does;
    ``l4t_release [FILE]`` prints the L4T release as ``l4t_release`` finds it ('' off a Jetson).
    """
    cases = "\n".join(f'    {jp}) releases="{" ".join(rs)}" ;;' for jp, rs in JETPACK_L4T.items())
    return rf"""# Device rules of quest_export_runtime.device (tests/fixtures/device/rules.json checks both).
version_parts() {{
  printf '%s\n' "$1" | sed 's/^[[:space:]]*//; s/[^0-9.].*//' \
    | awk -F. '{{ o = ""; for (i = 1; i <= NF; i++) {{ if ($i !~ /^[0-9]+$/) break; o = o (i > 1 ? "." : "") ($i + 0) }}; print o }}'
}}
trt_matches_target() {{
  local found expected
  found=$(version_parts "$1"); expected=$(version_parts "$2")
  [ -n "$expected" ] || return 1
  case "$found." in "$expected".*) return 0 ;; esac
  return 1
}}
jetpack_matches_l4t() {{
  local releases="" r
  case "$1" in
{cases}
    *) return 0 ;;
  esac
  for r in $releases; do trt_matches_target "$2" "$r" && return 0; done
  return 1
}}
l4t_release() {{
  local f="${{1:-{TEGRA_RELEASE}}}" v=""
  if [ -r "$f" ]; then
    v=$(sed -n '1s/^#[[:space:]]*R\([0-9]*\)[[:space:]]*(release),[[:space:]]*REVISION:[[:space:]]*\([0-9][0-9.]*\).*/\1.\2/p' "$f")
    v=${{v%.}}
  fi
  if [ -z "$v" ] && command -v dpkg-query >/dev/null 2>&1; then
    v=$(dpkg-query -W -f='${{Version}}' {L4T_CORE_PACKAGE} 2>/dev/null | sed -n 's/^[[:space:]]*\([0-9][0-9]*\(\.[0-9][0-9]*\)\{{1,\}}\).*/\1/p' || true)
  fi
  printf '%s\n' "$v"
}}"""
