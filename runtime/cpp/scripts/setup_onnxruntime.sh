#!/usr/bin/env bash
# Assemble an ONNX Runtime C/C++ prefix (include/ + lib/) for the quest runtime's ORT backend
# on an x86-64 Debian 12 (bookworm) host, from package registries only:
#
#   headers  Debian 13 (trixie) package libonnxruntime-dev 1.21.0+dfsg-1 -> usr/include/onnxruntime/
#            (bookworm has no onnxruntime package; the trixie *library* package needs glibc >= 2.38,
#            so only the header package is unpacked, with dpkg-deb -x, nothing is installed)
#   library  the PyPI wheel onnxruntime (onnxruntime/capi/libonnxruntime.so.1.X.Y, SONAME libonnxruntime.so.1)
#            of the Python interpreter given by $PYTHON (default: python3)
#
# The ORT C API is versioned: headers of API 21 (ORT 1.21) run on any newer library (1.31.1 here);
# the backend checks this at start-up and refuses an older library.
#
# On Debian 13 or newer, `apt-get install libonnxruntime-dev` is the whole job instead: CMake then finds
# /usr/include/onnxruntime and /usr/lib/<triplet>/libonnxruntime.so without ONNXRUNTIME_ROOT.
#
# Usage: scripts/setup_onnxruntime.sh [PREFIX]      (default: ${XDG_CACHE_HOME:-~/.cache}/quest-export/onnxruntime)
# Then:  cmake -S runtime/cpp -B build/runtime -DONNXRUNTIME_ROOT=PREFIX
#
# The system's apt configuration is not touched: the trixie index goes to a private folder under PREFIX.
set -euo pipefail

PREFIX=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/quest-export/onnxruntime}
PYTHON=${PYTHON:-python3}
DEB_SUITE=${DEB_SUITE:-trixie}
DEB_VERSION=${DEB_VERSION:-1.21.0+dfsg-1}
ARCH=$(dpkg --print-architecture)

die() { echo "setup_onnxruntime: $*" >&2; exit 1; }
command -v apt-get >/dev/null || die "apt-get not found: this script needs a Debian-based host"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"

# 1. headers from Debian's libonnxruntime-dev, through a private apt state folder
work="$PREFIX/.apt"
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/deb"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $DEB_SUITE main" \
  >"$work/sources.list"
APT=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root)
apt-get "${APT[@]}" -qq update || die "apt-get update of Debian $DEB_SUITE failed (is the Debian mirror reachable?)"
(cd "$work/deb" && apt-get "${APT[@]}" -qq download "libonnxruntime-dev=$DEB_VERSION") \
  || die "could not download libonnxruntime-dev=$DEB_VERSION from Debian $DEB_SUITE ($ARCH)"
deb=$(ls "$work"/deb/libonnxruntime-dev_*_"$ARCH".deb | head -n1)
rm -rf "$work/x" && dpkg-deb -x "$deb" "$work/x"
rm -rf "$PREFIX/include" && mkdir -p "$PREFIX/include"
cp -r "$work/x/usr/include/onnxruntime" "$PREFIX/include/onnxruntime"
test -f "$PREFIX/include/onnxruntime/onnxruntime_cxx_api.h" || die "$deb has no onnxruntime_cxx_api.h"

# 2. the shared library from the onnxruntime wheel of $PYTHON
capi=$("$PYTHON" -c 'import os, onnxruntime; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))') \
  || die "$PYTHON cannot import onnxruntime: pip install onnxruntime==1.31.1 (or set PYTHON=/path/to/venv/bin/python)"
lib=$(ls "$capi"/libonnxruntime.so.1.* 2>/dev/null | head -n1)
test -n "$lib" || die "no libonnxruntime.so.1.* in $capi (this onnxruntime wheel does not ship the C library)"
mkdir -p "$PREFIX/lib"
ln -sfn "$lib" "$PREFIX/lib/libonnxruntime.so.1"
ln -sfn "$lib" "$PREFIX/lib/libonnxruntime.so"

api=$(grep -m1 -E '^#define ORT_API_VERSION' "$PREFIX/include/onnxruntime/onnxruntime_c_api.h" | awk '{print $3}')
echo "ONNX Runtime prefix ready: $PREFIX"
echo "  headers: Debian $DEB_SUITE libonnxruntime-dev $DEB_VERSION (ORT_API_VERSION $api)"
echo "  library: $lib"
echo "configure with: cmake -S runtime/cpp -B build/runtime -DONNXRUNTIME_ROOT=$PREFIX"
