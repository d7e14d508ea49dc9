"""The device `qfit run` trains on: detect_device (NVML: name, total and FREE memory, or the CPU), GPU
emulation (QFIT_EMULATE_GPU: a smaller catalog card's memory on a bigger GPU) and the allocator setting
(PYTORCH_CUDA_ALLOC_CONF) the plan assumes.

Module level is light; torch is imported inside the functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from planner.coefficients import load_coefficients
from planner.memory import cuda_context_bytes
from planner.profiles import ProfileError, capacity_gpu, load_gpu, match_gpu_name
from planner.report import gib_str
from planner.specs import GpuSpec, Plan
from planner.train.options import RunError

# QFIT_EMULATE_GPU=t4: plan for that catalog GPU and cap torch's allocator to its memory (see cap_for_emulation)
EMULATE_ENV = "QFIT_EMULATE_GPU"


@dataclass(frozen=True, slots=True)
class Device:
    kind: str  # "cuda" or "cpu"
    name: str
    total_bytes: int
    free_bytes: int
    visible_count: int
    spec: GpuSpec  # what the plan is made for: memory_bytes is the FREE memory
    notes: tuple[str, ...] = ()
    emulated_on: str = ""  # with QFIT_EMULATE_GPU: the real GPU's name (spec, name and sizes are the emulated card's)


def _ram_bytes() -> tuple[int, int]:
    """(total, available) physical memory of this machine."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):  # not Linux
        return 0, 0


def _visible_nvml_indices(count: int) -> list[int]:
    """NVML numbers every GPU; CUDA_VISIBLE_DEVICES picks and reorders them for CUDA."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return list(range(count))
    out = []
    for part in env.split(","):
        part = part.strip()
        if not part.isdigit():  # UUIDs / MIG ids: NVML order unknown
            return []
        if int(part) < count:
            out.append(int(part))
    return out


def detect_device(multi: bool = False) -> Device:
    """The GPU to train on (NVML: name, total and FREE memory), or the CPU when CUDA is not available.

    With QFIT_EMULATE_GPU=<catalog GPU> (e.g. t4) the device is that GPU, emulated on the real one."""
    import torch

    emulate = os.environ.get(EMULATE_ENV, "").strip()
    emulated = _emulated_gpu(emulate) if emulate else None  # an unknown name fails on any machine
    if not torch.cuda.is_available():
        total, avail = _ram_bytes()
        spec = replace(GpuSpec.bare_capacity(avail or total, "cpu"), display_name="the CPU (no CUDA GPU)")
        ignored = (f"{EMULATE_ENV}={emulate} ignored: it needs a CUDA GPU to emulate on",) if emulated else ()
        return Device("cpu", "cpu", total, avail, 0, spec,
                      ("no CUDA GPU: CPU mode (fine for the demo and tests; memory figures are not measured)",) + ignored)
    from planner.hardware import detect_gpus

    notes = []
    count = torch.cuda.device_count()
    if count > 1 and not multi:
        notes.append(f"{count} GPUs visible: qfit run trains on one (CUDA device 0); "
                     "set CUDA_VISIBLE_DEVICES to choose which")
    gpus = detect_gpus()
    visible = _visible_nvml_indices(len(gpus))
    if gpus and visible:
        g = gpus[visible[0]]
        name, total, free = g["name"], g["total_bytes"], g["free_bytes"]
    else:  # no NVML: the CUDA runtime's view (this creates the CUDA context first)
        free, total = torch.cuda.mem_get_info(0)
        name = torch.cuda.get_device_name(0)
    if emulated is not None:
        return _emulated_device(emulated, name, free, count, notes)
    bf16 = bool(torch.cuda.is_bf16_supported())
    catalog = match_gpu_name(name)
    if catalog is not None:
        spec = replace(catalog, memory_bytes=free)
    else:
        major, minor = torch.cuda.get_device_capability(0)
        # planned like a catalog card of its memory class (total memory), for its free memory
        spec = capacity_gpu(free, name, class_bytes=total, display_name=name, bf16=bf16,
                            compute_capability=f"{major}.{minor}")
        speed = (f"speed estimated as for {spec.speed_proxy} (same memory class)" if spec.speed_proxy
                 else "no speed estimate (no catalog GPU of its memory class)")
        notes.append(f"{name} (compute capability {major}.{minor}) is not in qfit's GPU catalog: planning by its "
                     f"free memory; {speed}")
    if total - free > total // 100:
        notes.append(f"{gib_str(total - free)} GiB of the {gib_str(total)} GiB are in use by other processes: "
                     f"planning for the {gib_str(free)} GiB free")
    return Device("cuda", name, total, free, count, spec, tuple(notes))


# --- GPU emulation (QFIT_EMULATE_GPU): a smaller card's memory on a bigger GPU, for benchmarks and checks.
# Only memory is emulated: speed is the real GPU's.

def _emulated_gpu(name: str) -> GpuSpec:
    """The catalog GPU that QFIT_EMULATE_GPU names (whatever `--gpu` accepts: t4, 'Tesla T4', 16GiB)."""
    try:
        return load_gpu(name)
    except ProfileError as exc:
        raise RunError(f"{EMULATE_ENV}={name}: {exc}") from None


def _emulated_device(gpu: GpuSpec, real_name: str, real_free: int, count: int, notes: list[str]) -> Device:
    """The emulated card as if installed and empty: the plan gets all its memory and its bf16 flag (a T4
    computes in fp16); cap_for_emulation holds torch to that memory before the model loads."""
    notes.append(f"{EMULATE_ENV}: emulating {gpu.display_name} ({gib_str(gpu.memory_bytes)} GiB"
                 f"{'' if gpu.bf16 else ', no bf16'}) on {real_name}: torch's allocator is capped to its memory less "
                 "the CUDA context and paged optimizer state; speed is the real GPU's")
    if real_free < gpu.memory_bytes:
        notes.append(f"only {gib_str(real_free)} GiB are free on {real_name}, less than the emulated {gpu.display_name}'s "
                     f"{gib_str(gpu.memory_bytes)} GiB")
    name = f"{gpu.display_name} (emulated on {real_name})"
    return Device("cuda", name, gpu.memory_bytes, gpu.memory_bytes, count, gpu, tuple(notes), emulated_on=real_name)


def emulation_budget(gpu: GpuSpec, plan: Plan) -> dict:
    """What torch's allocator may hold so that this process uses no more than `gpu` would have.

    budget = card memory - calibrated CUDA context - the plan's paged optimizer state: both live outside
    torch's allocator, so a cap on it does not see them (bitsandbytes' paged state is CUDA managed memory,
    which a big GPU never has to evict). The convention of planner/train/validate.py, and the planner's own:
    needs = smallest allocator budget + context + paged state. All ints, bytes."""
    context = cuda_context_bytes(load_coefficients(gpu.name))
    paged = plan.memory.paged_optimizer_state
    return {"gpu": gpu.name, "display_name": gpu.display_name, "memory_bytes": gpu.memory_bytes,
            "cuda_context_bytes": context, "paged_optimizer_bytes": paged,
            "budget_bytes": gpu.memory_bytes - context - paged}


def cap_for_emulation(device: Device, plan: Plan, echo) -> dict:
    """With QFIT_EMULATE_GPU, before the model loads: torch.cuda.set_per_process_memory_fraction(budget / the
    real GPU's total), so that going past the emulated card raises the usual CUDA out-of-memory error (which the
    back-off handles as on a real card). -> the emulation record for run_report.json ({} without emulation)."""
    if not device.emulated_on:
        return {}
    import torch

    emu = emulation_budget(device.spec, plan)
    total = torch.cuda.get_device_properties(0).total_memory  # the allocator's fraction is of this total
    budget = emu["budget_bytes"]
    if not 0 < budget <= total:
        raise RunError(f"{EMULATE_ENV}: cannot emulate {device.spec.display_name} on {device.emulated_on} (allocator "
                       f"budget {gib_str(budget)} GiB, the GPU has {gib_str(total)} GiB): choose a smaller card")
    torch.cuda.set_per_process_memory_fraction(budget / total, 0)
    echo(f"emulation: torch's allocator capped at {gib_str(budget)} GiB of {device.emulated_on}'s {gib_str(total)} GiB "
         f"({device.spec.display_name} {gib_str(emu['memory_bytes'])} GiB - CUDA context "
         f"{gib_str(emu['cuda_context_bytes'])} - paged optimizer state {gib_str(emu['paged_optimizer_bytes'])})")
    return {**emu, "emulated_on": device.emulated_on, "real_total_bytes": total, "fraction": budget / total}


def set_alloc_conf(expandable: bool) -> str | None:
    """PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True when the plan assumes it (the calibrated allocator
    reserve depends on it). Read when CUDA initialises, so this runs before anything touches the GPU.
    A value the user set is kept; -> a note when it differs from what the plan assumed."""
    import torch

    if not torch.cuda.is_available():  # (does not initialise CUDA)
        return None
    current = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if current is None:
        if expandable:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        return None
    if expandable != ("expandable_segments:True" in current):
        return (f"PYTORCH_CUDA_ALLOC_CONF={current} kept; the plan assumed expandable segments "
                f"{'on' if expandable else 'off'}, so the allocator reserve may differ from the prediction")
    return None


