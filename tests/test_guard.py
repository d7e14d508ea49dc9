"""The guard of `qfit calibrate --gpu auto` / `--from-runs` (planner/guard.py): a user's short sweep changes only what
it can identify, and only when that predicts the sweep's own configurations better, held out one by one. Synthetic
speed rows (real configurations' features, step times made by a known rule) and the committed H200 memory runs."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from planner import guard
from planner import speed_fit as sf
from planner.coefficients import load_coefficients
from planner.speed import CPU_TERMS, GPU_TERMS

SPEED = Path(__file__).resolve().parent.parent / "calibration" / "speed"


@pytest.fixture(scope="module")
def shipped() -> dict:
    return {k: v for k, v in load_coefficients(None).values.items() if k.startswith("speed_") and isinstance(v, float)}


@pytest.fixture(scope="module")
def rows() -> list:
    return sf.read_rows([SPEED / "h100-speed-b.csv"])


def _synthetic(rows, coeffs, noise=0.01, seed=0):
    """The rows with step times made by `coeffs` (times a little noise): what a machine following them measures."""
    rng = random.Random(seed)
    times = sf.predict(rows, coeffs)
    return [dataclasses.replace(r, step_time_s=t * (1 + rng.uniform(-noise, noise))) for r, t in zip(rows, times)]


def test_a_slower_host_is_found_and_the_gpu_terms_stay(shipped, rows):
    truth = sf.with_scale(shipped, CPU_TERMS, 1.4)  # this machine's CPU launches 40% slower
    sweep = _synthetic(rows, truth)
    after, decisions = guard.guard_speed(shipped, sweep)
    cpu, gpu = decisions
    assert cpu.identifiable and cpu.accepted and cpu.candidate_error_pct < cpu.shipped_error_pct
    for k in CPU_TERMS:
        assert after[f"speed_{k}"] == pytest.approx(1.4 * shipped[f"speed_{k}"], rel=0.05)
    # the GPU factor is identifiable (big packed micro-batches) but gains nothing: the shipped GPU terms stay
    assert gpu.identifiable and not gpu.accepted
    assert all(after[f"speed_{k}"] == shipped[f"speed_{k}"] for k in GPU_TERMS)


def test_a_sweep_that_cannot_see_the_cpu_leaves_it_at_the_shipped_value(shipped, rows):
    truth = sf.with_scale(shipped, CPU_TERMS, 1.4)
    big = ("mistral-7b", "llama-3.1-8b", "qwen2.5-14b")  # 8k-token micro-batches of these keep the GPU busy
    gpu_bound = [r for r in _synthetic(rows, truth) if r.features.tokens_per_step >= 8192 and r.model in big]
    assert len({r.config_id for r in gpu_bound}) >= guard.MIN_CONFIGURATIONS
    after, decisions = guard.guard_speed(shipped, gpu_bound)
    cpu = decisions[0]
    assert not cpu.identifiable and not cpu.accepted and "not identifiable" in cpu.detail
    assert all(after[f"speed_{k}"] == shipped[f"speed_{k}"] for k in CPU_TERMS)


def test_noise_alone_changes_nothing(shipped, rows):
    for seed in range(3):
        after, decisions = guard.guard_speed(shipped, _synthetic(rows, shipped, noise=0.03, seed=seed))
        assert after == shipped and not any(d.accepted for d in decisions)


def test_the_margin():
    assert guard.better(3.0, 5.0) and not guard.better(4.6, 5.0) and not guard.better(0.4, 0.5)


def test_too_few_configurations_change_nothing(shipped, rows):
    after, decisions = guard.guard_speed(shipped, _synthetic(rows[:2], sf.with_scale(shipped, CPU_TERMS, 2.0)))
    assert after == shipped and not any(d.accepted or d.identifiable for d in decisions)


def test_memory_guard_touches_only_what_the_sweep_identifies():
    """A sweep of one model (Llama-3.2-1B) under one allocator mode: the allocator's coefficients cannot be told
    apart from the model's size, so every reserve and structural coefficient stays exactly as shipped; only the CUDA
    context, measured directly, may change."""
    from planner.fit import read_runs

    shipped = load_coefficients(None)
    runs = Path(__file__).resolve().parent.parent / "calibration" / "runs" / "h200-t-expandable.csv"
    df = read_runs([str(runs)])
    keys = guard.identifiable_memory_keys(df)
    assert not any(k.startswith(("reserve_", "required_")) for k in keys)
    after, decisions = guard.guard_memory(shipped, df)
    assert not decisions[0].identifiable and "2 or more models" in decisions[0].detail
    for k, v in shipped.values.items():
        if k != "cuda_context_bytes":
            assert after.values[k] == v, k


def test_memory_guard_holds_out_model_by_model():
    """A sweep of two models under one allocator mode: that mode's reserve coefficients are identifiable, the other
    mode's and the structural coefficients stay as shipped whatever the verdict, and the candidate's error is each
    model predicted by a fit on the other."""
    from planner.fit import read_runs

    shipped = load_coefficients(None)
    runs = Path(__file__).resolve().parent.parent / "calibration" / "runs" / "h200-a-expandable.csv"
    df = read_runs([str(runs)])
    assert df["model"].nunique() == 2
    keys = guard.identifiable_memory_keys(df)
    assert "reserve_*_expandable" in keys and not any(k.endswith("_default") for k in keys)
    after, (decision,) = guard.guard_memory(shipped, df)
    assert decision.identifiable and decision.shipped_error_pct is not None and decision.candidate_error_pct is not None
    for k, v in shipped.values.items():
        if k.endswith("_default") or k in ("act_scale", "ckpt_saved_scale", "bwd_temp_factor", "logits_fwd_bytes",
                                           "logits_bwd_bytes") or k.startswith("speed_"):
            assert after.values[k] == v, k
    if not decision.accepted:
        assert after is shipped
