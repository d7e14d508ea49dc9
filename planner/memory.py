"""The QLoRA memory model: one pure function per named term, each returning int bytes.

Three ways to hold the frozen base (TrainSettings.method, planner.specs.METHODS) change a few terms, each
in its own function below ("--------- the base, by method"): the base weights and their constants, what the
base matmul saves and its workspace, and whether prepare_model_for_kbit_training upcasts the rest to fp32.
qlora (the default) is the calibrated model; lora (16-bit base) and lora-8bit (LLM.int8 base) reuse its
coefficients with their own structural terms, checked on H100 runs (calibration/methods/, REPORT.md "Methods"),
both within QLoRA's leave-one-model-out band; lora-8bit's outlier columns depend on the weights and the data
(int8_outlier_bytes_per_token: measured per calibration row, a default share for trained checkpoints).

The stack modelled is the one users run: transformers `from_pretrained(..., quantization_config=
BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute dtype))`, peft's
`prepare_model_for_kbit_training` (which upcasts every non-4-bit parameter to fp32), a peft LoRA
wrapper, and transformers' Trainer with autocast in the compute dtype. The peak is the max over
the phases of one optimizer step, written out in `estimate()`.

Structure (which tensors exist, their shapes and dtypes) is derived here from the model spec and
the library code named in each docstring. What only measurement can tell (allocator slack, the
CUDA context, backward temporaries, kernel efficiency) enters through `Coefficients` alone.
"""

from __future__ import annotations

from functools import lru_cache

from planner.errors import QfitError
from planner.specs import Coefficients, LinearSpec, LoraSettings, MemoryBreakdown, ModelSpec, TrainSettings
from planner.units import DTYPE_BYTES

# Library facts (not tunable): each is quoted from the source named beside it.
ALLOC_GRANULE = 512  # c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize, every block is a multiple of 512 B
NF4_BLOCKSIZE = 64  # bitsandbytes functional.quantize_4bit default blocksize (CUDA)
DQ_BLOCKSIZE = 256  # bitsandbytes nested quantization of absmax: quantize_blockwise(absmax, blocksize=256)
NF4_CODE_BYTES = 16 * 4  # QuantState.code: the 16 NF4 levels in fp32, one tensor per weight
DQ_CODE_BYTES = 256 * 4  # the nested state's 256-entry dynamic map (fp32): one copy per weight on the GPU, plus the shared one
OPT8_BLOCKSIZE = 256  # bitsandbytes Optimizer8bit.init_state: blockwise absmax per 256 elements
OPT8_MIN_SIZE = 4096  # bitsandbytes optimizers: min_8bit_size; smaller tensors keep 32-bit state
PAGED_MIN_NUMEL = 100_000  # bitsandbytes Optimizer8bit.get_state_buffer: paged only if numel >= 1e5
FP32 = DTYPE_BYTES["fp32"]
BOOL_MASK = 1  # torch.native_dropout returns a bool mask, 1 byte per element
INT64 = 8
RESERVE_TERMS = ("logits_block", "logits_block_ckpt", "recompute_layer", "hidden_block_ckpt", "layer_working_set",
                 "saved_activations")  # see reserve_features


def alloc(n_bytes: int) -> int:
    """Bytes the caching allocator hands out for one tensor of n_bytes (rounded up to 512)."""
    if n_bytes <= 0:
        return 0
    return -(-n_bytes // ALLOC_GRANULE) * ALLOC_GRANULE


# --------------------------------------------------------------------------- LoRA targets

@lru_cache(maxsize=256)
def resolve_targets(model: ModelSpec, targets: tuple[str, ...]) -> tuple[str, ...]:
    """'attn' / 'all-linear' / module names -> the leaf names peft will wrap.

    peft's "all-linear" takes every nn.Linear but the output layer (peft/tuners/tuners_utils.py,
    _maybe_include_all_linear_layers), which for these models is every linear in the decoder layers.
    """
    names: list[str] = []
    for t in targets:
        if t == "all-linear":
            names.extend(model.all_linear_names)
        elif t == "attn":
            names.extend(model.attn_linear_names)
        elif t in model.all_linear_names:
            names.append(t)
        else:
            raise QfitError(
                f"--targets: {model.display_name} has no linear named {t!r} "
                f"(it has {', '.join(model.all_linear_names)}; or use attn, all-linear)")
    return tuple(dict.fromkeys(names))


@lru_cache(maxsize=256)
def lora_tensor_numels(model: ModelSpec, lora: LoraSettings, names: tuple[str, ...]) -> tuple[int, ...]:
    """Element counts of every LoRA tensor peft creates: lora_A (r x in) and lora_B (out x r) per wrapped linear."""
    out = []
    for lin in model.linears_in(names):
        for _ in range(lin.count * model.num_hidden_layers):
            out.append(lora.rank * lin.in_features)
            out.append(lin.out_features * lora.rank)
    return tuple(out)


# --------------------------------------------------------------------------- persistent terms

@lru_cache(maxsize=64)
def quantized_weights_bytes(model: ModelSpec) -> int:
    """4-bit packed base weights: two NF4 values per uint8 (bitsandbytes Params4bit, quant_storage=uint8).

    Only the nn.Linear modules of the decoder layers are quantized; transformers' bitsandbytes
    integration leaves embeddings, lm_head and anything that is not nn.Linear alone
    (transformers/integrations/bitsandbytes.py, replace_with_bnb_linear).
    """
    per_layer = sum(lin.count * alloc(-(-lin.weight_count // 2)) for lin in model.layer_linears)
    return model.num_hidden_layers * per_layer


@lru_cache(maxsize=64)
def quant_constants_bytes(model: ModelSpec, double_quant: bool) -> int:
    """Per-block scales of the 4-bit weights (bitsandbytes functional.quantize_4bit, QuantState).

    Without double quant: one fp32 absmax per 64 weights (0.5 bit/param) plus the 16-entry code.
    With double quant: the absmax is itself quantized to uint8 in blocks of 256, with an fp32
    absmax per block and an fp32 offset (0.127 bit/param), and each weight's nested state holds its
    own copy of the 256-entry fp32 map (on the GPU: 224 x 1 KiB more than the bare formula on the
    H200 after loading Llama-2-7B, plus the one shared map).
    """
    total = 0
    for lin in model.layer_linears:
        blocks = -(-lin.weight_count // NF4_BLOCKSIZE)
        if double_quant:
            per = (alloc(blocks) + alloc(FP32 * -(-blocks // DQ_BLOCKSIZE)) + alloc(NF4_CODE_BYTES) + alloc(FP32)
                   + alloc(DQ_CODE_BYTES))
        else:
            per = alloc(FP32 * blocks) + alloc(NF4_CODE_BYTES)
        total += lin.count * per
    shared = alloc(DQ_CODE_BYTES) if double_quant else 0
    return model.num_hidden_layers * total + shared


def residual_bytes(train: TrainSettings) -> int:
    """Bytes per element of the residual stream and what the 4-bit linears return (they return their
    input's dtype): fp32 after prepare_model_for_kbit_training's upcast, else the compute dtype (the FSDP
    recipe, and a 16-bit base, which is not k-bit prepared: TrainSettings.upcast_fp32)."""
    return FP32 if train.upcast_fp32 else DTYPE_BYTES[train.compute_dtype]


def unquantized_weights_bytes(model: ModelSpec, train: TrainSettings | None = None) -> int:
    """Embeddings, lm_head (unless tied), norms, biases and non-Linear weights, in fp32.

    peft's prepare_model_for_kbit_training casts every fp16/bf16 parameter that is not Params4bit
    to fp32 (peft/utils/other.py).
    """
    return (residual_bytes(train) if train is not None else FP32) * model.unquantized_param_count


@lru_cache(maxsize=256)
def lora_params_bytes(numels: tuple[int, ...]) -> int:
    """LoRA A and B in fp32: peft creates them in fp32 and keeps adapters fp32 (autocast_adapter_dtype=True)."""
    return sum(alloc(FP32 * n) for n in numels)


@lru_cache(maxsize=256)
def lora_grads_bytes(numels: tuple[int, ...]) -> int:
    """One fp32 gradient per LoRA tensor, alive from its first backward until zero_grad(set_to_none)."""
    return sum(alloc(FP32 * n) for n in numels)


@lru_cache(maxsize=256)
def optimizer_state_bytes(numels: tuple[int, ...], optim: str) -> tuple[int, int]:
    """(bytes on torch's allocator, bytes in CUDA managed memory) for the optimizer state.

    adamw_torch: exp_avg and exp_avg_sq in fp32 (the step counter lives on the CPU).
    adamw_8bit / paged_adamw_8bit: uint8 states for tensors of at least 4096 elements with an
    fp32 absmax per 256, fp32 states below that (bitsandbytes Optimizer8bit.init_state).
    paged_*: state tensors of at least 1e5 elements are allocated with cudaMallocManaged
    (get_state_buffer), which torch's counters never see; absmax stays on the allocator.
    """
    on_torch = paged = 0
    eight_bit = optim in ("adamw_8bit", "paged_adamw_8bit")
    is_paged = optim.startswith("paged_")
    for n in numels:
        use8 = eight_bit and n >= OPT8_MIN_SIZE
        state = n if use8 else FP32 * n
        if is_paged and n >= PAGED_MIN_NUMEL:
            paged += 2 * state
        else:
            on_torch += 2 * alloc(state)
        if use8:
            on_torch += 2 * alloc(FP32 * -(-n // OPT8_BLOCKSIZE))
    return on_torch, paged


# --------------------------------------------------------------------------- activations

def _lora_input_bytes(lin: LinearSpec, lora: LoraSettings, compute: int) -> int:
    """Per token, what one LoRA-wrapped linear saves for backward (peft/tuners/lora/bnb.py Linear4bit.forward).

    dropout's bool mask over the input (if dropout > 0), the input cast to the compute dtype by
    autocast for lora_A (saved by the matmul), and lora_A's output (saved by lora_B). The 4-bit
    base matmul saves no activation: bitsandbytes MatMul4Bit keeps only the quantized weight.
    """
    mask = BOOL_MASK * lin.in_features if lora.dropout > 0 else 0
    return lin.count * (mask + compute * lin.in_features + compute * lora.rank)


def layer_saved_bytes_per_token(model: ModelSpec, lora: LoraSettings, names: tuple[str, ...],
                                train: TrainSettings, attn_impl: str) -> int:
    """Bytes autograd keeps per token for one decoder layer when it is NOT checkpointed.

    After the fp32 upcast the residual stream is fp32, and each 4-bit linear returns its input's
    dtype (bitsandbytes Linear4bit.forward casts the output back), so:
      - residual inputs: the layer input and the mid-layer residual, fp32 (saved by the RMSNorms);
        Gemma-2's extra post-norms also keep an fp32 copy of the attention and MLP outputs;
      - attention (sdpa/flash): q, k, v cast to the compute dtype, the output, fp32 logsumexp per head;
        eager: q and the repeated k, v in the compute dtype plus per-head seq-long rows of scores
        (softmax fp32 output and its compute-dtype cast, and tanh output when softcapping);
      - gated MLP: act(gate) input, its output and up, all fp32 (3 x intermediate x 4 B), times
        the experts each token visits for mixture-of-experts;
      - LoRA: see _lora_input_bytes, for every wrapped linear.
    """
    h, i, c = model.hidden_size, model.intermediate_size, DTYPE_BYTES[train.compute_dtype]
    residual = 2 * FP32 * h + 2 * FP32  # two fp32 residual tensors + two rsqrt values
    if model.norms_per_layer > 2:
        residual += (model.norms_per_layer - 2) * FP32 * h
    if attn_impl == "eager":
        score_bytes = FP32 + c + (c if model.attn_logit_softcapping else 0)
        attn = 3 * c * model.q_dim + c * model.q_dim + score_bytes * model.num_attention_heads * train.seq_len
    else:
        attn = c * (model.q_dim + 2 * model.kv_dim) + c * model.q_dim + FP32 * model.num_attention_heads
        attn += packed_repeated_kv_bytes_per_token(model, train)
    experts = max(1, model.num_experts_per_tok) if model.is_moe else 1
    r = residual_bytes(train)  # the RMSNorms save an fp32 copy of their input either way; the MLP runs in r
    mlp = experts * 3 * r * i
    if model.is_moe:
        mlp += experts * r * h  # each expert's gathered copy of its tokens' hidden states
    lora_saved = sum(_lora_input_bytes(lin, lora, c) for lin in model.linears_in(names))
    return residual + attn + mlp + lora_saved + int8_saved_inputs_bytes_per_token(model, train)


def packed_repeated_kv_bytes_per_token(model: ModelSpec, train: TrainSettings) -> int:
    """Packed micro-batches, grouped-query attention: with an explicit mask transformers does not let sdpa
    broadcast the key/value heads (integrations/sdpa_attention.py use_gqa_in_sdpa: only without a mask on
    CUDA), so repeat_kv copies k and v to every query head and sdpa saves those copies for backward instead
    of k and v: 2 x (q_dim - kv_dim) more compute-dtype values per token and layer."""
    if not train.packing:
        return 0
    return 2 * DTYPE_BYTES[train.compute_dtype] * (model.q_dim - model.kv_dim)


def packed_mask_bytes(model: ModelSpec, train: TrainSettings) -> int:
    """Packed micro-batches: transformers' block-diagonal causal mask, bool [micro-batch, 1, s, s], built once
    per forward (masking_utils.sdpa_mask) and held by every layer's attention until backward is done."""
    if not train.packing:
        return 0
    return alloc(BOOL_MASK * train.batch_size * train.seq_len * train.seq_len)


def packed_bias_bytes(model: ModelSpec, train: TrainSettings) -> int:
    """Packed micro-batches: for its memory-efficient kernel sdpa turns the bool mask into an additive bias in the
    compute dtype ([micro-batch, 1, s, s]) at every layer call, and saves it for that layer's backward."""
    if not train.packing:
        return 0
    return alloc(DTYPE_BYTES[train.compute_dtype] * train.batch_size * train.seq_len * train.seq_len)


def checkpointed_layer_saved_bytes_per_token(model: ModelSpec, train: TrainSettings | None = None) -> int:
    """Under layer-granular checkpointing autograd keeps only each layer's input (fp32 after the upcast), and
    what it cannot drop: see int8_checkpoint_kept_bytes_per_token."""
    kept = int8_checkpoint_kept_bytes_per_token(model, train) if train is not None else 0
    return (residual_bytes(train) if train is not None else FP32) * model.hidden_size + kept


def int8_checkpoint_kept_bytes_per_token(model: ModelSpec, train: TrainSettings) -> int:
    """lora-8bit under checkpointing: bitsandbytes MatMul8bitLt.forward keeps its input on the autograd context as a
    plain attribute (`ctx.tensors = (CAt, subA, A)`, autograd/_functions.py), not through ctx.save_for_backward, so
    torch.utils.checkpoint's non-reentrant saved-tensor hooks (transformers 5's default, use_reentrant=False) never
    see it: every checkpointed layer keeps its int8 linears' inputs until backward, as an uncheckpointed one does
    (int8_saved_inputs_bytes_per_token)."""
    return int8_saved_inputs_bytes_per_token(model, train) if train.method == "lora-8bit" else 0


def moe_expert_weight_copies_bytes(model: ModelSpec, train: TrainSettings) -> int:
    """transformers 5 runs MoE experts as F.linear on 3-D parameters (not nn.Linear), so autocast casts
    each visited expert's weight to the compute dtype and the matmul saves that copy for backward."""
    if not model.is_moe or not train.upcast_fp32:  # without the upcast the experts are already in the compute dtype
        return 0
    per_layer = model.layer_other_params - 2 * model.hidden_size - model.num_local_experts * model.hidden_size
    return model.num_hidden_layers * DTYPE_BYTES[train.compute_dtype] * per_layer


def head_saved_bytes(model: ModelSpec, train: TrainSettings) -> int:
    """Saved outside the layers: token ids (int64), the final norm's fp32 input and its compute-dtype cast for lm_head."""
    t = train.tokens_per_micro_batch
    return t * (INT64 + FP32 * model.hidden_size + DTYPE_BYTES[train.compute_dtype] * model.hidden_size)


def lm_head_weight_copy_bytes(model: ModelSpec, train: TrainSettings) -> int:
    """Autocast casts the fp32 lm_head (or tied embedding) to the compute dtype; the matmul saves the copy.
    Without the upcast the lm_head is already in the compute dtype: no copy."""
    if not train.upcast_fp32:
        return 0
    return alloc(DTYPE_BYTES[train.compute_dtype] * model.vocab_size * model.hidden_size)


def logits_bytes(model: ModelSpec, train: TrainSettings, coeffs: Coefficients, phase: str) -> int:
    """The logits chain over the vocabulary, per token.

    forward, at the loss: logits in the compute dtype (2V), their fp32 upcast in ForCausalLMLoss
    (4V) and log_softmax's fp32 output (4V). backward, at the loss: the saved log_softmax output,
    nll_loss's fp32 gradient and log_softmax's input gradient (3 x 4V). Gemma-2's final softcapping
    (logits / cap, tanh, x cap) leaves one more compute-dtype tensor alive at either peak: exact mode
    traced 2 bytes per element in bf16, and the held-out Gemma-2-2B runs (calibration/REPORT.md) were
    over-predicted by one such tensor while this term counted two. The per-element byte counts are
    coefficients (logits_fwd_bytes, logits_bwd_bytes) so that calibration can correct them.
    """
    per = coeffs.get("logits_fwd_bytes" if phase == "forward" else "logits_bwd_bytes")
    if model.final_logit_softcapping:
        per += DTYPE_BYTES[train.compute_dtype]
    return int(per * model.vocab_size * train.tokens_per_micro_batch)


def sliding_window_mask_bytes(model: ModelSpec, train: TrainSettings) -> int:
    """Mistral-style sliding windows: once seq_len reaches the window, transformers builds a dense
    mask and sdpa leaves the flash kernel for one that takes an additive bias; without
    checkpointing its backward held one fp32 bias over the heads (4 x heads x s^2) extra.
    Seen on one measured configuration (Mistral-7B, seq 4096, no checkpointing, H200); the
    checkpointed runs at seq 4096 showed no such term, so only an uncheckpointed layer's backward adds it."""
    if not sliding_window_masked(model, train):
        return 0
    return FP32 * model.num_attention_heads * train.seq_len * train.seq_len


def sliding_window_masked(model: ModelSpec, train: TrainSettings) -> bool:
    """Whether the model's sliding window makes transformers pass sdpa an explicit mask: masking_utils.
    _ignore_causal_mask_sdpa keeps `is_causal` (the flash kernel) only while kv_length < the window (5.17-5.25)."""
    return bool(model.sliding_window) and train.seq_len >= model.sliding_window


def dequant_buffer_bytes(model: ModelSpec, train: TrainSettings) -> int:
    """bitsandbytes dequantizes one weight at a time to the compute dtype for its matmul."""
    largest = max(lin.weight_count for lin in model.layer_linears)
    return alloc(DTYPE_BYTES[train.compute_dtype] * largest)


# --------------------------------------------------------------------------- the base, by method

INT8 = 1  # bitsandbytes Int8Params: CB is int8, one byte per weight
FP16 = DTYPE_BYTES["fp16"]


@lru_cache(maxsize=64)
def sixteen_bit_weights_bytes(model: ModelSpec, compute_dtype: str) -> int:
    """lora: the base linears as the checkpoint loads them with from_pretrained(dtype=compute dtype) and no
    quantization_config: one compute-dtype tensor per nn.Linear weight (2 B/param), no packing, no constants.
    Not k-bit prepared, so nothing is upcast (the rest: unquantized_weights_bytes in the compute dtype)."""
    c = DTYPE_BYTES[compute_dtype]
    return model.num_hidden_layers * sum(lin.count * alloc(c * lin.weight_count) for lin in model.layer_linears)


@lru_cache(maxsize=64)
def int8_weights_bytes(model: ModelSpec) -> int:
    """lora-8bit: bitsandbytes Int8Params._quantize (nn/modules.py) stores CB = int8_vectorwise_quant(W.half()),
    row-major int8, one byte per weight (weight.data and state.CB are the same tensor). Same modules as 4-bit:
    the decoder layers' nn.Linear (transformers integrations/bitsandbytes.py replace_with_bnb_linear)."""
    return model.num_hidden_layers * sum(lin.count * alloc(INT8 * lin.weight_count) for lin in model.layer_linears)


@lru_cache(maxsize=64)
def int8_row_scales_bytes(model: ModelSpec) -> int:
    """lora-8bit: Int8Params.SCB, the absmax of each weight row (output feature) in fp32 (int8_vectorwise_quant
    returns "the quantization scales" as float32), one tensor per linear."""
    return model.num_hidden_layers * sum(lin.count * alloc(FP32 * lin.out_features) for lin in model.layer_linears)


def base_weights_bytes(model: ModelSpec, train: TrainSettings) -> int:
    """The frozen base linears as the method stores them: NF4 (qlora), int8 (lora-8bit), compute dtype (lora)."""
    if train.method == "lora":
        return sixteen_bit_weights_bytes(model, train.compute_dtype)
    if train.method == "lora-8bit":
        return int8_weights_bytes(model)
    return quantized_weights_bytes(model)


def base_constants_bytes(model: ModelSpec, train: TrainSettings) -> int:
    """What the base needs beside its weights to dequantize them: the 4-bit absmax (qlora), the int8 row scales
    (lora-8bit), nothing for a 16-bit base."""
    if train.method == "lora":
        return 0
    if train.method == "lora-8bit":
        return int8_row_scales_bytes(model)
    return quant_constants_bytes(model, train.double_quant)


# The linears that read a group's inner activation (the attention output, the MLP's act(gate) x up), by their module
# names in transformers' modeling files (llama/mistral/qwen2/gemma2/phi3/mixtral: o_proj, down_proj; others:
# out_proj, dense, fc2, w2); every other linear of a decoder layer reads the layer's normed hidden state.
OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj", "dense", "fc2", "w2")


def _output_projections(model: ModelSpec) -> set[str]:
    """Per group (attn, mlp), the linears in OUTPUT_PROJECTIONS; a group with none of them (a router alone) has
    none: all its linears read the normed hidden state."""
    return {lin.name for lin in model.layer_linears if lin.name in OUTPUT_PROJECTIONS}


def int8_saved_inputs_bytes_per_token(model: ModelSpec, train: TrainSettings) -> int:
    """lora-8bit: bitsandbytes MatMul8bitLt.forward (autograd/_functions.py) keeps its input A for backward
    (`ctx.tensors = (CAt, subA, A)` whenever the input needs a gradient), where MatMul4Bit keeps none and a
    frozen 16-bit nn.Linear keeps only its weight. Linears reading one tensor share it, so per token and layer:
    the normed hidden state once per group (residual dtype: fp32 after the k-bit upcast), the attention output
    as o_proj sees it (transpose + reshape makes a compute-dtype copy), the MLP's act(gate) x up product
    (residual dtype). subA, the outlier columns, is saved beside A: int8_outlier_bytes_per_token."""
    if train.method != "lora-8bit":
        return 0
    r, c = residual_bytes(train), DTYPE_BYTES[train.compute_dtype]
    outs = _output_projections(model)
    total = 0
    for group in dict.fromkeys(lin.group for lin in model.layer_linears):
        lins = [lin for lin in model.layer_linears if lin.group == group]
        if any(lin.name not in outs for lin in lins):
            total += r * model.hidden_size
        for lin in lins:
            if lin.name in outs:
                total += (c if group == "attn" else r) * lin.in_features * lin.count
    return total + int8_outlier_bytes_per_token(model, train)


# LLM.int8 (Dettmers et al. 2022, section 4): in trained models the outliers (|x| >= 6) sit in a handful of hidden
# dimensions (about 6 at 6.7B parameters and up), a fraction of a percent of a linear's input columns. Models with
# random weights are not like this: their MLP down-projection input, act(gate) x up, is a product of two
# near-Gaussian values with a heavy tail, and every one of its columns holds an outlier somewhere in a micro-batch
# (measured on an H100: calibration/methods/h100-methods-a8-expandable.csv, int8_outlier_share up to 0.37, which is
# the down-projection's share of the input width for Mistral-7B).
DEFAULT_INT8_OUTLIER_SHARE = 0.002


def int8_outlier_bytes_per_token(model: ModelSpec, train: TrainSettings) -> int:
    """lora-8bit: bitsandbytes' int8_mixed_scaled_mm (backends/default/ops.py) gathers the input columns that hold an
    outlier, `subA = A[:, outlier_cols].contiguous()` in the input's dtype, and MatMul8bitLt keeps it on the autograd
    context beside A (`ctx.tensors = (CAt, subA, A)`) until backward, for every int8 linear, checkpointed or not.
    Per token and layer: the outlier share of the linears' input width, in the residual dtype. The share is a
    property of the weights and the data: train.int8_outlier_share where measured (calibration rows; the harness
    records it with planner.train.measure.Int8OutlierWatch), else DEFAULT_INT8_OUTLIER_SHARE."""
    if train.method != "lora-8bit":
        return 0
    share = DEFAULT_INT8_OUTLIER_SHARE if train.int8_outlier_share is None else train.int8_outlier_share
    width = sum(lin.in_features * lin.count for lin in model.layer_linears)
    return round(share * width * residual_bytes(train))


def int8_matmul_workspace_bytes(model: ModelSpec, train: TrainSettings) -> int:
    """lora-8bit, the transients of one LLM.int8 matmul (bitsandbytes 0.50 MatMul8bitLt), the larger of:
      - forward: A.to(float16) (2 B per input element), its int8 quantization CA (1 B) and the fp32 row
        scales SCA, for one micro-batch (int8_vectorwise_quant / int8_double_quant);
      - backward, input gradient: `CB.to(dtype_A, copy=True).mul_(SCB ...)`, the whole weight dequantized in
        the input's dtype (fp32 after the k-bit upcast), plus grad_output cast to that dtype.
    The largest linear sets both. This replaces qlora's dequant_buffer_bytes."""
    if train.method != "lora-8bit":
        return 0
    t, a = train.tokens_per_micro_batch, residual_bytes(train)
    fwd = max(alloc(FP16 * t * lin.in_features) + alloc(INT8 * t * lin.in_features) + alloc(FP32 * t)
              for lin in model.layer_linears)
    bwd = max(alloc(a * lin.weight_count) + alloc(a * t * lin.out_features) for lin in model.layer_linears)
    return max(fwd, bwd)


def base_matmul_workspace_bytes(model: ModelSpec, train: TrainSettings) -> int:
    """The base matmul's own transient while a layer runs: one dequantized 4-bit weight (qlora), the int8
    path's casts and dequantized weight (lora-8bit), nothing for a 16-bit base (lora: F.linear on the weight)."""
    if train.method == "lora":
        return 0
    if train.method == "lora-8bit":
        return int8_matmul_workspace_bytes(model, train)
    return dequant_buffer_bytes(model, train)


def _layer_bytes(model: ModelSpec, lora: LoraSettings, names: tuple[str, ...], train: TrainSettings,
                 attn_impl: str, coeffs: Coefficients) -> tuple[float, float]:
    """(one layer's saved set when not checkpointed, its checkpointed input) for one micro-batch."""
    t = train.tokens_per_micro_batch
    full = ((layer_saved_bytes_per_token(model, lora, names, train, attn_impl) * t + packed_bias_bytes(model, train))
            * coeffs.get("act_scale"))
    ckpt = checkpointed_layer_saved_bytes_per_token(model, train) * t * coeffs.get("ckpt_saved_scale")
    return full, ckpt


def saved_activations_bytes(model: ModelSpec, lora: LoraSettings, names: tuple[str, ...],
                            train: TrainSettings, attn_impl: str, coeffs: Coefficients,
                            *, checkpointed_only: bool = False) -> int:
    """All layers' saved tensors for one micro-batch (the structural estimate times act_scale):
    checkpointed layers keep their input, the others (the last uncheckpointed_layers) everything.
    checkpointed_only: what is left once backward has passed the uncheckpointed layers."""
    full, ckpt = _layer_bytes(model, lora, names, train, attn_impl, coeffs)
    k = train.checkpointed_layers(model.num_hidden_layers)
    n_full = 0 if checkpointed_only else model.num_hidden_layers - k
    return (int(k * ckpt + n_full * full) + head_saved_bytes(model, train) + moe_expert_weight_copies_bytes(model, train)
            + packed_mask_bytes(model, train))


def layer_working_set_bytes(model: ModelSpec, lora: LoraSettings, names: tuple[str, ...],
                            train: TrainSettings, attn_impl: str, coeffs: Coefficients,
                            *, recompute: bool | None = None) -> int:
    """While one layer is back-propagated: its gradients and temporaries (bwd_temp_factor x the
    layer's saved set), the layer's recomputed activations when it is checkpointed, and one
    dequantized weight. recompute=None: the last layer's case (checkpointed unless some layers are not)."""
    full, _ = _layer_bytes(model, lora, names, train, attn_impl, coeffs)
    if recompute is None:
        recompute = train.checkpointed_layers(model.num_hidden_layers) == model.num_hidden_layers
    mask = 0 if recompute else sliding_window_mask_bytes(model, train)  # an uncheckpointed layer's backward
    return (int((full if recompute else 0) + coeffs.get("bwd_temp_factor") * full)
            + base_matmul_workspace_bytes(model, train) + mask)


def optimizer_step_temp_bytes(numels: tuple[int, ...], optim: str, coeffs: Coefficients) -> int:
    """torch AdamW (foreach) builds per-parameter temporaries during step(); bitsandbytes updates in place."""
    if optim != "adamw_torch":
        return 0
    return int(coeffs.get("adamw_step_temp_factor") * sum(alloc(FP32 * n) for n in numels))


def cuda_context_bytes(coeffs: Coefficients) -> int:
    """CUDA context, kernels' modules and library handles: outside torch's allocator (calibrated)."""
    return int(coeffs.get("cuda_context_bytes"))


def reserve_features(model: ModelSpec, lora: LoraSettings, train: TrainSettings, terms: dict[str, int]) -> dict[str, int]:
    """What the allocator's slack at the peak scales with, in bytes (each gets a fitted fraction per
    allocator mode; the set was chosen by cross-validation on the measured runs, calibration/REPORT.md):
      - logits_block: the fp32 logits tensor, the largest single block of a step;
      - logits_block_ckpt: the same times the share of checkpointed layers (under checkpointing its freed
        block is not reused by the recomputation that follows; the fewer layers recompute, the less so);
      - recompute_layer: one layer's own activations under checkpointing (the recompute allocates them
        again at every layer and their cached blocks stay reserved whichever phase holds the peak; the
        layer's LoRA input copies are left out, which cross-validated better);
      - hidden_block_ckpt: one fp32 hidden-state tensor under checkpointing (the checkpoint boundary);
      - the layer working set and the saved activations of the peak phase."""
    t = train.tokens_per_micro_batch
    logits_block = FP32 * model.vocab_size * t
    k = train.checkpointed_layers(model.num_hidden_layers)
    recompute = hidden = 0
    if k:
        recompute = layer_saved_bytes_per_token(model, lora, (), train, model.attn_implementation) * t
        hidden = FP32 * model.hidden_size * t
    return {
        "logits_block": logits_block,
        "logits_block_ckpt": logits_block * k // model.num_hidden_layers,
        "recompute_layer": recompute,
        "hidden_block_ckpt": hidden,
        "layer_working_set": terms["layer_working_set"],
        "saved_activations": terms["saved_activations"],
    }


def allocator_reserve_bytes(model: ModelSpec, lora: LoraSettings, train: TrainSettings, terms: dict[str, int],
                            coeffs: Coefficients) -> int:
    """Reserved minus allocated at the peak: the caching allocator keeps freed blocks that the next
    request cannot reuse. Per allocator mode, calibrated fractions of reserve_features()."""
    mode = "expandable" if train.expandable_segments else "default"
    feats = reserve_features(model, lora, train, terms)
    return int(sum(coeffs.get(f"reserve_{name}_{mode}") * v for name, v in feats.items()))


def required_budget_bytes(peak_allocated: int, reserve: int, train: TrainSettings, coeffs: Coefficients) -> int:
    """The smallest allocator budget (set_per_process_memory_fraction) the step runs in: under a
    cap the allocator frees cached blocks and retries before raising OOM, so this sits between
    peak allocated and peak reserved: peak allocated + a calibrated share of the predicted allocator
    reserve (required_frac_*, the largest share the cap bisections needed) + a constant
    (required_const_*, 256 MiB: chosen by leave-one-model-out on the bisections, calibration/REPORT.md)."""
    mode = "expandable" if train.expandable_segments else "default"
    return int(peak_allocated + coeffs.get(f"required_frac_{mode}") * reserve + coeffs.get(f"required_const_{mode}"))


# --------------------------------------------------------------------------- the estimate

def phases(model: ModelSpec, lora: LoraSettings, train: TrainSettings, coeffs: Coefficients) -> dict[str, dict[str, int]]:
    """Allocated bytes per named term, for each phase of a training step whose max can be the peak."""
    names = resolve_targets(model, lora.targets)
    numels = lora_tensor_numels(model, lora, names)
    attn_impl = model.attn_implementation

    weights = {
        "quantized_weights": base_weights_bytes(model, train),
        "quant_constants": base_constants_bytes(model, train),
        "unquantized_weights": unquantized_weights_bytes(model, train),
        "lora_params": lora_params_bytes(numels),
    }
    grads = lora_grads_bytes(numels)
    opt_torch, opt_paged = optimizer_state_bytes(numels, train.optim)
    saved = saved_activations_bytes(model, lora, names, train, attn_impl, coeffs)
    lm_copy = lm_head_weight_copy_bytes(model, train)
    # Gradients already exist at the start of a backward only when accumulating (zero_grad sets None).
    grads_at_loss = grads if train.grad_accum > 1 else 0

    def phase(lora_grads=0, saved_activations=0, layer_working_set=0, logits=0):
        return {**weights, "lora_grads": lora_grads, "optimizer_state": opt_torch,
                "saved_activations": saved_activations, "layer_working_set": layer_working_set, "logits": logits}

    out = {
        "forward, at the loss": phase(
            grads_at_loss, saved, 0, lm_copy + logits_bytes(model, train, coeffs, "forward")),
        "backward, at the loss": phase(
            grads_at_loss, saved, 0, lm_copy + logits_bytes(model, train, coeffs, "backward")),
        "backward, last layer": phase(
            grads, saved, layer_working_set_bytes(model, lora, names, train, attn_impl, coeffs), 0),
        "optimizer step": phase(grads, 0, optimizer_step_temp_bytes(numels, train.optim, coeffs), 0),
    }
    k = train.checkpointed_layers(model.num_hidden_layers)
    if 0 < k < model.num_hidden_layers:
        # partial checkpointing: backward reaches the checkpointed layers once the uncheckpointed ones
        # (the last layers) have freed their saved sets; the first of them is recomputed there
        out["backward, last checkpointed layer"] = phase(
            grads, saved_activations_bytes(model, lora, names, train, attn_impl, coeffs, checkpointed_only=True),
            layer_working_set_bytes(model, lora, names, train, attn_impl, coeffs, recompute=True), 0)
    return out


def paged_state_bytes(model: ModelSpec, lora: LoraSettings, train: TrainSettings) -> int:
    numels = lora_tensor_numels(model, lora, resolve_targets(model, lora.targets))
    return optimizer_state_bytes(numels, train.optim)[1]


def estimate(model: ModelSpec, lora: LoraSettings, train: TrainSettings, coeffs: Coefficients) -> MemoryBreakdown:
    """Peak memory of one QLoRA training step.

    For each phase (see phases()): allocated = the sum of its named terms, reserved = allocated +
    allocator_reserve_bytes, required = required_budget_bytes. The peak is the phase with the largest
    reserved memory (what the card must hold); its terms are the rows of the breakdown, and the
    smallest budget is the max over phases, so no phase is left out of "fits".
    """
    by_phase = phases(model, lora, train, coeffs)

    def reserved(terms):
        return sum(terms.values()) + allocator_reserve_bytes(model, lora, train, terms, coeffs)

    def required(terms):
        # under a cap the allocator returns cached blocks and retries: with no activations alive (the
        # optimizer step) the slack of the activation phases is not needed
        reserve = allocator_reserve_bytes(model, lora, train, terms, coeffs) if terms["saved_activations"] else 0
        return required_budget_bytes(sum(terms.values()), reserve, train, coeffs)

    peak_phase, terms = max(by_phase.items(), key=lambda kv: reserved(kv[1]))
    return MemoryBreakdown(
        **terms,
        allocator_reserve=allocator_reserve_bytes(model, lora, train, terms, coeffs),
        cuda_context=cuda_context_bytes(coeffs),
        paged_optimizer_state=paged_state_bytes(model, lora, train),
        peak_phase=peak_phase,
        required_bytes=max(required(t) for t in by_phase.values()),
    )


def trainable_params(model: ModelSpec, lora: LoraSettings) -> int:
    return sum(lora_tensor_numels(model, lora, resolve_targets(model, lora.targets)))

