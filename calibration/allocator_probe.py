"""Probe the CUDA caching allocator on a GPU: the sequences tests/test_allocsim.py replays through
planner.allocsim, with torch's reserved and allocated MiB after every step, for one allocator setting
(set PYTORCH_CUDA_ALLOC_CONF before running; run once per setting).

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python calibration/allocator_probe.py
    python calibration/allocator_probe.py
"""

import os

MiB = 2**20
PROBES = {
    "sequence": [("a", "x", int(1.5 * MiB)), ("a", "y", int(19.5 * MiB)), ("a", "s", 1000), ("a", "z", 30 * MiB),
                 ("a", "w", 17 * MiB), ("f", "z"), ("a", "v", 25 * MiB)],
    "tail": [("a", "a", 10 * MiB), ("a", "b", 12 * MiB), ("a", "c", 8 * MiB), ("f", "b"), ("a", "d", 9 * MiB)],
    "unmap": [("a", "a", int(1.5 * MiB)), ("a", "b", 30 * MiB), ("f", "a"), ("e",), ("a", "s", MiB), ("f", "b"), ("e",)],
    "segments": [("a", "a", 12 * MiB), ("a", "b", 12 * MiB), ("f", "a"), ("e",)],
}


def cap_probes() -> list[str]:
    """Under set_per_process_memory_fraction: a request that must grow reserved memory is checked with its
    whole segment size, and every cached block is released before the request fails."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    out = []
    for name, first, second in (("cap-a", int(1.5 * MiB), 25 * MiB), ("cap-b", int(1.5 * MiB), 24 * MiB),
                                ("cap-c", 12 * MiB, 40 * MiB)):
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(45 * MiB / total)
        x = torch.empty(first, dtype=torch.uint8, device="cuda")
        if name == "cap-c":
            del x
        try:
            y = torch.empty(second, dtype=torch.uint8, device="cuda")
            result = f"ok, reserved {torch.cuda.memory_reserved() / MiB:g} MiB"
            del y
        except torch.OutOfMemoryError:
            result = f"OOM, reserved {torch.cuda.memory_reserved() / MiB:g} MiB"
        out.append(f"{name}: cap 45 MiB, {first / MiB:g} MiB {'freed' if name == 'cap-c' else 'held'}, then {second / MiB:g} MiB: {result}")
        x = None
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    return out


def main() -> None:
    import torch

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
          f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')!r}")
    for name, steps in PROBES.items():
        torch.cuda.empty_cache()
        live, base, rows = {}, None, []
        for step in steps:
            if step[0] == "a":
                live[step[1]] = torch.empty(step[2], dtype=torch.uint8, device="cuda")
            elif step[0] == "f":
                del live[step[1]]
            else:
                torch.cuda.empty_cache()
            rows.append(f"{torch.cuda.memory_reserved() / MiB:g}/{torch.cuda.memory_allocated() / MiB:.3f}")
        if name == "sequence":
            base = live["x"].data_ptr()
            rows.append(f"v at +{(live['v'].data_ptr() - base) / MiB:g} MiB")
        if name == "tail":
            rows.append(f"d at +{(live['d'].data_ptr() - live['a'].data_ptr()) / MiB:g} MiB")
        print(f"{name}: reserved/allocated MiB after each step: {' '.join(rows)}")
        live.clear()
        torch.cuda.empty_cache()
    for line in cap_probes():
        print(line)


if __name__ == "__main__":
    main()
