"""Exact mode's shared types: what both the light planner/exact.py and the heavy planner/train/exact.py
need, so that imports flow one way (light -> heavy, never back). Standard library and planner.units only."""

from __future__ import annotations

from dataclasses import dataclass

from planner.units import CUBLAS_HANDLES, CUBLAS_WORKSPACE_BYTES


@dataclass(frozen=True, slots=True)
class CudaDevice:
    """The GPU a trace stands for. Default: H200 (sm90, 132 SMs).

    cublas_workspace_bytes: torch allocates one cuBLAS workspace per (handle, stream) through the
    caching allocator (aten/src/ATen/cuda/CublasHandlePool.cpp): 32 MiB on sm90 and newer, torch's
    default CUBLAS_WORKSPACE_CONFIG ":4096:2:16:8" (8 MiB + 128 KiB) before. Training uses two handles
    (the main thread's forward, the autograd thread's backward); calibration/runs/*.csv shows 2 x 32 MiB
    exactly on the H200 (leak_bytes = 67108864 on the first configuration of each process).
    num_sms, major, minor: what bitsandbytes' gemm_4bit dispatch heuristic reads (small batches only).
    """

    name: str = "H200"
    major: int = 9
    minor: int = 0
    num_sms: int = 132
    cublas_workspace_bytes: int = CUBLAS_WORKSPACE_BYTES
    cublas_handles: int = CUBLAS_HANDLES


# lora-8bit: the LLM.int8 outlier threshold the trace runs at. bitsandbytes' MatMul8bitLt (autograd/_functions.py)
# takes its static int8_scaled_mm path at 0.0 (subA = None); at the real 6.0 the outlier columns' number depends on
# the values (int8_mixed_scaled_mm's fake kernel returns get_ctx().new_dynamic_size()), so exact mode adds them from
# planner.memory.int8_outlier_bytes_per_token instead (planner/exact.py, int8_outlier_bytes)
INT8_TRACE_THRESHOLD = 0.0
