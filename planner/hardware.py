"""GPU detection through NVML (nvidia-ml-py; `import pynvml` inside the functions)."""

from __future__ import annotations


def detect_gpus() -> list[dict]:
    """Every visible NVIDIA GPU: name, total and free bytes (free: other processes may hold memory)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver / no GPU
        return []
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                        "total_bytes": int(mem.total), "free_bytes": int(mem.free)})
    finally:
        pynvml.nvmlShutdown()
    return out


def detect_gpu() -> tuple[str, int] | None:
    """(NVML name, total bytes) of GPU 0, or None without an NVIDIA GPU."""
    gpus = detect_gpus()
    return (gpus[0]["name"], gpus[0]["total_bytes"]) if gpus else None
