"""Minimal, lazy safetensors reading (memory-mapped) and atomic writing, bf16 included.

Reading maps the file and returns views, so a 7B checkpoint is paged in tensor by tensor (and only the
slices each device needs) instead of being copied into host memory.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from soft_jax.core.errors import UserError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def read(path: str) -> dict[str, np.ndarray]:
    """name -> read-only memory-mapped array. Raises UserError on a truncated or malformed file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise UserError(f"{path}: not a valid safetensors file (header length {n}, file size {size}); "
                            "the file is truncated or corrupt, re-download or re-export it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: corrupt safetensors header ({e}); re-download or re-export it") from None
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        if info["dtype"] not in DTYPES:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}; "
                            f"supported: {', '.join(DTYPES)}")
        if 8 + n + end > size:
            raise UserError(f"{path}: truncated: tensor {name} needs bytes up to {8 + n + end} but the file has "
                            f"{size}; re-download or re-export the checkpoint")
        dtype = np.dtype(DTYPES[info["dtype"]])
        out[name] = data[8 + n + start:8 + n + end].view(dtype).reshape(info["shape"])
    return out


def write(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes a safetensors file atomically (temp file, then rename)."""
    header, offset = {}, 0
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    for name, a in arrays.items():
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays.values():
            f.write(a.tobytes())
    os.replace(tmp, path)
