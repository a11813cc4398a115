"""A minimal ``.safetensors`` reader in numpy and the standard library (no ``safetensors`` package on the device).

Format (https://github.com/huggingface/safetensors): 8-byte little-endian unsigned header length n, then n bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the raw
little-endian tensor bytes; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from quest_export_runtime.errors import ArtifactError

DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
    "BOOL": "?",
}  # fmt: skip
HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read every tensor and the metadata of a ``.safetensors`` file.

    Args:
        path: the file.

    Returns:
        (tensors, metadata): ``{name: array}`` in native byte order (writable arrays sharing one buffer), and the
        ``__metadata__`` dict (empty if absent).

    Raises:
        ArtifactError: missing file, truncated or malformed header, a dtype this reader does not know (e.g. BF16),
            or tensor bytes outside the data section, naming the file and tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such safetensors file; re-copy the artifact folder")
    size = path.stat().st_size

    def bad(why: str) -> ArtifactError:
        return ArtifactError(
            f"{path} is not a valid safetensors file ({why}); re-copy it or re-run the stage that wrote it"
        )

    with open(path, "rb") as f:
        raw_n = f.read(HEADER_LENGTH_BYTES)
        if len(raw_n) < HEADER_LENGTH_BYTES:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(raw_n, "little")
        if not 0 < n <= min(MAX_HEADER_BYTES, size - HEADER_LENGTH_BYTES):
            raise bad(f"header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        data = bytearray(size - HEADER_LENGTH_BYTES - n)  # (bytes,) the data section, one buffer for every tensor
        if f.readinto(data) != len(data):
            raise bad("data section shorter than the file size says")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise bad(f"tensor '{name}' has a malformed entry ({type(e).__name__}: {e})") from None
        if dtype not in DTYPES:
            raise bad(f"tensor '{name}' has dtype {dtype}; this reader knows {', '.join(DTYPES)}")
        np_dtype = np.dtype(DTYPES[dtype])
        count = int(np.prod(shape, dtype=np.int64))
        if any(d < 0 for d in shape) or not 0 <= begin <= end <= len(data) or end - begin != count * np_dtype.itemsize:
            raise bad(f"tensor '{name}' ({dtype} {shape}) has data offsets [{begin}, {end}] that do not fit "
                      f"its size or the {len(data)}-byte data section")  # fmt: skip
        if count == 0:  # frombuffer refuses an empty slice at the end of the buffer
            arr = np.empty(shape, dtype=np_dtype)
        else:
            arr = np.frombuffer(data, dtype=np_dtype, count=count, offset=begin).reshape(shape)
        if sys.byteorder == "big" and np_dtype.itemsize > 1:
            arr = arr.astype(np_dtype.newbyteorder("="))
        tensors[name] = arr
    return tensors, metadata
