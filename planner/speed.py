"""Throughput of a QLoRA step (tokens/s): a sum of named time terms, with the CPU's kernel launches and the GPU's
work overlapping. Pure functions; no I/O; standard library only.

One micro-batch costs the larger of two times (smoothly: a p-norm with the fitted exponent `speed_overlap`):

  CPU   Python and kernel launches: a cost per decoder-layer pass, per 4-bit linear call (bitsandbytes'
        dequantize + matmul), per LoRA module call (peft's dropout, A, B, scale, add) and per micro-batch.
        Small micro-batches of small models are bound by this; it varies from machine to machine.
  GPU   the frozen base's matmuls (forward, input-gradient backward, the recompute of checkpointed layers, the
        lm_head) at a fitted fraction of the datasheet tensor rate; attention (the causal flash kernel when
        micro-batches carry no mask, the memory-efficient kernel over the full s x s block when they are packed);
        dequantization traffic per pass; the activations' elementwise traffic per layer pass; the fp32 logits
        chain; LoRA's traffic over its inputs and outputs.

An optimizer step adds a cost per trainable tensor (bitsandbytes' optimizers update tensor by tensor), the
optimizer state traffic, and a fixed cost. Step time = accumulation x micro-batch time + optimizer step.

Each term is a feature in physical units (seconds at the datasheet rate, a count of calls) and its coefficient
is fitted on measured steps (planner/speed_fit.py, calibration/speed/*.csv): 1/efficiency for rate terms,
seconds per call for counts. The coefficients come only through Coefficients (`speed_<term>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from planner.memory import resolve_targets, trainable_params
from planner.specs import Coefficients, GpuSpec, LoraSettings, ModelSpec, TrainSettings
from planner.units import DTYPE_BYTES

FP32 = DTYPE_BYTES["fp32"]

# Bytes moved to dequantize one 4-bit weight for one matmul: read NF4 (0.5 B) and its scales (1/16 B), write the
# compute-dtype weight (2 B), the matmul reads it back (2 B).
DEQUANT_BYTES_PER_PARAM = 0.5 + 0.0625 + 2 + 2
CPU_TERMS = ("layer_pass", "linear_call", "lora_call", "micro_batch")
GPU_TERMS = ("base_matmul", "attention_flash", "attention_masked", "dequant", "activations", "logits", "lora_traffic")
STEP_TERMS = ("optimizer_tensor", "optimizer_traffic", "optimizer_step")
TERMS = CPU_TERMS + GPU_TERMS + STEP_TERMS


@dataclass(frozen=True, slots=True)
class SpeedFeatures:
    """The features of one configuration: per micro-batch (CPU and GPU terms) and per optimizer step."""

    grad_accum: int
    tokens_per_step: int  # computed tokens (padding included) per optimizer step
    cpu: dict[str, float]
    gpu: dict[str, float]
    step: dict[str, float]
    method: str = "qlora"  # planner.specs.METHODS: a non-4-bit base scales the CPU terms by its own factor


def features(model: ModelSpec, lora: LoraSettings, train: TrainSettings, gpu: GpuSpec) -> SpeedFeatures:
    """Every term's feature for one micro-batch of train.batch_size x train.seq_len tokens (packed or not): the
    GPU-independent work (FLOPs, bytes, calls) scaled by this GPU's datasheet rates."""
    peak = gpu.tflops(train.compute_dtype) * 1e12
    bw = gpu.bandwidth_gb_s * 1e9
    cpu, flops, traffic, step_counts, step_bytes = _work(model, lora, train)
    if train.method != "qlora":  # the base's own weight traffic replaces 4-bit dequantization's
        suffix = METHOD_TERM_SUFFIX[train.method]
        traffic = {(f"base_{suffix}" if k == "dequant" else k): v for k, v in traffic.items()}
        traffic[f"base_{suffix}"] = method_base_traffic_bytes(model, train)
    gpu_terms = {**{k: v / peak for k, v in flops.items()}, **{k: v / bw for k, v in traffic.items()}}
    step = {**step_counts, **{k: v / bw for k, v in step_bytes.items()}}
    return SpeedFeatures(train.grad_accum, train.tokens_per_micro_batch * train.grad_accum, dict(cpu), gpu_terms, step,
                         train.method)


@lru_cache(maxsize=8192)
def _work(model: ModelSpec, lora: LoraSettings, train: TrainSettings):
    """(CPU call counts, FLOPs per GPU term, bytes per GPU term, optimizer-step counts, optimizer-step bytes) of one
    micro-batch: what does not depend on the GPU (qfit compare evaluates the same candidates on every card)."""
    t, s, L = train.tokens_per_micro_batch, train.seq_len, model.num_hidden_layers
    ck = train.checkpointed_layers(L)
    rf = ck / L
    passes = 2 + rf  # forward, input-gradient backward, recompute of the checkpointed layers
    layer_passes = 2 * L + ck
    base = model.quantized_param_count
    if model.is_moe:  # experts are outside the linear inventory: only top-k of them run per token
        per_expert = (model.layer_other_params - 2 * model.hidden_size) // max(1, model.num_local_experts)
        base += L * model.num_experts_per_tok * per_expert
    head = model.vocab_size * model.hidden_size
    names = resolve_targets(model, lora.targets)
    wrapped = model.linears_in(names)
    lora_modules = sum(lin.count for lin in wrapped)
    lora_width = sum(lin.count * (lin.in_features + lin.out_features) for lin in wrapped)
    c = DTYPE_BYTES[train.compute_dtype]
    attn_fwd = 2 * t * s * model.q_dim * L  # QK^T and PV over the causal half
    attn = attn_fwd * (1 + rf) + 2.5 * attn_fwd  # forward (+ recompute) and backward
    cpu = {
        "layer_pass": float(layer_passes),
        "linear_call": float(layer_passes * sum(lin.count for lin in model.layer_linears)),
        "lora_call": float(layer_passes * lora_modules),
        "micro_batch": 1.0,
    }
    flops = {
        "base_matmul": 2 * t * base * passes + 4 * t * head,
        "attention_flash": 0.0 if train.packing else attn,
        "attention_masked": 2 * attn if train.packing else 0.0,  # no causal skipping with an explicit mask
    }
    traffic = {
        "dequant": passes * DEQUANT_BYTES_PER_PARAM * base,
        "activations": t * layer_passes * (model.hidden_size + model.intermediate_size) * c,
        "logits": t * model.vocab_size * 4,
        "lora_traffic": t * lora_width * layer_passes * c,
    }
    eight_bit = "8bit" in train.optim
    step_counts = {"optimizer_tensor": float(2 * lora_modules * L), "optimizer_step": 1.0}  # A and B of every wrapped linear
    step_bytes = {"optimizer_traffic": trainable_params(model, lora) * (8 if eight_bit else 16)}
    return cpu, flops, traffic, step_counts, step_bytes


# --------------------------------------------------------------------------- the base, by method (lora, lora-8bit)

METHOD_SPEED_NOTES = {
    "lora": "lora: 16-bit base: the matmuls read the compute-dtype weight, no dequantization; memory and step time "
            "measured on an H100 only (calibration/REPORT.md, Methods), other GPUs by the datasheet",
    "lora-8bit": "lora-8bit: LLM.int8 base: measured on an H100 2.0-2.9x slower than qlora, and its peak memory up "
                 "to 20% above this model for 3B-7B models (calibration/REPORT.md, Methods): leave headroom, or use "
                 "qlora",
}


def _base_passes(model: ModelSpec, train: TrainSettings) -> tuple[float, float, int]:
    """(forward passes incl. the recompute of checkpointed layers, backward passes, base linear params)."""
    rf = train.checkpointed_layers(model.num_hidden_layers) / model.num_hidden_layers
    return 1 + rf, 1.0, model.quantized_param_count


def method_base_traffic_bytes(model: ModelSpec, train: TrainSettings) -> float:
    """Bytes moved per micro-batch to use the frozen base's weights, for a base that is not 4-bit (it takes the
    place of the `dequant` feature, with its coefficient: both are weight traffic at a fitted bandwidth share).

    lora (16-bit base): each pass's matmul reads the compute-dtype weight once, c bytes per param
    (torch F.linear / cuBLAS; no dequantization).
    lora-8bit (bitsandbytes 0.50 MatMul8bitLt, autograd/_functions.py):
      forward (and recompute): A.to(float16) and int8_vectorwise_quant over the input (read a, write 2, read 2,
      write 1 bytes per input element), the int8 matmul reading the int8 weight (1 B/param) and the int32
      result dequantized to A's dtype (read 4, write a per output element);
      backward: `CB.to(dtype_A, copy=True).mul_(SCB ...)` then matmul: read 1, write a, read + write a, read a
      bytes per param (a: the input's dtype, fp32 after the k-bit upcast).
    MoE experts (3-D parameters, not nn.Linear) stay in the compute dtype under every method; their read is
    counted as the 16-bit case."""
    fwd, bwd, base = _base_passes(model, train)
    c = DTYPE_BYTES[train.compute_dtype]
    experts = 0
    if model.is_moe:
        per_expert = (model.layer_other_params - 2 * model.hidden_size) // max(1, model.num_local_experts)
        experts = model.num_hidden_layers * model.num_experts_per_tok * per_expert
    expert_bytes = (fwd + bwd) * c * experts
    if train.method == "lora":
        return (fwd + bwd) * c * base + expert_bytes
    a = FP32 if train.upcast_fp32 else c
    t, L = train.tokens_per_micro_batch, model.num_hidden_layers
    ins = L * sum(lin.count * lin.in_features for lin in model.layer_linears)
    outs = L * sum(lin.count * lin.out_features for lin in model.layer_linears)
    forward = base * 1 + t * ins * (a + 2 + 2 + 1) + t * outs * (4 + a)
    backward = base * (1 + 3 * a)
    return fwd * forward + bwd * backward + expert_bytes


METHOD_TERM_SUFFIX = {"lora": "16bit", "lora-8bit": "8bit"}
# What a non-4-bit base changes, as two fitted terms: a factor on the CPU terms (a 16-bit nn.Linear call, and peft's
# LoRA around it without the 4-bit input casts, launch fewer kernels than bitsandbytes' Linear4bit; Linear8bitLt's
# activation quantization launches more) and a multiple of the base's weight-path bytes over the bandwidth (in
# place of `dequant`). Fitted on the methods sweep (planner.speed_fit.fit_method); coefficients without them fall
# back to factor 1 and QLoRA's dequant coefficient (a structural estimate, and the plan says so).
METHOD_TERMS = {m: (f"speed_cpu_{s}", f"speed_base_{s}") for m, s in METHOD_TERM_SUFFIX.items()}
_FALLBACK = {f"speed_base_{s}": "speed_dequant" for s in METHOD_TERM_SUFFIX.values()}
_DEFAULT = {f"speed_cpu_{s}": 1.0 for s in METHOD_TERM_SUFFIX.values()}


def coefficient(coeffs: Coefficients, key: str) -> float:
    """coeffs[key]; a method term the coefficients do not carry takes its QLoRA counterpart's value (factor 1)."""
    if key not in coeffs.values:
        if key in _FALLBACK:
            return coeffs.get(_FALLBACK[key])
        if key in _DEFAULT:
            return _DEFAULT[key]
    return coeffs.get(key)


def method_fitted(coeffs: Coefficients, method: str) -> bool:
    """True when the coefficients carry this method's own fitted terms (always for qlora)."""
    return method == "qlora" or all(k in coeffs.values for k in METHOD_TERMS.get(method, ()))


def micro_batch_seconds(f: SpeedFeatures, coeffs: Coefficients) -> tuple[float, float, float]:
    """(CPU seconds, GPU seconds, overlapped seconds) of one micro-batch."""
    cpu = sum(coefficient(coeffs, f"speed_{k}") * v for k, v in f.cpu.items())
    if f.method != "qlora":
        cpu *= coefficient(coeffs, f"speed_cpu_{METHOD_TERM_SUFFIX[f.method]}")
    gpu = sum(coefficient(coeffs, f"speed_{k}") * v for k, v in f.gpu.items())
    p = coeffs.get("speed_overlap")
    both = (cpu ** p + gpu ** p) ** (1.0 / p) if cpu > 0 or gpu > 0 else 0.0
    return cpu, gpu, both


def step_seconds(f: SpeedFeatures, coeffs: Coefficients) -> float:
    """Seconds per optimizer step: accumulation x micro-batch time + the optimizer step."""
    opt = sum(coeffs.get(f"speed_{k}") * v for k, v in f.step.items())
    return f.grad_accum * micro_batch_seconds(f, coeffs)[2] + opt


def has_speed_model(coeffs: Coefficients) -> bool:
    return all(f"speed_{k}" in coeffs.values for k in TERMS + ("overlap",))


def tokens_per_second(model: ModelSpec, lora: LoraSettings, train: TrainSettings, gpu: GpuSpec,
                      coeffs: Coefficients) -> float:
    """Estimated computed tokens/s (padding included); 0.0 when the GPU profile has no speed facts (a bare
    capacity) or the coefficients hold no speed model."""
    if gpu.tflops(train.compute_dtype) <= 0 or gpu.bandwidth_gb_s <= 0 or not has_speed_model(coeffs):
        return 0.0
    f = features(model, lora, train, gpu)
    return f.tokens_per_step / step_seconds(f, coeffs)
