"""Throughput of a QLoRA step (tokens/s): a sum of named time terms, with the CPU's kernel launches and the GPU's
work overlapping. Pure functions; no I/O; standard library only.

One micro-batch costs the larger of two times (smoothly: a p-norm with the fitted exponent `speed_overlap`):

  CPU   Python and kernel launches: a cost per decoder-layer pass, per 4-bit linear call (bitsandbytes'
        dequantize + matmul), per LoRA module call (peft's dropout, A, B, scale, add) and per micro-batch.
        Small micro-batches of small models are bound by this; it varies from machine to machine.
  GPU   the frozen base's matmuls (forward, input-gradient backward, the recompute of checkpointed layers, the
        lm_head) at a fitted fraction of the datasheet tensor rate; attention (the causal flash kernel when
        micro-batches carry no mask, the memory-efficient kernel over the full s x s block when they are packed or a
        sliding window reaches the sequence length);
        dequantization traffic per pass; the activations' elementwise traffic per layer pass; the fp32 logits
        chain; LoRA's traffic over its inputs and outputs.

A 16-bit base (lora) or an LLM.int8 base (lora-8bit) changes named terms of its own (METHOD_TERMS, "the base, by
method" below): factors on the forward and backward passes' CPU terms, its own weight traffic, and for lora-8bit its
int8 forward and fp32 backward matmuls at the GPU's int8 and fp32 datasheet rates and its own overlap exponent (its
forward synchronises the GPU on every int8 linear). One fit covers every method's rows.

An optimizer step adds a cost per trainable tensor (bitsandbytes' optimizers update tensor by tensor), the
optimizer state traffic, and a fixed cost. Step time = accumulation x micro-batch time + optimizer step.

Each term is a feature in physical units (seconds at the datasheet rate, a count of calls) and its coefficient
is fitted on measured steps (planner/speed_fit.py, calibration/speed/*.csv): 1/efficiency for rate terms,
seconds per call for counts. The coefficients come only through Coefficients (`speed_<term>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from planner.memory import resolve_targets, sliding_window_masked, trainable_params
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
    method: str = "qlora"  # planner.specs.METHODS: a non-4-bit base prices its CPU terms with its own factors
    cpu_forward_share: float = 1.0  # of the per-layer CPU terms, the forward passes' share (recompute included)


def features(model: ModelSpec, lora: LoraSettings, train: TrainSettings, gpu: GpuSpec) -> SpeedFeatures:
    """Every term's feature for one micro-batch of train.batch_size x train.seq_len tokens (packed or not): the
    GPU-independent work (FLOPs, bytes, calls) scaled by this GPU's datasheet rates."""
    peak = gpu.tflops(train.compute_dtype) * 1e12
    bw = gpu.bandwidth_gb_s * 1e9
    cpu, flops, traffic, step_counts, step_bytes = _work(model, lora, train)
    flops = dict(flops)
    rates = {}
    if train.method != "qlora":  # the base's own weight traffic replaces 4-bit dequantization's
        suffix = METHOD_TERM_SUFFIX[train.method]
        traffic = {(f"base_{suffix}" if k == "dequant" else k): v for k, v in traffic.items()}
        traffic[f"base_{suffix}"] = method_base_traffic_bytes(model, train)
        if train.method == "lora-8bit":  # the base's matmuls leave the compute-dtype rate (the lm_head stays)
            int8_fwd, bwd, bwd_fp32 = int8_base_matmul_flops(model, train)
            flops["base_matmul"] -= int8_fwd + bwd
            if bwd_fp32:
                rates["fp32_matmul"] = bwd / (gpu.fp32_tflops * 1e12) if gpu.fp32_tflops > 0 else 0.0
            else:
                flops["base_matmul"] += bwd
            rates["int8_matmul"] = int8_fwd / (gpu.int8_tops * 1e12) if gpu.int8_tops > 0 else 0.0
    gpu_terms = {**{k: v / peak for k, v in flops.items()}, **{k: v / bw for k, v in traffic.items()}, **rates}
    step = {**step_counts, **{k: v / bw for k, v in step_bytes.items()}}
    L = model.num_hidden_layers
    ck = train.checkpointed_layers(L)
    return SpeedFeatures(train.grad_accum, train.tokens_per_micro_batch * train.grad_accum, dict(cpu), gpu_terms, step,
                         train.method, (L + ck) / (2 * L + ck))


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
    # an explicit mask (packed micro-batches, or a sliding window the sequence reaches) leaves the flash kernel
    masked = train.packing or sliding_window_masked(model, train)
    cpu = {
        "layer_pass": float(layer_passes),
        "linear_call": float(layer_passes * sum(lin.count for lin in model.layer_linears)),
        "lora_call": float(layer_passes * lora_modules),
        "micro_batch": 1.0,
    }
    flops = {
        "base_matmul": 2 * t * base * passes + 4 * t * head,
        "attention_flash": 0.0 if masked else attn,
        "attention_masked": 2 * attn if masked else 0.0,  # no causal skipping with an explicit mask
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
    "lora": "lora: 16-bit base: no dequantization, fewer kernel launches; measured on an H100 1.25-1.5x faster than "
            "qlora (calibration/REPORT.md, Methods), other GPUs by the datasheet",
    "lora-8bit": "lora-8bit: LLM.int8 base: its backward multiplies in fp32 (bitsandbytes MatMul8bitLt), measured on "
                 "an H100 1.2-3.1x slower than qlora; peak memory assumes a trained checkpoint's few outlier columns "
                 "(calibration/REPORT.md, Methods)",
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
# What a non-4-bit base changes, each a fitted term (planner.speed_fit.fit_method, on that method's rows with every
# QLoRA coefficient held):
#   lora       speed_cpu_fwd_16bit, speed_cpu_bwd_16bit: factors on the per-layer CPU terms of the forward passes
#              (recompute included) and of the backward pass. A 16-bit nn.Linear launches one GEMM where bitsandbytes'
#              Linear4bit dequantizes and casts, and its backward is native autograd where MatMul4Bit's is a Python
#              autograd.Function; measured on an H100, CPU-bound steps take 0.7x QLoRA's.
#              speed_traffic_16bit: a factor on the elementwise traffic (activations, lora_traffic): the residual
#              stream is in the compute dtype, not fp32 (no k-bit preparation).
#              speed_base_16bit: a multiple of the base's weight-path bytes (one weight read per pass).
#   lora-8bit  speed_cpu_fwd_8bit, speed_cpu_bwd_8bit: the same two factors for LLM.int8's launches (the forward
#              quantizes the input, finds its outlier columns, multiplies int8 and dequantizes; the backward
#              dequantizes the weight and multiplies).
#              speed_overlap_8bit: its own overlap exponent. MatMul8bitLt's forward synchronises the GPU on every
#              call: bitsandbytes 0.50's int8_vectorwise_quant (backends/cuda/ops.py) tests `if outliers.any():`, a
#              Python bool of a CUDA tensor, and zeroes the outlier columns by tensor indexing (two syncs per int8
#              linear, counted by calibration/logs/sync_check.py), so the CPU waits for the GPU before every int8
#              linear and the two no longer hide each other over the whole pass (a smaller exponent: nearer their
#              sum than their max).
#              speed_base_8bit: a multiple of its weight-path and activation-quantization bytes.
#              speed_int8_matmul, speed_fp32_matmul: 1 / efficiency of the forward's int8 tensor-core matmuls and of
#              the input-gradient backward's fp32 matmul (int8_base_matmul_flops).
# Coefficients without them fall back to QLoRA's terms (factors 1, the dequant, base_matmul and overlap coefficients): a
# structural estimate, and the plan says so.
METHOD_TERMS = {
    "lora": ("speed_cpu_fwd_16bit", "speed_cpu_bwd_16bit", "speed_traffic_16bit", "speed_base_16bit"),
    "lora-8bit": ("speed_cpu_fwd_8bit", "speed_cpu_bwd_8bit", "speed_overlap_8bit", "speed_base_8bit",
                  "speed_int8_matmul", "speed_fp32_matmul"),
}
OVERLAP_BOUNDS = (1.0, 30.0)  # the p-norm's exponent: 1 adds CPU and GPU time, a large one takes their max


def _method_term_bounds(key: str) -> tuple[float, float]:
    if key.startswith("speed_overlap"):
        return OVERLAP_BOUNDS
    if key.startswith(("speed_base_", "speed_int8", "speed_fp32")):
        return (1.0, float("inf"))  # a rate or bytes multiple cannot beat the datasheet, as for QLoRA's GPU terms
    return (0.05, 20.0)  # factors may go either way


# (lower, upper) bound of each method term in the fit
METHOD_TERM_BOUNDS = {k: _method_term_bounds(k) for ks in METHOD_TERMS.values() for k in ks}
_FALLBACK = {"speed_base_16bit": "speed_dequant", "speed_base_8bit": "speed_dequant",
             "speed_int8_matmul": "speed_base_matmul", "speed_fp32_matmul": "speed_base_matmul",
             "speed_overlap_8bit": "speed_overlap"}
_DEFAULT = {"speed_cpu_fwd_16bit": 1.0, "speed_cpu_bwd_16bit": 1.0, "speed_traffic_16bit": 1.0,
            "speed_cpu_fwd_8bit": 1.0, "speed_cpu_bwd_8bit": 1.0}
TRAFFIC_TERMS = ("activations", "lora_traffic")


def int8_base_matmul_flops(model: ModelSpec, train: TrainSettings) -> tuple[float, float, bool]:
    """lora-8bit, per micro-batch: (forward int8 matmul FLOPs incl. the recompute, input-gradient backward FLOPs,
    whether that backward runs in fp32). bitsandbytes 0.50 MatMul8bitLt (autograd/_functions.py): the forward
    quantizes the input and multiplies int8 x int8 (int8_scaled_mm, tensor cores); the backward dequantizes the
    weight to the input's dtype and calls torch.matmul(grad_output.to(dtype_A), CB): fp32 after the k-bit upcast,
    and torch's default fp32 matmul is IEEE fp32 on CUDA cores (TF32 is off unless the user turns it on), outside
    autocast (an autograd.Function's backward). MoE experts are not int8 linears (they stay in base_matmul)."""
    fwd, bwd, base = _base_passes(model, train)
    t = train.tokens_per_micro_batch
    return 2 * t * base * fwd, 2 * t * base * bwd, train.upcast_fp32


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


def method_cpu_seconds(f: SpeedFeatures, coeffs: Coefficients, cpu_terms: dict[str, float]) -> float:
    """The CPU seconds of a non-4-bit base from QLoRA's priced CPU terms (seconds per term): its per-layer terms
    with the method's own factors for the forward passes (recompute included) and the backward pass; the
    per-micro-batch term as QLoRA's."""
    suffix = METHOD_TERM_SUFFIX[f.method]
    per_layer = sum(v for k, v in cpu_terms.items() if k != "micro_batch")
    fwd, bwd = coefficient(coeffs, f"speed_cpu_fwd_{suffix}"), coefficient(coeffs, f"speed_cpu_bwd_{suffix}")
    share = f.cpu_forward_share
    return cpu_terms.get("micro_batch", 0.0) + per_layer * (fwd * share + bwd * (1.0 - share))


def overlap_exponent(f: SpeedFeatures, coeffs: Coefficients) -> float:
    """The p-norm exponent that joins a micro-batch's CPU and GPU seconds (lora-8bit has its own)."""
    return coefficient(coeffs, "speed_overlap_8bit") if f.method == "lora-8bit" else coeffs.get("speed_overlap")


def micro_batch_seconds(f: SpeedFeatures, coeffs: Coefficients) -> tuple[float, float, float]:
    """(CPU seconds, GPU seconds, overlapped seconds) of one micro-batch."""
    terms = {k: coefficient(coeffs, f"speed_{k}") * v for k, v in f.cpu.items()}
    cpu = sum(terms.values()) if f.method == "qlora" else method_cpu_seconds(f, coeffs, terms)
    traffic = coefficient(coeffs, "speed_traffic_16bit") if f.method == "lora" else 1.0
    gpu = sum(coefficient(coeffs, f"speed_{k}") * v * (traffic if k in TRAFFIC_TERMS else 1.0) for k, v in f.gpu.items())
    p = overlap_exponent(f, coeffs)
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
    if train.method == "lora-8bit" and (gpu.int8_tops <= 0 or gpu.fp32_tflops <= 0):
        return 0.0  # the datasheet lists no int8 tensor-core (or fp32) rate for this card
    f = features(model, lora, train, gpu)
    return f.tokens_per_step / step_seconds(f, coeffs)
