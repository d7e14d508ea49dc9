"""Byte constants and size parsing. Bytes are ints everywhere inside qfit; only the renderers (report*.py and the
calibration report) divide them into GiB for display."""

from __future__ import annotations

import re

from planner.errors import QfitError

KiB = 1024
MiB = 1024**2
GiB = 1024**3
KB = 10**3
MB = 10**6
GB = 10**9

# cuBLAS workspaces on torch's caching allocator (aten/src/ATen/cuda/CublasHandlePool.cpp): one per
# (handle, stream), 32 MiB each on sm90 and newer; training uses two handles (the forward's main thread and
# the autograd thread's backward). calibration/runs/*.csv shows exactly 2 x 32 MiB = 67,108,864 B on the H200.
CUBLAS_WORKSPACE_BYTES = 32 * MiB
CUBLAS_HANDLES = 2
CUBLAS_WORKSPACES_BYTES = CUBLAS_HANDLES * CUBLAS_WORKSPACE_BYTES  # 64 MiB

# Bytes per element of the dtypes the memory model talks about.
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "int8": 1, "uint8": 1}

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024**4,
    "kb": KB, "mb": MB, "gb": GB, "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """'24GiB' -> 25769803776; '16GB' -> 16 * 10**9 (GB means 10**9, GiB means 2**30)."""
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise QfitError(f"cannot read {text!r} as a size: write e.g. 24GiB, 16GB or 40000000000")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def looks_like_size(text: str) -> bool:
    m = _SIZE_RE.match(text)
    return bool(m) and m.group(2).lower() in _SIZE_UNITS and m.group(2) != ""

