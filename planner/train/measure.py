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


class Int8OutlierWatch:
    """lora-8bit: how many input columns bitsandbytes' LLM.int8 matmul treats as outliers (|x| >= the threshold,
    6.0 by default), per Linear8bitLt. MatMul8bitLt.forward (autograd/_functions.py) sets `state.idx` to those
    columns and keeps `subA = A[:, idx]` (the input's dtype) on the autograd context until backward, so their
    count is a memory term that depends on the data (planner.memory.int8_outlier_bytes_per_token).

    A forward hook on every Linear8bitLt records the widest outlier set each one saw. `share` is their sum over
    the sum of the modules' input widths (0 when no Linear8bitLt ran through MatMul8bitLt: the CPU's
    MatMul8bitFp training path keeps no outlier columns)."""

    def __init__(self, model) -> None:
        import bitsandbytes as bnb

        self.width: dict[str, int] = {}
        self.in_features: dict[str, int] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules()
                        if isinstance(m, bnb.nn.Linear8bitLt)]

    def _hook(self, name: str):
        def hook(module, args, output) -> None:
            idx = getattr(module.state, "idx", None)
            width = 0 if idx is None else int(idx.numel())
            self.width[name] = max(self.width.get(name, 0), width)
            self.in_features[name] = int(module.in_features)
        return hook

    @property
    def columns(self) -> int:
        return sum(self.width.values())

    @property
    def share(self) -> float:
        total = sum(self.in_features.values())
        return self.columns / total if total else 0.0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
