"""planner.multigpu: per-GPU memory under DDP and FSDP. The structure is first principles plus what 2 x H200
measured (calibration/multigpu): every rank loads the whole 4-bit model (rank0_cpu loading does not change that
and is refused), FSDP's wrap holds it beside the new 1/N shards, NCCL's term and FSDP's margin are coefficients.
These tests check that structure and those facts, not the fitted numbers.
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

from planner.coefficients import DEFAULTS_FILE, load_coefficients
from planner.memory import (
    alloc,
    cuda_context_bytes,
    estimate,
    lora_grads_bytes,
    lora_params_bytes,
    lora_tensor_numels,
    phases,
    quant_constants_bytes,
    quantized_weights_bytes,
    required_budget_bytes,
    resolve_targets,
    unquantized_weights_bytes,
)
from planner.multigpu import (
    CALIBRATED_NOTE,
    DEFAULT_NCCL_BUFFER_BYTES,
    ESTIMATE_NOTE,
    FSDP_OPTIM,
    RANK0_CPU_MEASURED,
    best_multi,
    ddp_bucket_bytes,
    ddp_per_gpu,
    fewest_gpus,
    fsdp_margin_frac,
    fsdp_per_gpu,
    fsdp_unquantized_bytes,
    multigpu_calibrated,
    nccl_buffer_bytes,
    plan_multi,
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


def load_alloc_bytes(model, lora, train, n: int) -> int:
    """The measured load/wrap peak from the public byte functions: each rank holds the whole 4-bit model
    (weights + constants + compute-dtype unquantized weights) and the whole LoRA, and fully_shard allocates
    the 1/N shards of each (LoRA per tensor, in 512-byte blocks) while the whole tensors are still held."""
    q, c = quantized_weights_bytes(model), quant_constants_bytes(model, train.double_quant)
    u = fsdp_unquantized_bytes(model, train)
    numels = lora_tensor_numels(model, lora, resolve_targets(model, lora.targets))
    whole = q + c + u + lora_params_bytes(numels)
    shards = math.ceil(q / n) + math.ceil(c / n) + math.ceil(u / n) + sum(alloc(math.ceil(4 * k / n)) for k in numels)
    return whole + shards


def test_activations_use_the_no_upcast_recipe(mistral, coeffs):
    """FSDP-QLoRA keeps the residual stream in the compute dtype (TrainSettings.kbit_upcast=False): the per-rank
    saved activations are memory.phases' no-upcast ones, smaller than the single-GPU (fp32-upcast) recipe's."""
    m = fsdp_per_gpu(mistral, LORA, TRAIN, coeffs, 2)
    no_upcast = {ph["saved_activations"] for ph in phases(mistral, LORA, replace(TRAIN, kbit_upcast=False), coeffs).values()}
    upcast = max(ph["saved_activations"] for ph in phases(mistral, LORA, TRAIN, coeffs).values())
    assert m.saved_activations in no_upcast and 0 < m.saved_activations < upcast


@pytest.mark.parametrize("model_name", ["mistral-7b", "llama-2-13b", "llama-2-70b", "llama-3.1-70b"])
def test_load_phase_dominates_small_batches(model_name, coeffs):
    """Every rank loads the whole 4-bit model and FSDP's wrap adds the 1/N shards beside it (measured on
    2 x H200: Llama-2-13B r64 11.43 GB): with batch 1 x 512 tokens that load/wrap phase is the peak on every
    N >= 2, and its need is the whole model + LoRA + their shards, budgeted like any allocation."""
    model = load_model(model_name)
    for n in range(2, 9):
        expected = (required_budget_bytes(load_alloc_bytes(model, LORA, TRAIN, n), 0, TRAIN, coeffs)
                    + cuda_context_bytes(coeffs) + nccl_buffer_bytes(coeffs))
        m = fsdp_per_gpu(model, LORA, TRAIN, coeffs, n)
        assert m.peak_phase == "load" and m.needs_bytes == m.load_needs_bytes == expected, n
        assert m.training_needs_bytes < m.load_needs_bytes
        # the whole 4-bit model alone is a floor no number of GPUs removes
        assert m.load_needs_bytes > quantized_weights_bytes(model) + quant_constants_bytes(model, TRAIN.double_quant)


def test_rank0_cpu_loading_is_refused_with_the_measurement(mistral, coeffs):
    """accelerate's fsdp_cpu_ram_efficient_loading did not lower the load peak of a 4-bit model on 2 x H200
    (transformers loads a bitsandbytes checkpoint whole on every rank): asking for it is an error that says so."""
    for kw in ({}, {"cpu_offload": True}):
        with pytest.raises(ValueError) as exc:
            fsdp_per_gpu(mistral, LORA, TRAIN, coeffs, 2, loading="rank0_cpu", **kw)
        assert str(exc.value) == RANK0_CPU_MEASURED
    assert "fsdp_cpu_ram_efficient_loading" in RANK0_CPU_MEASURED and "measured on 2 x H200" in RANK0_CPU_MEASURED
    with pytest.raises(ValueError, match="fsdp_cpu_ram_efficient_loading"):
        plan_multi(mistral, load_gpu("rtx4090"), Request(), coeffs, 2, "fsdp", loading="rank0_cpu")
    with pytest.raises(ValueError, match="loading must be one of"):
        fsdp_per_gpu(mistral, LORA, TRAIN, coeffs, 2, loading="meta")


def test_large_vocab_root_unit_stays_gathered(coeffs):
    """Llama-3.1-8B: the root unit (embeddings + untied lm_head, 128,256 x 4,096 each, bf16: 1.96 GiB)
    stays gathered on every rank next to its shard. At 512 tokens the wrap (whole model + shards) is still
    the peak; from 2,048 tokens the per-rank logits (vocab 128,256) make training the peak."""
    model = load_model("llama-3.1-8b")
    m = fsdp_per_gpu(model, LORA, TRAIN, coeffs, 2)
    assert m.gathered_root == 2 * 2 * 128_256 * 4_096 + 2 * 4_096
    assert m.peak_phase == "load"
    long = fsdp_per_gpu(model, LORA, replace(TRAIN, seq_len=2048), coeffs, 2)
    assert long.peak_phase == "training" and long.load_needs_bytes == m.load_needs_bytes
    assert long.logits > m.logits and long.gathered_root == m.gathered_root


def test_tiny_model_peaks_in_training(coeffs):
    """Qwen2.5-0.5B: its logits (vocab 151,936 x 512 tokens x ~22 B fp32/bf16 chain, ~1.6 GiB per rank)
    outweigh the whole 4-bit model (~0.6 GiB), so even the full load is not the peak."""
    m = fsdp_per_gpu(load_model("qwen2.5-0.5b"), LORA, TRAIN, coeffs, 2)
    load_allocated = m.load_needs_bytes - m.cuda_context - m.nccl_buffer - int(coeffs.get("required_const_expandable"))
    assert m.peak_phase == "training" and m.logits > load_allocated


@pytest.mark.parametrize("cpu_offload", [False, True])
def test_fsdp_per_gpu_never_rises_with_n(cpu_offload, llama70, coeffs):
    needs = [fsdp_per_gpu(llama70, LORA, TRAIN, coeffs, n, cpu_offload=cpu_offload).needs_bytes
             for n in range(1, 9)]
    assert needs == sorted(needs, reverse=True)
    assert needs[-1] < needs[0]  # the wrap's shards shrink with N, so sharding helps, if not below the whole model


def test_cpu_offload_keeps_shards_off_the_gpu(llama70, coeffs):
    off = fsdp_per_gpu(llama70, LORA, TRAIN, coeffs, 4, cpu_offload=True)
    on = fsdp_per_gpu(llama70, LORA, TRAIN, coeffs, 4)
    for name in ("quantized_weights", "quant_constants", "unquantized_weights", "lora_params", "lora_grads",
                 "optimizer_state"):
        assert getattr(off, name) == 0, name
    assert off.gathered_layers == on.gathered_layers and off.needs_bytes <= on.needs_bytes
    assert off.training_needs_bytes < on.training_needs_bytes
    assert off.load_needs_bytes == on.load_needs_bytes  # offload does not spare the whole-model load


def test_components_and_fields_are_int_bytes(llama70, coeffs):
    m = fsdp_per_gpu(llama70, LORA, TRAIN, coeffs, 4)
    assert all(isinstance(v, int) and v >= 0 for v in m.components().values())
    assert m.peak_allocated_bytes == sum(getattr(m, f) for f in m.ALLOCATED_FIELDS)
    assert set(m.components()) == set(m.ALLOCATED_FIELDS) | {"allocator_reserve", "calibration_margin",
                                                               "cuda_context", "nccl_buffer"}


def test_calibration_margin_and_note_follow_the_coefficients(llama70, coeffs):
    """The committed coefficients carry the 2 x H200 multi-GPU calibration: FSDP keeps fsdp_margin_frac of the
    training phase's allocated bytes as a named term and the notes say calibrated; coefficients without it
    (a single-GPU fit) give a zero margin and the notes say estimate."""
    assert multigpu_calibrated(coeffs) and 0 < fsdp_margin_frac(coeffs) < 0.05
    m = fsdp_per_gpu(llama70, LORA, TRAIN, coeffs, 4)
    assert m.calibration_margin == int(fsdp_margin_frac(coeffs) * m.peak_allocated_bytes) > 0
    assert CALIBRATED_NOTE in m.notes and ESTIMATE_NOTE not in m.notes
    assert CALIBRATED_NOTE in ddp_per_gpu(llama70, LORA, TRAIN, coeffs, 2).notes
    bare = Coefficients(name="x", description="x",
                        values={k: v for k, v in coeffs.values.items() if k != "fsdp_margin_frac"})
    b = fsdp_per_gpu(llama70, LORA, TRAIN, bare, 4)
    assert not multigpu_calibrated(bare) and b.calibration_margin == 0
    assert ESTIMATE_NOTE in b.notes and CALIBRATED_NOTE not in b.notes
    assert b.training_needs_bytes <= m.training_needs_bytes and b.load_needs_bytes == m.load_needs_bytes


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
    """The defaults keep the 512 MiB assumption; the committed coefficients carry the value measured on
    2 x H200 (NVML used minus torch's pool, context and paged state: 0.70-0.77 GiB per rank), used as is."""
    doc = json.loads(DEFAULTS_FILE.read_text())
    assert doc["values"]["nccl_buffer_bytes"] == DEFAULT_NCCL_BUFFER_BYTES == 512 * MiB
    assert "assumption" in doc["sources"]["nccl_buffer_bytes"]
    measured = coeffs.values["nccl_buffer_bytes"]
    assert nccl_buffer_bytes(coeffs) == int(measured) != DEFAULT_NCCL_BUFFER_BYTES
    assert 0.6 * 2**30 < measured < 1.0 * 2**30
    assert ddp_per_gpu(load_model("mistral-7b"), LORA, TRAIN, coeffs, 2).nccl_buffer == int(measured)
    bare = Coefficients(name="x", description="x",
                        values={k: v for k, v in coeffs.values.items() if k != "nccl_buffer_bytes"})
    assert nccl_buffer_bytes(bare) == DEFAULT_NCCL_BUFFER_BYTES
    big = Coefficients(name="x", description="x", values={**coeffs.values, "nccl_buffer_bytes": 2**30})
    assert nccl_buffer_bytes(big) == 2**30


# =========================================================================== planning

def test_llama70b_on_rtx4090_whole_model_first(llama70, coeffs):
    """--loading full: no count of 24 GiB cards fits Llama-3.1-70B: DDP holds the whole model on every rank, and
    under FSDP every rank first loads the whole ~33 GiB of 4-bit weights and constants (measured: rank-0 CPU loading
    does not avoid it), more than the card holds, with or without CPU offload."""
    gpu = load_gpu("rtx4090")
    cap = capacity_bytes(gpu, coeffs)
    whole = quantized_weights_bytes(llama70) + quant_constants_bytes(llama70, TRAIN.double_quant)
    assert whole > cap
    for n in range(2, 9):
        assert best_multi(llama70, gpu, Request(), coeffs, n, "ddp") is None
        for offload in (False, True):
            assert best_multi(llama70, gpu, Request(), coeffs, n, "fsdp", cpu_offload=offload, loading="full") is None
    assert fewest_gpus(llama70, gpu, Request(), coeffs, loading="full") is None
    assert fewest_gpus(llama70, gpu, Request(), coeffs, cpu_offload=True, loading="full") is None
    assert fsdp_per_gpu(llama70, LORA, TRAIN, coeffs, 8, loading="full").load_needs_bytes > cap
    # the training phase alone would fit on 8: the load is what rules it out
    assert fsdp_per_gpu(llama70, LORA, TRAIN, coeffs, 8, loading="full").training_needs_bytes < cap


def test_llama70b_on_two_rtx4090_with_sharded_loading(llama70, coeffs):
    """--loading sharded (the default): the load phase holds the shards, the whole quant_state and one tensor, so it
    no longer rules 24 GiB cards out. On 2 x RTX 4090 the training phase needs CPU offload (without it the 4-bit
    shards, ~16 GiB each, plus the gathered root and activations exceed the card); with it, it fits, and the node needs
    the offloaded shards (the whole 4-bit model and more) in CPU RAM."""
    gpu = load_gpu("rtx4090")
    cap = capacity_bytes(gpu, coeffs)
    assert best_multi(llama70, gpu, Request(), coeffs, 2, "fsdp", cpu_offload=False) is None
    best = best_multi(llama70, gpu, Request(), coeffs, 2, "fsdp", cpu_offload=True)
    assert best is not None and best.memory.loading == "sharded" and best.memory.needs_bytes <= cap
    assert fewest_gpus(llama70, gpu, Request(), coeffs) == (2, "fsdp", True)
    m = fsdp_per_gpu(llama70, LORA, TRAIN, coeffs, 2, cpu_offload=True, loading="sharded")
    terms = dict(m.load_terms)
    assert terms["shards"] == 0  # offloaded: nothing of the model stays on the GPU between layers
    assert terms["quant_state"] == m.quant_constants == quant_constants_bytes(llama70, TRAIN.double_quant)
    # one tensor: the largest decoder linear (8,192 x 28,672) in bf16 + its NF4 pack + its constants + a half-pack chunk
    k = 8192 * 28672
    assert terms["one_tensor"] == pytest.approx(2 * k + k // 2 + k // 64 + 4 * k // 64 + k // 4, rel=1e-3)
    assert m.load_allocated == sum(terms.values()) and m.load_needs_bytes < cap
    ram = m.cpu_ram
    assert ram.offloaded_params > quantized_weights_bytes(llama70)  # every rank's shard: the whole model, and more
    assert ram.read_buffers == 2 * 2 * 128256 * 8192  # each rank reads the bf16 embedding whole
    assert ram.total_bytes == sum(ram.components().values())
    # without offload the shards are on the GPU, the node's RAM holds only the read buffers
    on = fsdp_per_gpu(llama70, LORA, TRAIN, coeffs, 2, cpu_offload=False, loading="sharded")
    assert on.cpu_ram.total_bytes == ram.read_buffers and on.needs_bytes > cap
    assert dict(on.load_terms)["shards"] == on.quantized_weights + on.unquantized_weights + on.lora_params


def test_sharded_load_is_below_the_whole_model_first_load(mistral, coeffs):
    """The sharded loader never holds the whole model: its load phase is below the measured whole-model-first one for
    every count, and it falls as the count grows."""
    loads = [fsdp_per_gpu(mistral, LORA, TRAIN, coeffs, n, loading="sharded").load_needs_bytes for n in (2, 4, 8)]
    assert loads == sorted(loads, reverse=True) and loads[0] > loads[-1]
    for n, load in zip((2, 4, 8), loads):
        assert load < fsdp_per_gpu(mistral, LORA, TRAIN, coeffs, n, loading="full").load_needs_bytes


def test_qwen14b_seq4096_needs_two_rtx4090_with_fsdp(coeffs):
    """The plan that ran on 2 x H200 capped to an RTX 4090 each (calibration/multigpu, no OOM): Qwen2.5-14B at
    seq 4096 fits two 24 GiB cards with FSDP, while one card and DDP (the whole model per rank) do not."""
    model, gpu, req = load_model("qwen2.5-14b"), load_gpu("rtx4090"), Request(seq_len=4096)
    assert fewest_gpus(model, gpu, req, coeffs) == (2, "fsdp", False)  # (n, strategy, cpu_offload)
    best = best_multi(model, gpu, req, coeffs, 2, "fsdp")
    assert best is not None and best.train.optim == FSDP_OPTIM
    assert best.memory.needs_bytes <= capacity_bytes(gpu, coeffs) and best.memory.cpu_offload is False
    assert best_multi(model, gpu, req, coeffs, 2, "ddp") is None


def test_small_model_fits_ddp_on_two_gpus(coeffs):
    model, gpu = load_model("mistral-7b"), load_gpu("rtx4090")
    assert fewest_gpus(model, gpu, Request(), coeffs) == (2, "ddp", False)
    best = best_multi(model, gpu, Request(), coeffs, 2, "ddp")
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
    m = fsdp_per_gpu(model, lora, train, coeffs, n)
    # more GPUs never need more per GPU; a bigger batch never needs less
    assert fsdp_per_gpu(model, lora, train, coeffs, n + 1).needs_bytes <= m.needs_bytes
    bigger = replace(train, batch_size=batch + 1)
    assert fsdp_per_gpu(model, lora, bigger, coeffs, n).needs_bytes >= m.needs_bytes
    # the load phase never depends on the batch
    assert fsdp_per_gpu(model, lora, bigger, coeffs, n).load_needs_bytes == fsdp_per_gpu(
        model, lora, train, coeffs, n).load_needs_bytes


def test_module_is_pure():
    code = ("import sys, planner.multigpu; bad = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', "
            "'accelerate', 'pandas') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
