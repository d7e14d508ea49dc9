"""Throughput estimate (tokens/s) of a QLoRA step: a roofline-style sum of matmul time and
dequantization traffic and per-kernel overhead. Calibrated on measured runs: mfu (the fraction of
the GPU's dense tensor rate the matmuls reach) and linear_call_overhead_s (launch and Python
overhead per 4-bit linear call). dequant_bw_frac is not identifiable on the H200 (dequantization is
about 1-3% of a step there) and stays at its stated default. Pure functions; no I/O.
"""

from __future__ import annotations

from planner.memory import resolve_targets
from planner.specs import Coefficients, GpuSpec, LoraSettings, ModelSpec, TrainSettings

DEQUANT_BYTES_PER_PARAM = 0.5 + 0.0625 + 2 + 2  # read NF4 + scales, write bf16 weight, matmul reads it back


def step_flops(model: ModelSpec, lora: LoraSettings, train: TrainSettings) -> float:
    """FLOPs of one micro-batch: forward, input-gradient backward of the frozen base (no weight
    gradients), recompute under checkpointing, causal attention, and LoRA's own three matmuls."""
    t, s = train.tokens_per_micro_batch, train.seq_len
    experts = model.num_experts_per_tok if model.is_moe else 0
    base = model.quantized_param_count
    if model.is_moe:  # experts are outside the linear inventory: only top-k of them run per token
        per_layer_expert = (model.layer_other_params - 2 * model.hidden_size) // max(1, model.num_local_experts)
        base += model.num_hidden_layers * experts * per_layer_expert
    head = model.vocab_size * model.hidden_size
    fwd = 2 * t * (base + head)
    attn_fwd = 2 * t * s * model.q_dim * model.num_hidden_layers  # QK^T and PV, causal half of 4*t*s*d
    names = resolve_targets(model, lora.targets)
    lora_p = sum(lin.count * lora.rank * (lin.in_features + lin.out_features) for lin in model.linears_in(names))
    lora_fwd = 2 * t * lora_p * model.num_hidden_layers
    passes = 1 + recompute_fraction(model, train)  # forward (+ recompute of the checkpointed layers)
    return passes * (fwd + attn_fwd + lora_fwd) + fwd + 2.5 * attn_fwd + 2 * lora_fwd


def recompute_fraction(model: ModelSpec, train: TrainSettings) -> float:
    """The share of decoder layers whose forward runs again in backward (checkpointed layers)."""
    return train.checkpointed_layers(model.num_hidden_layers) / model.num_hidden_layers


def dequant_bytes(model: ModelSpec, train: TrainSettings) -> float:
    """Bytes moved dequantizing every 4-bit weight once per pass (forward, backward, recompute)."""
    passes = 2 + recompute_fraction(model, train)
    return passes * DEQUANT_BYTES_PER_PARAM * model.quantized_param_count


def linear_calls(model: ModelSpec, train: TrainSettings) -> int:
    """4-bit linear invocations per micro-batch (forward, backward, recompute): each costs a
    dequantize kernel, a matmul and the LoRA kernels, whose launch overhead dominates small batches."""
    layer_passes = 2 * model.num_hidden_layers + train.checkpointed_layers(model.num_hidden_layers)
    return layer_passes * sum(lin.count for lin in model.layer_linears)


def tokens_per_second(model: ModelSpec, lora: LoraSettings, train: TrainSettings, gpu: GpuSpec,
                      coeffs: Coefficients) -> float:
    """Estimated training tokens/s; 0.0 when the GPU profile has no speed facts (bare capacity)."""
    tflops = gpu.tflops(train.compute_dtype)
    if tflops <= 0 or gpu.bandwidth_gb_s <= 0:
        return 0.0
    compute_s = step_flops(model, lora, train) / (tflops * 1e12 * coeffs.get("mfu"))
    memory_s = dequant_bytes(model, train) / (gpu.bandwidth_gb_s * 1e9 * coeffs.get("dequant_bw_frac"))
    overhead_s = linear_calls(model, train) * coeffs.get("linear_call_overhead_s")
    seconds = compute_s + memory_s + overhead_s
    return train.tokens_per_micro_batch / seconds
