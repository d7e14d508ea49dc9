"""Measuring GPU memory: the one peak snapshot (torch's allocator peaks, optionally NVML's view of the whole
GPU) that `qfit run` (one GPU and every rank), the calibration harness and the distributed sweep record.

Raw integers, bytes (STYLE.md section 3). Module level is light; torch and pynvml are imported inside.
"""

from __future__ import annotations

import os


def nvml_used() -> tuple[int, str, str]:
    """(memory used on the GPU, its name, the driver version) from NVML, for the GPU QFIT_NVML_INDEX names
    (default 0; a rank sets it to its own GPU). Raises when NVML is not available."""
    import pynvml

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("QFIT_NVML_INDEX", "0")))
    used = int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
    name = pynvml.nvmlDeviceGetName(h)
    name = name.decode() if isinstance(name, bytes) else name
    drv = pynvml.nvmlSystemGetDriverVersion()
    return used, name, drv.decode() if isinstance(drv, bytes) else drv


def peak_snapshot(*, sync: bool = True, nvml: bool = False) -> dict[str, int]:
    """{"peak_allocated_bytes", "peak_reserved_bytes"}: torch.cuda.max_memory_allocated/reserved since the
    last reset_peak_memory_stats, after a synchronize (sync=False right after an OOM or mid-step).
    nvml=True adds "nvml_used_bytes" (the whole GPU as the driver sees it: CUDA context and paged optimizer
    state included); NVML is a measurement extra, so when it cannot be read the key is left out."""
    import torch

    if sync:
        torch.cuda.synchronize()
    snap = {"peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved())}
    if nvml:
        try:
            snap["nvml_used_bytes"] = nvml_used()[0]
        except Exception:  # no NVML (pynvml missing, driver without it): never fail a run for it
            pass
    return snap
