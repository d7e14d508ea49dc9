"""planner.multigpu: per-GPU memory under DDP and FSDP, from first principles. All of it is an estimate
(no multi-GPU run has calibrated it); these tests check the structure, not measured numbers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.calibration import DEFAULTS_FILE, load_coefficients
from planner.memory import (
    cuda_context_bytes,
    estimate,
    lora_grads_bytes,
    lora_tensor_numels,
    quant_constants_bytes,
    quantized_weights_bytes,
    required_budget_bytes,
    resolve_targets,
    unquantized_weights_bytes,
)
from planner.multigpu import (
    DEFAULT_NCCL_BUFFER_BYTES,
    FSDP_OPTIM,
    best_multi,
    ddp_bucket_bytes,
    ddp_per_gpu,
    fsdp_per_gpu,
    nccl_buffer_bytes,
    plan_multi,
    smallest_gpu_count,
)
from planner.profiles import load_gpu, load_model
from planner.search import Request, capacity_bytes
from planner.specs import Coefficients, LoraSettings, TrainSettings
from planner.units import MiB

LORA = LoraSettings()
TRAIN = TrainSettings(optim="adamw_torch")  # batch 1, seq 512, checkpointing on


@pytest.fixture(scope="module")
def coeffs() -> Coefficients:
    return load_coefficients()


@pytest.fixture(scope="module")
def llama70():
    return load_model("llama-3.1-70b")


@pytest.fixture(scope="module")
def mistral():
    return load_model("mistral-7b")


# =========================================================================== FSDP structure

@pytest.mark.parametrize("n", range(1, 9))
def test_sharded_terms_divide_by_n_exactly(n, llama70, coeffs):
    m = fsdp_per_gpu(llama70, LORA, TRAIN, coeffs, n)
    q, c = quantized_weights_bytes(llama70), quant_constants_bytes(llama70, TRAIN.double_quant)
    u = 2 * llama70.unquantized_param_count  # bf16: no fp32 upcast under the FSDP-QLoRA recipe
    assert (m.quantized_weights, m.quant_constants, m.unquantized_weights) == (
        math.ceil(q / n), math.ceil(c / n), math.ceil(u / n))
    for total, shard in ((q, m.quantized_weights), (c, m.quant_constants), (u, m.unquantized_weights)):
        assert 0 <= n * shard - total < n  # the N shards cover the tensor with less than N bytes of rounding
    whole = fsdp_per_gpu(llama70, LORA, TRAIN, coeffs, 1)
    for name in ("lora_params", "lora_grads", "optimizer_state"):  # per tensor ceil, 512-byte blocks
        assert getattr(m, name) <= getattr(whole, name) / n + 512 * len(lora_tensor_numels(
            llama70, LORA, resolve_targets(llama70, LORA.targets)))
    # per rank, unchanged with N: the gathered layers, the root unit and the activations
    for name in ("gathered_layers", "gathered_root", "saved_activations", "logits"):
        assert getattr(m, name) == getattr(whole, name), name


def test_unquantized_weights_stay_in_the_compute_dtype(mistral, coeffs):
    """No prepare_model_for_kbit_training upcast: 2 B/param, half the single-GPU fp32 term."""
    m = fsdp_per_gpu(mistral, LORA, TRAIN, coeffs, 1)
    assert 2 * m.unquantized_weights == unquantized_weights_bytes(mistral)
    assert m.gathered_root == 2 * (mistral.embed_params + mistral.lm_head_params + mistral.final_other_params)
    # the lm_head's autocast copy (fp32 -> bf16) is gone from the logits term
    assert m.logits < estimate(mistral, LORA, TRAIN, coeffs).logits or m.logits == 0


@pytest.mark.parametrize("model_name", ["mistral-7b", "llama-2-13b", "llama-2-70b", "llama-3.1-70b"])
def test_load_phase_dominates_small_batches(model_name, coeffs):
    """Every rank loads the whole 4-bit model before wrapping: with batch 1 x 512 tokens that load
    is the peak on every N >= 2; its need is the full model in 4 bits + constants + bf16 rest."""
    model = load_model(model_name)
    q, c = quantized_weights_bytes(model), quant_constants_bytes(model, TRAIN.double_quant)
    load_alloc = q + c + 2 * model.unquantized_param_count
    expected = required_budget_bytes(load_alloc, 0, TRAIN, coeffs) + cuda_context_bytes(coeffs) + nccl_buffer_bytes(coeffs)
    for n in range(2, 9):
        m = fsdp_per_gpu(model, LORA, TRAIN, coeffs, n)
        assert m.peak_phase == "load" and m.needs_bytes == m.load_needs_bytes == expected, n
        assert m.training_needs_bytes < m.load_needs_bytes
        # rank-0 CPU loading puts only the shards on the GPU: training is the peak
        r0 = fsdp_per_gpu(model, LORA, TRAIN, coeffs, n, loading="rank0_cpu")
        assert r0.peak_phase == "training" and r0.needs_bytes == r0.training_needs_bytes == m.training_needs_bytes


def test_large_vocab_small_models_peak_in_training(coeffs):
    """Llama-3.1-8B: the root unit (embeddings + untied lm_head, 128,256 x 4,096 each, bf16: 1.96 GiB)
    stays gathered on every rank next to its shard, so training (8.3 GiB) beats the load (7.3 GiB)."""
    m = fsdp_per_gpu(load_model("llama-3.1-8b"), LORA, TRAIN, coeffs, 2)
    assert m.peak_phase == "training" and m.gathered_root == 2 * 2 * 128_256 * 4_096 + 2 * 4_096


def test_tiny_model_peaks_in_training(coeffs):
    """Qwen2.5-0.5B: its logits (vocab 151,936 x 512 tokens x ~22 B fp32/bf16 chain, ~1.6 GiB per rank)
    outweigh the whole 4-bit model (~0.6 GiB), so even the full load is not the peak."""
    m = fsdp_per_gpu(load_model("qwen2.5-0.5b"), LORA, TRAIN, coeffs, 2)
    assert m.peak_phase == "training" and m.logits > m.load_needs_bytes - m.cuda_context - m.nccl_buffer


@pytest.mark.parametrize("loading", ["full", "rank0_cpu"])
@pytest.mark.parametrize("cpu_offload", [False, True])
def test_fsdp_per_gpu_never_rises_with_n(loading, cpu_offload, llama70, coeffs):
    needs = [fsdp_per_gpu(llama70, LORA, TRAIN, coeffs, n, cpu_offload=cpu_offload, loading=loading).needs_bytes
             for n in range(1, 9)]
    assert needs == sorted(needs, reverse=True)
    if loading == "rank0_cpu" and not cpu_offload:
        assert needs[-1] < needs[0]  # and sharding does help


def test_cpu_offload_keeps_shards_off_the_gpu(llama70, coeffs):
    off = fsdp_per_gpu(llama70, LORA, TRAIN, coeffs, 4, cpu_offload=True, loading="rank0_cpu")
    on = fsdp_per_gpu(llama70, LORA, TRAIN, coeffs, 4, loading="rank0_cpu")
    for name in ("quantized_weights", "quant_constants", "unquantized_weights", "lora_params", "lora_grads",
                 "optimizer_state"):
        assert getattr(off, name) == 0, name
    assert off.gathered_layers == on.gathered_layers and off.needs_bytes <= on.needs_bytes


def test_components_and_fields_are_int_bytes(llama70, coeffs):
    m = fsdp_per_gpu(llama70, LORA, TRAIN, coeffs, 4)
    assert all(isinstance(v, int) and v >= 0 for v in m.components().values())
    assert m.peak_allocated_bytes == sum(getattr(m, f) for f in m.ALLOCATED_FIELDS)
    assert any("estimate" in note for note in m.notes)


# =========================================================================== optimizer restriction

@pytest.mark.parametrize("optim", ["paged_adamw_32bit", "adamw_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers_are_refused_under_fsdp(optim, mistral, coeffs):
    with pytest.raises(ValueError, match="FSDP2"):
        fsdp_per_gpu(mistral, LORA, replace(TRAIN, optim=optim), coeffs, 2)
    with pytest.raises(ValueError, match="adamw_torch"):
        plan_multi(mistral, load_gpu("rtx4090"), Request(optim=optim), coeffs, 2, "fsdp")
    # DDP has no such restriction
    assert ddp_per_gpu(mistral, LORA, replace(TRAIN, optim=optim), coeffs, 2).needs_bytes > 0


def test_fsdp_plans_pick_adamw_torch_and_say_why(mistral, coeffs):
    plans = plan_multi(mistral, load_gpu("rtx4090"), Request(), coeffs, 2, "fsdp")
    assert plans and all(p.train.optim == FSDP_OPTIM for p in plans)
    assert any("FSDP2" in note for note in plans[0].notes)


# =========================================================================== DDP

def test_ddp_buckets_hold_one_copy_of_the_gradients(mistral, coeffs):
    numels = lora_tensor_numels(mistral, LORA, resolve_targets(mistral, LORA.targets))
    total = sum(4 * k for k in numels)
    buckets = ddp_bucket_bytes(numels)
    n_buckets = 1 + math.ceil(max(0, total - 1 * MiB) / (25 * MiB))
    assert total <= buckets < total + 512 * n_buckets
    assert abs(buckets - lora_grads_bytes(numels)) < 512 * len(numels)


@pytest.mark.parametrize("model_name", ["mistral-7b", "llama-3.1-70b", "qwen2.5-0.5b"])
def test_ddp_per_gpu_is_at_least_single_gpu(model_name, coeffs):
    model = load_model(model_name)
    for train in (TRAIN, TrainSettings()):
        single = estimate(model, LORA, train, coeffs)
        for n in (2, 4, 8):
            d = ddp_per_gpu(model, LORA, train, coeffs, n)
            assert d.needs_bytes >= single.needs_bytes
            assert d.needs_bytes == single.needs_bytes + d.grad_buckets + d.nccl_buffer
            assert d.needs_bytes == ddp_per_gpu(model, LORA, train, coeffs, 2).needs_bytes  # independent of n


# =========================================================================== NCCL coefficient

def test_nccl_buffer_coefficient(coeffs):
    doc = json.loads(DEFAULTS_FILE.read_text())
    assert doc["values"]["nccl_buffer_bytes"] == DEFAULT_NCCL_BUFFER_BYTES == 512 * MiB
    assert "assumption" in doc["sources"]["nccl_buffer_bytes"]
    assert nccl_buffer_bytes(coeffs) == DEFAULT_NCCL_BUFFER_BYTES
    bare = Coefficients(name="x", description="x",
                        values={k: v for k, v in coeffs.values.items() if k != "nccl_buffer_bytes"})
    assert nccl_buffer_bytes(bare) == DEFAULT_NCCL_BUFFER_BYTES
    big = Coefficients(name="x", description="x", values={**coeffs.values, "nccl_buffer_bytes": 2**30})
    assert nccl_buffer_bytes(big) == 2**30


# =========================================================================== planning

def test_llama70b_on_rtx4090(llama70, coeffs):
    """DDP never fits (every rank holds the whole ~36 GiB 4-bit model). FSDP fits on some N in 2..8
    once rank 0 loads on the CPU; with every rank loading the whole model first, the load phase
    alone (> 24 GiB) rules out every N: the brief's load fact and the 2..8 expectation conflict."""
    gpu = load_gpu("rtx4090")
    cap = capacity_bytes(gpu, coeffs)
    for n in range(2, 9):
        assert best_multi(llama70, gpu, Request(), coeffs, n, "ddp") is None
    best = smallest_gpu_count(llama70, gpu, Request(), coeffs, loading="rank0_cpu")
    assert best is not None and best.strategy == "fsdp" and 2 <= best.n <= 8
    assert best.fits and best.memory.needs_bytes <= cap and best.train.optim == FSDP_OPTIM
    assert best_multi(llama70, gpu, Request(), coeffs, best.n - 1, "fsdp", loading="rank0_cpu") is None
    assert smallest_gpu_count(llama70, gpu, Request(), coeffs, loading="full") is None
    assert fsdp_per_gpu(llama70, LORA, TRAIN, coeffs, 8).load_needs_bytes > cap


def test_small_model_fits_ddp_on_two_gpus(coeffs):
    best = smallest_gpu_count(load_model("mistral-7b"), load_gpu("rtx4090"), Request(), coeffs)
    assert best is not None and best.n == 2 and best.strategy == "ddp"
    assert best.global_batch == 2 * best.train.effective_batch == 16  # the default 16 split over 2 ranks


def test_plan_multi_ranks_fitting_first(mistral, coeffs):
    plans = plan_multi(mistral, load_gpu("rtx4090"), Request(), coeffs, 2, "ddp")
    flags = [p.fits for p in plans]
    assert flags == sorted(flags, reverse=True)
    with pytest.raises(ValueError, match="strategy"):
        plan_multi(mistral, load_gpu("rtx4090"), Request(), coeffs, 2, "zero3")
    with pytest.raises(ValueError):
        fsdp_per_gpu(mistral, LORA, TRAIN, coeffs, 0)


# =========================================================================== properties

@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 8), seq=st.sampled_from([256, 512, 1024, 2048]), rank=st.sampled_from([4, 8, 16, 64]),
       n=st.integers(1, 7), ckpt=st.booleans())
def test_fsdp_monotone_properties(batch, seq, rank, n, ckpt):
    coeffs = load_coefficients()
    model = load_model("llama-3.1-8b")
    lora = LoraSettings(rank=rank, alpha=2 * rank)
    train = TrainSettings(batch_size=batch, seq_len=seq, gradient_checkpointing=ckpt, optim="adamw_torch")
    m = fsdp_per_gpu(model, lora, train, coeffs, n, loading="rank0_cpu")
    # more GPUs never need more per GPU; a bigger batch never needs less
    assert fsdp_per_gpu(model, lora, train, coeffs, n + 1, loading="rank0_cpu").needs_bytes <= m.needs_bytes
    bigger = replace(train, batch_size=batch + 1)
    assert fsdp_per_gpu(model, lora, bigger, coeffs, n, loading="rank0_cpu").needs_bytes >= m.needs_bytes
    # the load phase never depends on the batch
    assert fsdp_per_gpu(model, lora, bigger, coeffs, n).load_needs_bytes == fsdp_per_gpu(
        model, lora, train, coeffs, n).load_needs_bytes


def test_module_is_pure():
    code = ("import sys, planner.multigpu; bad = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', "
            "'accelerate', 'pandas') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
