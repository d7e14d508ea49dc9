"""planner.allocsim against the CUDA caching allocator's behaviour on a real GPU.

The expected figures are what calibration/allocator_probe.py printed on the H200 (torch 2.11.0+cu130;
calibration/logs/allocator-probe.txt): each probe's reserved and allocated MiB after every step.
"""

import pytest

from planner.allocsim import Allocator, allocation_size, replay, round_size

MiB = 2**20


def run(expandable: bool, steps):
    """steps: ("a", name, bytes) allocates, ("f", name) frees, ("e",) empties the cache. Returns the
    (reserved, allocated) MiB after each step, and the blocks by name."""
    a, live, out = Allocator(expandable), {}, []
    for step in steps:
        if step[0] == "a":
            live[step[1]] = a.malloc(step[2])
        elif step[0] == "f":
            a.free(live.pop(step[1]))
        else:
            a.empty_cache()
        out.append((round(a.reserved / MiB, 3), round(a.allocated / MiB, 3)))
    return out, live


SEQUENCE = [("a", "x", int(1.5 * MiB)), ("a", "y", int(19.5 * MiB)), ("a", "s", 1000), ("a", "z", 30 * MiB),
            ("a", "w", 17 * MiB), ("f", "z"), ("a", "v", 25 * MiB)]


def test_rounding_and_segment_sizes():
    assert round_size(1) == 512 and round_size(513) == 1024 and round_size(1024) == 1024
    assert allocation_size(MiB) == 2 * MiB  # small pool
    assert allocation_size(MiB + 512) == 20 * MiB  # 1-10 MiB share a 20 MiB segment
    assert allocation_size(10 * MiB) == 10 * MiB and allocation_size(19 * MiB + 1) == 20 * MiB


def test_default_mode_matches_the_gpu():
    out, _ = run(False, SEQUENCE)
    assert [r for r, _ in out] == [20, 40, 42, 72, 72, 72, 72]
    # the 19.5 MiB request keeps its whole 20 MiB segment (the 0.5 MiB rest is not split off)
    assert [a for _, a in out] == [1.5, 21.5, 21.501, 51.501, 68.501, 38.501, 63.501]


def test_expandable_segments_match_the_gpu():
    out, live = run(True, SEQUENCE)
    assert [r for r, _ in out] == [20, 40, 42, 62, 82, 82, 82]
    assert [a for _, a in out] == [1.5, 21.0, 21.001, 51.001, 68.001, 38.001, 63.001]
    # the 25 MiB request reuses the freed 30 MiB block, not the growable tail
    assert live["v"].addr - live["x"].addr == 21 * MiB


def test_expandable_best_fit_passes_over_the_tail():
    out, live = run(True, [("a", "a", 10 * MiB), ("a", "b", 12 * MiB), ("a", "c", 8 * MiB), ("f", "b"),
                           ("a", "d", 9 * MiB)])
    assert live["d"].addr - live["a"].addr == 10 * MiB  # the freed 12 MiB block, not the 10 MiB tail
    assert out[-1][0] == 40


def test_empty_cache_unmaps_whole_free_pages_only():
    out, _ = run(True, [("a", "a", int(1.5 * MiB)), ("a", "b", 30 * MiB), ("f", "a"), ("e",),
                        ("a", "s", MiB), ("f", "b"), ("e",)])
    assert [r for r, _ in out] == [20, 40, 40, 40, 42, 42, 2]


def test_default_empty_cache_frees_unused_segments():
    out, _ = run(False, [("a", "a", 12 * MiB), ("a", "b", 12 * MiB), ("f", "a"), ("e",)])
    assert [r for r, _ in out] == [12, 24, 24, 12]


def test_replay_of_an_event_log():
    sizes = {0: 100 * MiB, 1: 50 * MiB, 2: 120 * MiB}
    events = [0, 1, -1, 2, -2, -3]  # 0 and 1 live, 0 freed, 2 cannot use its 100 MiB hole
    a = replay(sizes, events, expandable=True)
    assert a.peak_allocated == 170 * MiB
    assert a.peak_reserved == 280 * MiB  # 160 mapped (150 in 20 MiB pages), then 120 more past the 50
    skipped = replay(sizes, events, expandable=True, skip={2})
    assert skipped.peak_reserved == 160 * MiB


@pytest.mark.parametrize("expandable", [False, True])
def test_allocator_returns_to_empty(expandable):
    a = Allocator(expandable)
    blocks = [a.malloc(n) for n in (3 * MiB, 700, 45 * MiB, 2 * MiB, 11 * MiB)]
    for b in blocks[::2] + blocks[1::2]:
        a.free(b)
    assert a.allocated == 0
    a.empty_cache()
    assert a.reserved == 0


def test_cap_checks_the_whole_segment_size_even_when_expandable():
    from planner.allocsim import OutOfMemory

    a = Allocator(True, cap=45 * MiB)
    a.malloc(int(1.5 * MiB))  # one 20 MiB page
    with pytest.raises(OutOfMemory):
        a.malloc(25 * MiB)  # 20 + 26 (the request rounded to 2 MiB) > 45, though one more page would do
    b = Allocator(True, cap=45 * MiB)
    b.malloc(int(1.5 * MiB))
    b.malloc(24 * MiB)
    assert b.reserved == 40 * MiB


def test_cap_releases_cached_blocks_before_failing():
    a = Allocator(False, cap=45 * MiB)
    a.free(a.malloc(12 * MiB))  # cached
    a.malloc(40 * MiB)  # 12 + 40 > 45: the cached 12 MiB segment is released, then it fits
    assert a.reserved == 40 * MiB


def test_smallest_budget_lies_between_allocated_and_reserved():
    from planner.allocsim import smallest_budget

    sizes = {0: 100 * MiB, 1: 50 * MiB, 2: 120 * MiB}
    events = [0, 1, -1, 2, -2, -3]
    need = smallest_budget(sizes, events, expandable=True)
    free = replay(sizes, events, expandable=True)
    assert free.peak_allocated <= need <= free.peak_reserved
    # under that cap the freed 100 MiB hole is released for the 120 MiB request: 160 MiB was never needed
    assert need < free.peak_reserved


def _probe_log():
    """calibration/logs/allocator-probe.txt: {(mode, probe): ["reserved/allocated", ...]} as the GPU printed it."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "calibration" / "logs" / "allocator-probe.txt").read_text()
    out, mode = {}, None
    for line in text.splitlines():
        if line.startswith("torch "):
            mode = "expandable" if "expandable_segments:True" in line else "default"
        elif ": reserved/allocated MiB after each step: " in line:
            name, rest = line.split(": reserved/allocated MiB after each step: ")
            out[(mode, name)] = [x for x in rest.split() if "/" in x]
    return out


def _probes():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "calibration" / "allocator_probe.py"
    spec = importlib.util.spec_from_file_location("allocator_probe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.PROBES


@pytest.mark.parametrize("mode", ["default", "expandable"])
@pytest.mark.parametrize("probe", ["sequence", "tail", "unmap", "segments"])
def test_simulator_reproduces_the_gpu_probe(mode, probe):
    """Every step of every probe, as torch reported it on the H200, replayed through the simulator."""
    measured = _probe_log()[(mode, probe)]
    out, _ = run(mode == "expandable", _probes()[probe])
    assert [f"{r:g}/{a:.3f}" for r, a in out] == measured


@pytest.mark.parametrize("mode", ["default", "expandable"])
def test_simulator_reproduces_the_gpu_cap_probes(mode):
    """calibration/allocator_probe.py's cap probes (45 MiB cap) as the H200 answered them."""
    from pathlib import Path

    from planner.allocsim import OutOfMemory

    text = (Path(__file__).resolve().parent.parent / "calibration" / "logs" / "allocator-probe.txt").read_text()
    section = text.split("PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True'")[1 if mode == "expandable" else 0]
    measured = {line.split(":")[0]: line.split(": ", 2)[2] for line in section.splitlines() if line.startswith("cap-")}
    for name, first, second, freed in (("cap-a", int(1.5 * MiB), 25 * MiB, False), ("cap-b", int(1.5 * MiB), 24 * MiB, False),
                                       ("cap-c", 12 * MiB, 40 * MiB, True)):
        a = Allocator(mode == "expandable", cap=45 * MiB)
        x = a.malloc(first)
        if freed:
            a.free(x)
        try:
            a.malloc(second)
            got = f"ok, reserved {a.reserved / MiB:g} MiB"
        except OutOfMemory:
            got = f"OOM, reserved {a.reserved / MiB:g} MiB"
        assert got == measured[name], name
