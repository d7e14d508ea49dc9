"""Per-GPU memory of QLoRA on N GPUs of one host: DDP and FSDP full-shard. PURE: standard library only.

Calibration: the single-GPU coefficients are reused per rank. Coefficients fitted with a multi-GPU sweep
(calibration/multigpu, 2 x H200; they carry fsdp_margin_frac) add the measured NCCL/process-group term and
FSDP's measured margin: then the notes say calibrated (multigpu_calibrated). Without that sweep the NCCL
term is an unmeasured assumption and every number here is an estimate (the notes say so).

- ddp_per_gpu: every rank holds the whole single-GPU breakdown (planner.memory.estimate) plus DDP's
  gradient buckets plus NCCL's buffers.
- fsdp_per_gpu: the FSDP-QLoRA recipe (4-bit base sharded 1/N, bnb_4bit_quant_storage = compute
  dtype, no fp32 upcast), with a load phase and a training phase; see its docstring. Two loadings:
  "sharded" (planner.train.sharded_load: built on meta, sharded, the checkpoint streamed tensor by tensor;
  the default, an estimate not yet measured on GPUs) and "full" (transformers loads the whole 4-bit model on
  every rank, then FSDP shards it; measured on 2 x H200).
- cpu_ram_per_node: the host memory one node needs (offloaded shards, pinned; the loaders' read buffers).
- plan_multi / best_multi: planner.search's candidates and ranking order, per rank.
- choose_multi: `qfit plan --num-gpus N`'s choice of DDP or FSDP (and CPU offload), as a MultiChoice.
- fewest_gpus: the one "how many of these GPUs" search (`qfit plan` advice and `qfit compare`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.errors import QfitError
from planner.memory import (
    DQ_BLOCKSIZE,
    FP32,
    NF4_BLOCKSIZE,
    alloc,
    allocator_reserve_bytes,
    cuda_context_bytes,
    estimate,
    lora_grads_bytes,
    lora_params_bytes,
    lora_tensor_numels,
    optimizer_state_bytes,
    phases,
    quant_constants_bytes,
    quantized_weights_bytes,
    required_budget_bytes,
    resolve_targets,
)
from planner.search import (
    AUTO_SEQ_LENS,
    DEFAULT_EFFECTIVE_BATCH,
    LORA_FALLBACKS,
    OPTIM_ORDER,
    Request,
    candidates,
    capacity_bytes,
)
from planner.specs import Coefficients, GpuSpec, LoraSettings, MemoryBreakdown, ModelSpec, TrainSettings
from planner.speed import tokens_per_second
from planner.units import DTYPE_BYTES, MiB

STRATEGIES = ("ddp", "fsdp")
LOADINGS = ("sharded", "full", "rank0_cpu")
DEFAULT_LOADING = "sharded"  # what `qfit plan --num-gpus` and `qfit run --num-gpus --strategy fsdp` use unless --loading
CHECKPOINT_DTYPE = "bf16"  # the planner's assumption for the checkpoint's full-precision tensors (Llama, Mistral, Qwen ship bf16)
# torch/nn/parallel/distributed.py: DistributedDataParallel(bucket_cap_mb=25); the first bucket is
# capped at 1 MiB (dist._DEFAULT_FIRST_BUCKET_BYTES).
DDP_BUCKET_CAP_BYTES = 25 * MiB
DDP_FIRST_BUCKET_BYTES = 1 * MiB
NCCL_BUFFER_KEY = "nccl_buffer_bytes"
# Assumption, unmeasured: NCCL's channel buffers (NCCL_BUFFSIZE 4 MiB x channels x peers) plus its
# own CUDA allocations, outside torch's allocator. Used when the coefficients lack the key.
DEFAULT_NCCL_BUFFER_BYTES = 512 * MiB
FSDP_GATHERED_LAYERS = 2  # the layer being computed + the next one prefetched (FSDP2 default)
FSDP_OPTIM = "adamw_torch"
FSDP_OPTIM_REASON = ("bitsandbytes' 32-bit, 8-bit and paged optimizers do not work with FSDP2's sharded "
                     "DTensor parameters; the FSDP-QLoRA recipe uses torch AdamW (adamw_torch)")
ESTIMATE_NOTE = "estimate: multi-GPU memory is not calibrated (single-GPU coefficients reused per rank)"
CALIBRATED_NOTE = ("multi-GPU memory calibrated on 2 x H200 (calibration/multigpu): NCCL buffers measured, "
                   "FSDP with its measured margin; see calibration/REPORT.md for the per-rank errors")
SHARDED_NOTE = ("load phase (--loading sharded, planner.train.sharded_load): built on the meta device, sharded, then the "
                "checkpoint streamed one tensor at a time, each rank quantizing it and keeping its 1/N chunk; estimate, "
                "not yet measured on GPUs (checked on the CPU: same logits as from_pretrained)")
FULL_NOTE = ("load phase (--loading full): every rank loads the whole 4-bit model, and FSDP's wrap holds it beside the "
             "new shards (measured: whole + 1/N at the wrap)")
RANK0_CPU_MEASURED = ("--loading rank0_cpu is not what happens to a 4-bit model: measured on 2 x H200 (transformers 5.17, "
                      "accelerate 1.15), fsdp_cpu_ram_efficient_loading left each rank's load peak unchanged (Mistral-7B: "
                      "3.94 GiB on both ranks either way), because transformers loads a bitsandbytes-quantized checkpoint "
                      "whole on every rank; qfit plans that (--loading full)")


def multigpu_calibrated(coeffs: Coefficients) -> bool:
    """True when the coefficients come from a multi-GPU sweep (they carry fsdp_margin_frac)."""
    return "fsdp_margin_frac" in coeffs.values


def calibration_note(coeffs: Coefficients) -> str:
    return CALIBRATED_NOTE if multigpu_calibrated(coeffs) else ESTIMATE_NOTE


def nccl_buffer_bytes(coeffs: Coefficients) -> int:
    """NCCL buffers outside torch's allocator: coefficient `nccl_buffer_bytes`, else the stated
    default (512 MiB, an unmeasured assumption; calibration/defaults.json says so)."""
    if NCCL_BUFFER_KEY in coeffs.values:
        return int(coeffs.get(NCCL_BUFFER_KEY))
    return DEFAULT_NCCL_BUFFER_BYTES


def fsdp_margin_frac(coeffs: Coefficients) -> float:
    """The FSDP model's worst measured per-rank under-prediction of peak allocated (calibration/multigpu),
    kept as a margin; 0 without a multi-GPU calibration."""
    return float(coeffs.values.get("fsdp_margin_frac", 0.0))


def _check_n(n: int) -> None:
    if n < 1:
        raise QfitError(f"--gpus-count must be a positive integer, got {n}")


def _numels(model: ModelSpec, lora: LoraSettings) -> tuple[int, ...]:
    return lora_tensor_numels(model, lora, resolve_targets(model, lora.targets))


# --------------------------------------------------------------------------- DDP

@dataclass(frozen=True, slots=True)
class DdpMemory:
    """Per-GPU memory under DDP. Every byte field is int."""

    n: int
    single: MemoryBreakdown  # the whole single-GPU breakdown: every rank holds it
    grad_buckets: int  # DDP's flat gradient buckets: one more fp32 copy of the LoRA gradients
    nccl_buffer: int  # outside torch's allocator
    peak_phase: str
    needs_bytes: int
    notes: tuple[str, ...] = ()


def ddp_bucket_bytes(numels: tuple[int, ...]) -> int:
    """DDP copies the gradients into flat buckets of at most bucket_cap_mb (25 MiB; the first one
    1 MiB), gradient_as_bucket_view=False by default: about one more copy of all fp32 LoRA gradients.
    Buckets = first 1 MiB + ceil(rest / 25 MiB), each allocated separately (rounded to 512 B)."""
    total = sum(FP32 * n for n in numels)
    if total <= 0:
        return 0
    first = min(total, DDP_FIRST_BUCKET_BYTES)
    rest = total - first
    full, tail = divmod(rest, DDP_BUCKET_CAP_BYTES)
    return alloc(first) + full * alloc(DDP_BUCKET_CAP_BYTES) + alloc(tail)


def ddp_per_gpu(model: ModelSpec, lora: LoraSettings, train: TrainSettings, coeffs: Coefficients,
                n: int) -> DdpMemory:
    """needs = single-GPU needs (estimate()) + gradient buckets + NCCL buffers; independent of n
    (every rank holds the whole 4-bit model and the same micro-batch)."""
    _check_n(n)
    single = estimate(model, lora, train, coeffs)
    buckets = ddp_bucket_bytes(_numels(model, lora))
    nccl = nccl_buffer_bytes(coeffs)
    return DdpMemory(n=n, single=single, grad_buckets=buckets, nccl_buffer=nccl, peak_phase="training",
                     needs_bytes=single.needs_bytes + buckets + nccl,
                     notes=(calibration_note(coeffs), "buckets counted at the peak, conservatively (they exist "
                            "from the first backward until the optimizer step)"))


# --------------------------------------------------------------------------- FSDP

@dataclass(frozen=True, slots=True)
class FsdpMemory:
    """Per-GPU memory under FSDP full-shard, at its peak phase. Every byte field is int.

    The allocated fields are the training phase's terms at its worst step phase; load_needs is the
    load phase's need, training_needs the training phase's; needs_bytes = max of the two.
    """

    n: int
    quantized_weights: int  # shard: ceil(4-bit base / n)
    quant_constants: int  # shard: ceil(constants / n)
    unquantized_weights: int  # shard: ceil(compute dtype x unquantized params / n)
    gathered_layers: int  # 2 decoder layers all-gathered (current + prefetch), with their LoRA
    gathered_root: int  # embeddings, lm_head, final norm: the root unit stays gathered in compute dtype
    lora_params: int  # shard
    lora_grads: int  # shard
    optimizer_state: int  # shard (adamw_torch)
    saved_activations: int  # per rank, as on one GPU
    layer_working_set: int  # per rank, as on one GPU
    logits: int  # per rank, as on one GPU, without the fp32 -> compute-dtype lm_head copy
    allocator_reserve: int
    cuda_context: int
    nccl_buffer: int
    calibration_margin: int  # fsdp_margin_frac x the training phase's allocated bytes (see fsdp_per_gpu, 9.)
    load_allocated: int  # the load/wrap phase's allocated bytes: whole 4-bit model + LoRA + their 1/N shards
    load_needs_bytes: int
    training_needs_bytes: int
    peak_phase: str  # "load" or "training"
    needs_bytes: int
    cpu_offload: bool = False
    loading: str = "full"
    load_terms: tuple[tuple[str, int], ...] = ()  # the load phase's named allocated terms (they sum to load_allocated)
    cpu_ram: CpuRam | None = None  # host memory of the node (all n ranks)
    notes: tuple[str, ...] = ()

    ALLOCATED_FIELDS = (
        "quantized_weights", "quant_constants", "unquantized_weights", "gathered_layers", "gathered_root",
        "lora_params", "lora_grads", "optimizer_state", "saved_activations", "layer_working_set", "logits",
    )

    @property
    def peak_allocated_bytes(self) -> int:
        return sum(getattr(self, name) for name in self.ALLOCATED_FIELDS)

    def components(self) -> dict[str, int]:
        names = self.ALLOCATED_FIELDS + ("allocator_reserve", "calibration_margin", "cuda_context", "nccl_buffer")
        return {name: getattr(self, name) for name in names}


def _shard(total: int, n: int) -> int:
    return -(-total // n)


@dataclass(frozen=True, slots=True)
class CpuRam:
    """Host memory one node needs for an FSDP run of n ranks on it, beyond each process's own baseline. Bytes (int).

    Not counted: the page cache of the memory-mapped checkpoint (safetensors safe_open; the kernel reclaims it) and
    each Python process's baseline (interpreter, torch, CUDA host allocations: not modelled)."""

    offloaded_params: int  # CPUOffloadPolicy: every rank's parameter shards, pinned (4-bit base, unquantized, LoRA)
    offloaded_grads: int  # the LoRA gradient shards (fp32), pinned
    offloaded_optimizer: int  # AdamW's two fp32 moments of the LoRA shards (the optimizer steps on the CPU)
    read_buffers: int  # every rank reads one checkpoint tensor whole into CPU memory at a time: n x the largest

    FIELDS = ("offloaded_params", "offloaded_grads", "offloaded_optimizer", "read_buffers")

    @property
    def total_bytes(self) -> int:
        return sum(getattr(self, f) for f in self.FIELDS)

    def components(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in self.FIELDS}


def largest_checkpoint_tensor_bytes(model: ModelSpec) -> int:
    """The largest tensor of a full-precision checkpoint, CHECKPOINT_DTYPE (bf16) assumed: the embedding, the lm_head
    or the largest decoder linear (Llama-3.1-70B: the 128,256 x 8,192 embedding, 2.0 GiB)."""
    largest = max([model.embed_params, model.lm_head_params] + [lin.weight_count for lin in model.layer_linears])
    return DTYPE_BYTES[CHECKPOINT_DTYPE] * largest


def nf4_pack_bytes(weight_count: int, double_quant: bool) -> tuple[int, int]:
    """(packed NF4 weight, its quant_state) of one tensor as bitsandbytes.functional.quantize_4bit allocates them:
    two values a byte; one fp32 absmax a 64-block, which double quant turns into uint8 + one fp32 absmax a 256-block."""
    blocks = -(-weight_count // NF4_BLOCKSIZE)
    packed = alloc(-(-weight_count // 2))
    if double_quant:
        return packed, alloc(blocks) + alloc(FP32 * -(-blocks // DQ_BLOCKSIZE)) + alloc(FP32 * blocks)
    return packed, alloc(FP32 * blocks)


def sharded_load_transient_bytes(model: ModelSpec, train: TrainSettings, n: int) -> int:
    """The largest one-tensor transient of the sharded loader on a GPU (planner.train.sharded_load): the decoder linear
    read whole in the compute dtype, its NF4 pack and quant_state (with double quant the fp32 absmax exists until it
    is quantized, so all three count), and the rank's 1/n chunk copied out of the pack before the rest is freed.
    Unquantized tensors (embeddings, lm_head, norms) are chunked on the CPU: only their shard reaches the GPU."""
    best = 0
    for lin in model.layer_linears:
        k = lin.weight_count
        packed, state = nf4_pack_bytes(k, train.double_quant)
        best = max(best, alloc(DTYPE_BYTES[train.compute_dtype] * k) + packed + state + alloc(_shard(-(-k // 2), n)))
    return best


def cpu_ram_per_node(model: ModelSpec, lora: LoraSettings, train: TrainSettings, n: int, cpu_offload: bool) -> CpuRam:
    """CPU RAM of one node with n ranks: CPUOffloadPolicy's shards of all n ranks (together the whole 4-bit model, the
    unquantized weights in the compute dtype, the LoRA weights, gradients and AdamW moments in fp32), and each rank's
    read buffer (the loader reads one checkpoint tensor whole before keeping its chunk)."""
    numels = _numels(model, lora)
    lora_fp32 = sum(FP32 * k for k in numels)
    offload = 1 if cpu_offload else 0
    params = quantized_weights_bytes(model) + fsdp_unquantized_bytes(model, train) + lora_fp32
    return CpuRam(offloaded_params=offload * params, offloaded_grads=offload * lora_fp32,
                  offloaded_optimizer=offload * 2 * lora_fp32, read_buffers=n * largest_checkpoint_tensor_bytes(model))


def fsdp_unquantized_bytes(model: ModelSpec, train: TrainSettings) -> int:
    """Embeddings, lm_head, norms, biases in the compute dtype: the FSDP-QLoRA recipe skips
    prepare_model_for_kbit_training's fp32 upcast (2 B/param instead of 4)."""
    return DTYPE_BYTES[train.compute_dtype] * model.unquantized_param_count


def fsdp_root_bytes(model: ModelSpec, train: TrainSettings) -> int:
    """The root FSDP unit (embeddings, lm_head, final norm) in the compute dtype. FSDP2 does not
    reshard the root after forward (backward needs it at once), so it stays gathered."""
    return DTYPE_BYTES[train.compute_dtype] * (model.embed_params + model.lm_head_params + model.final_other_params)


def fsdp_layer_bytes(model: ModelSpec, lora: LoraSettings, train: TrainSettings) -> int:
    """One decoder layer unsharded: its 4-bit weights and constants, its non-Linear params and biases
    in the compute dtype, its LoRA weights and (in backward, before reduce-scatter) their grads, fp32."""
    numels = _numels(model, lora)
    L = model.num_hidden_layers
    base = _shard(quantized_weights_bytes(model) + quant_constants_bytes(model, train.double_quant), L)
    other = DTYPE_BYTES[train.compute_dtype] * (model.layer_other_params + model.layer_linear_bias_count)
    lora_layer = _shard(lora_params_bytes(numels) + lora_grads_bytes(numels), L)
    return base + other + lora_layer


def fsdp_per_gpu(model: ModelSpec, lora: LoraSettings, train: TrainSettings, coeffs: Coefficients, n: int,
                 cpu_offload: bool = False, loading: str = "full") -> FsdpMemory:
    """Per-GPU memory of FSDP full-shard QLoRA on n GPUs. Modelled facts:

    1. The FSDP-QLoRA loading recipe sets bnb_4bit_quant_storage to the compute dtype (so FSDP can
       flatten the 4-bit weights with the rest) and does NOT run prepare_model_for_kbit_training's
       fp32 upcast: embeddings, lm_head and norms stay in the compute dtype (2 B/param, not 4).
       The lm_head therefore needs no autocast copy: the single-GPU logits term loses that copy.
    2. The quantized weights, quant constants and unquantized weights are sharded 1/N (ceil).
    3. One decoder layer's parameters are all-gathered at a time, plus the prefetch of the next:
       2 layers (fsdp_layer_bytes). The root unit (embeddings, lm_head, final norm) stays gathered.
    4. LoRA weights, gradients and optimizer state are sharded 1/N (each tensor's shard, ceil).
    5. Activations (saved, the layer working set, logits) are per rank exactly as on one GPU:
       the same micro-batch runs on every rank (planner.memory.phases).
    6. Load and wrap (measured on 2 x H200): each rank first loads the whole 4-bit model and peft adds
       the whole LoRA; FSDP2's fully_shard then allocates the rank's 1/N shards while the whole tensors
       are still held, so the load peak = whole (4-bit weights + constants + compute-dtype unquantized
       weights + LoRA) + their 1/N shards. loading="rank0_cpu" (accelerate's
       fsdp_cpu_ram_efficient_loading) raises ValueError(RANK0_CPU_MEASURED): measured, it does not
       lower the load peak of a bitsandbytes 4-bit model (transformers loads it whole on every rank).
       loading="sharded" (planner.train.sharded_load; an estimate, not measured on GPUs): the model is built on the
       meta device and sharded first, then the checkpoint is streamed one tensor at a time, so the load peak is the
       rank's shards (none on the GPU with cpu_offload) + the whole quant_state (kept on every rank: the all-gathered
       weight is dequantized with it) + one tensor's transient (sharded_load_transient_bytes). In training, too, the
       quant_state is whole on every rank (quant_constants = the whole model's, not 1/N).
    7. bitsandbytes' 32-bit, 8-bit and paged optimizers do not work under FSDP2: only adamw_torch
       (ValueError otherwise, with the reason).
    8. NCCL buffers outside the allocator (nccl_buffer_bytes), counted in both phases (the
       process group may be created before loading).
    9. Measured on 2 x H200 (calibration/multigpu): the per-rank peak allocated exceeded this structural
       sum by up to fsdp_margin_frac (coefficient; 0 when not calibrated), so the training phase's
       smallest budget includes that fraction of its allocated bytes as a named margin.
    cpu_offload=True keeps the parameter, gradient and optimizer shards in CPU memory (FSDP
    CPUOffloadPolicy; the optimizer steps on the CPU): the GPU keeps the gathered layers and activations.
    The allocator slack and smallest budget reuse the single-GPU coefficients (memory.py).
    """
    _check_n(n)
    if train.optim != FSDP_OPTIM:
        raise QfitError(f"--optim {train.optim} cannot run under FSDP: {FSDP_OPTIM_REASON}")
    if loading not in LOADINGS:
        raise QfitError(f"loading must be one of {', '.join(LOADINGS)}, got {loading!r}")
    if loading == "rank0_cpu":
        raise QfitError(RANK0_CPU_MEASURED)
    numels = _numels(model, lora)
    q_full = quantized_weights_bytes(model)
    c_full = quant_constants_bytes(model, train.double_quant)
    u_full = fsdp_unquantized_bytes(model, train)
    on_gpu = 0 if cpu_offload else 1
    sharded = loading == "sharded"
    shards = {
        "quantized_weights": on_gpu * _shard(q_full, n),
        "quant_constants": c_full if sharded else on_gpu * _shard(c_full, n),
        "unquantized_weights": on_gpu * _shard(u_full, n),
        "gathered_layers": FSDP_GATHERED_LAYERS * fsdp_layer_bytes(model, lora, train),
        "gathered_root": fsdp_root_bytes(model, train),
        "lora_params": on_gpu * sum(alloc(_shard(FP32 * k, n)) for k in numels),
        "lora_grads": on_gpu * sum(alloc(_shard(FP32 * k, n)) for k in numels),
        "optimizer_state": on_gpu * sum(alloc(_shard(2 * FP32 * k, n)) for k in numels),
    }
    assert optimizer_state_bytes(numels, FSDP_OPTIM)[1] == 0  # adamw_torch: nothing paged
    ctx, nccl = cuda_context_bytes(coeffs), nccl_buffer_bytes(coeffs)

    best = None
    # the FSDP-QLoRA recipe does not upcast: activations, the residual stream and the lm_head stay in the
    # compute dtype (memory.residual_bytes), so the per-rank activation terms are the no-upcast ones
    for name, single in phases(model, lora, replace(train, kbit_upcast=False), coeffs).items():
        logits = single["logits"]
        working = single["layer_working_set"]
        if name == "optimizer step":  # AdamW's temporaries scale with the (sharded) parameters
            working = 0 if cpu_offload else _shard(working, n)
        terms = {**shards, "saved_activations": single["saved_activations"], "layer_working_set": working,
                 "logits": logits}
        if name == "optimizer step":
            terms["gathered_layers"] = 0  # no layer is gathered while stepping
        allocated = sum(terms.values())
        margin = int(fsdp_margin_frac(coeffs) * allocated)
        reserve = allocator_reserve_bytes(model, lora, train, terms, coeffs) if terms["saved_activations"] else 0
        required = required_budget_bytes(allocated + margin, reserve, train, coeffs)
        if best is None or required > best[0]:
            best = (required, name, terms)
    required, _, terms = best
    reserve = allocator_reserve_bytes(model, lora, train, terms, coeffs)
    margin = int(fsdp_margin_frac(coeffs) * sum(terms.values()))
    training_needs = required + ctx + nccl

    lora_shards = sum(alloc(_shard(FP32 * k, n)) for k in numels)
    if sharded:
        load_terms = (("shards", on_gpu * (_shard(q_full, n) + _shard(u_full, n) + lora_shards)),
                      ("quant_state", c_full),
                      ("one_tensor", sharded_load_transient_bytes(model, train, n)))
    else:
        # Load and wrap (measured on 2 x H200, calibration/multigpu): every rank loads the whole 4-bit model, peft adds
        # the whole LoRA, and FSDP2's fully_shard allocates each rank's shards while the whole tensors are still
        # held, so the wrap peaks at whole + shard (Llama-2-13B r64 at seq 4096: 11.46 GiB predicted this way, 11.43 GiB measured).
        load_terms = (("whole_model", q_full + c_full + u_full + lora_params_bytes(numels)),
                      ("shards", _shard(q_full, n) + _shard(c_full, n) + _shard(u_full, n) + lora_shards))
    load_alloc = sum(v for _, v in load_terms)
    load_needs = required_budget_bytes(load_alloc, 0, train, coeffs) + ctx + nccl
    peak_phase = "load" if load_needs > training_needs else "training"
    notes = [calibration_note(coeffs), f"optimizer {FSDP_OPTIM}: {FSDP_OPTIM_REASON}", SHARDED_NOTE if sharded else FULL_NOTE]
    if sharded:
        notes.append("quant_state (absmax and double-quant constants) is kept whole on every GPU, not sharded")
    if cpu_offload:
        notes.append("cpu_offload: parameter, gradient and optimizer shards live in CPU memory")
    cpu_ram = cpu_ram_per_node(model, lora, train, n, cpu_offload)
    return FsdpMemory(n=n, **terms, allocator_reserve=reserve, cuda_context=ctx, nccl_buffer=nccl, calibration_margin=margin,
                      load_allocated=load_alloc, load_needs_bytes=load_needs, training_needs_bytes=training_needs, peak_phase=peak_phase,
                      needs_bytes=max(load_needs, training_needs), cpu_offload=cpu_offload, loading=loading,
                      load_terms=load_terms, cpu_ram=cpu_ram, notes=tuple(notes))


def peak_allocated_per_gpu(mem: DdpMemory | FsdpMemory) -> int:
    """What torch.cuda.max_memory_allocated() should read on each rank over a whole run: DDP, the single-GPU
    peak plus the gradient buckets; FSDP, the larger of the training phase and the load/wrap phase."""
    if isinstance(mem, DdpMemory):
        return mem.single.peak_allocated_bytes + mem.grad_buckets
    return max(mem.peak_allocated_bytes, mem.load_allocated)


# --------------------------------------------------------------------------- planning

@dataclass(frozen=True, slots=True)
class MultiPlan:
    """One setting on n GPUs. train is per rank: global batch = n x batch_size x grad_accum."""

    strategy: str
    n: int
    model: ModelSpec
    gpu: GpuSpec
    lora: LoraSettings
    train: TrainSettings
    memory: DdpMemory | FsdpMemory
    capacity_bytes: int
    tokens_per_s_per_gpu: float  # planner.speed on one rank; communication not modelled
    notes: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return self.memory.needs_bytes <= self.capacity_bytes

    @property
    def global_batch(self) -> int:
        return self.n * self.train.effective_batch


def per_gpu(strategy: str, model: ModelSpec, lora: LoraSettings, train: TrainSettings, coeffs: Coefficients,
            n: int, **fsdp_kw) -> DdpMemory | FsdpMemory:
    if strategy == "ddp":
        return ddp_per_gpu(model, lora, train, coeffs, n)
    if strategy == "fsdp":  # the plan's loading: sharded unless asked (fsdp_per_gpu alone keeps the measured "full")
        return fsdp_per_gpu(model, lora, train, coeffs, n, **{"loading": DEFAULT_LOADING, **fsdp_kw})
    raise QfitError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")


def rank_request(req: Request, n: int, strategy: str) -> tuple[Request, list[str]]:
    """The request one rank searches: the effective batch split over n ranks; FSDP fixes the optimizer."""
    notes = []
    if req.uncheckpointed_layers:
        raise QfitError("--uncheckpointed-layers plans one GPU: drop it with --num-gpus")
    if strategy == "fsdp":
        if req.optim not in (None, FSDP_OPTIM):
            raise QfitError(f"--optim {req.optim} cannot run under FSDP: {FSDP_OPTIM_REASON}")
        if req.optim is None:
            notes.append(f"optimizer {FSDP_OPTIM}: {FSDP_OPTIM_REASON}")
        req = replace(req, optim=FSDP_OPTIM)
    if not (req.batch_size and req.grad_accum):
        eff = req.effective_batch or DEFAULT_EFFECTIVE_BATCH
        if req.batch_size is None or eff // n >= req.batch_size:
            req = replace(req, effective_batch=max(1, eff // n))
            notes.append(f"effective batch {eff} split over {n} GPUs: {max(1, eff // n)} per rank")
    return req, notes


def _key(tier: int, p: MultiPlan) -> tuple:
    """planner.search.rank_key's order: fitting, LoRA tier, longer sequences, 32-bit optimizer state, faster,
    optimizer, memory."""
    optim_pref = OPTIM_ORDER.index(p.train.optim) if p.train.optim in OPTIM_ORDER else 0
    return (not p.fits, tier, -p.train.seq_len, "8bit" in p.train.optim, -round(p.tokens_per_s_per_gpu, 1), optim_pref,
            p.memory.needs_bytes)


def plan_multi(model: ModelSpec, gpu: GpuSpec, req: Request, coeffs: Coefficients, n: int, strategy: str,
               **fsdp_kw) -> tuple[MultiPlan, ...]:
    """Every candidate (planner.search.candidates, per rank) on n x gpu, best first; [0] fits or none does."""
    _check_n(n)
    if strategy not in STRATEGIES:
        raise QfitError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    rreq, notes = rank_request(req, n, strategy)
    cands, search_notes = candidates(model, gpu, rreq)
    cap = capacity_bytes(gpu, coeffs)
    scored = []
    for tier, lora, train in cands:
        mem = per_gpu(strategy, model, lora, train, coeffs, n, **fsdp_kw)
        p = MultiPlan(strategy=strategy, n=n, model=model, gpu=gpu, lora=lora, train=train, memory=mem,
                      capacity_bytes=cap, tokens_per_s_per_gpu=tokens_per_second(model, lora, train, gpu, coeffs),
                      notes=tuple(notes + search_notes) + mem.notes)
        scored.append((_key(tier, p), p))
    scored.sort(key=lambda kv: kv[0])
    return tuple(p for _, p in scored)


def best_multi(model: ModelSpec, gpu: GpuSpec, req: Request, coeffs: Coefficients, n: int, strategy: str,
               **fsdp_kw) -> MultiPlan | None:
    plans = plan_multi(model, gpu, req, coeffs, n, strategy, **fsdp_kw)
    return plans[0] if plans and plans[0].fits else None


@dataclass(frozen=True, slots=True)
class MultiChoice:
    """What `qfit plan --num-gpus N` settled on, with the numbers behind the choice (bytes)."""

    plans: tuple[MultiPlan, ...]  # every candidate of the chosen strategy, best first (planner.multigpu.plan_multi)
    strategy: str  # "ddp" or "fsdp"
    asked: str  # --strategy: "auto", "ddp" or "fsdp"
    cpu_offload: bool
    loading: str
    ddp_min_needs_bytes: int | None = None  # the smallest DDP configuration, when auto turned DDP down
    fsdp_min_needs_bytes: int | None = None  # the smallest FSDP configuration without offload, when offload was turned on

    @property
    def best(self) -> MultiPlan | None:
        return self.plans[0] if self.plans and self.plans[0].fits else None


def _min_needs(plans: tuple[MultiPlan, ...]) -> int:
    return min(p.memory.needs_bytes for p in plans)


def choose_multi(model, gpu, req: Request, coeffs, n: int, strategy: str | None = None,
                 cpu_offload: bool | None = None, loading: str | None = None) -> MultiChoice:
    """--strategy auto: DDP when a DDP plan fits (each rank keeps the whole model: no per-layer all-gather,
    faster), else FSDP. --cpu-offload unset: off, on only when no FSDP plan fits without it (like
    --gradient-checkpointing, a value the user does not fix is searched). --loading unset: sharded
    (planner.train.sharded_load, what `qfit run --strategy fsdp` does); full is the measured whole-model-first path."""
    asked = strategy or "auto"
    if asked == "ddp" and cpu_offload:
        raise QfitError("--cpu-offload is FSDP's (DDP keeps the whole model on every GPU): use --strategy fsdp or auto")
    if asked == "ddp" and loading is not None:
        raise QfitError("--loading is FSDP's (under DDP every rank loads the whole model): use --strategy fsdp or auto")
    if loading == "rank0_cpu":
        raise QfitError(RANK0_CPU_MEASURED)
    loading = loading or DEFAULT_LOADING
    ddp_min = None
    if asked in ("auto", "ddp") and not cpu_offload:
        ddp = plan_multi(model, gpu, req, coeffs, n, "ddp")
        if asked == "ddp" or ddp[0].fits:
            return MultiChoice(ddp, "ddp", asked, False, loading)
        ddp_min = _min_needs(ddp)
        if req.optim not in (None, FSDP_OPTIM):
            raise QfitError(f"DDP does not fit on {n} x {gpu.name} and FSDP cannot run --optim {req.optim}: "
                            f"{FSDP_OPTIM_REASON}; drop --optim or pass --optim {FSDP_OPTIM}")
    offloads = (False, True) if cpu_offload is None else (cpu_offload,)
    first = None
    for offload in offloads:
        plans = plan_multi(model, gpu, req, coeffs, n, "fsdp", cpu_offload=offload, loading=loading)
        if first is None:
            first = plans
        if plans[0].fits:
            fsdp_min = _min_needs(first) if offload and cpu_offload is None else None
            return MultiChoice(plans, "fsdp", asked, offload, loading, ddp_min, fsdp_min)
    return MultiChoice(first, "fsdp", asked, offloads[0], loading, ddp_min)


def least_memory_request(req: Request) -> Request:
    """The corner of `req` that needs the least memory: checkpointing on, the last LoRA fallback (r8, attn),
    the shortest auto sequence, unless the user fixed them. The micro-batch stays searched (a micro-batch of
    the whole per-rank batch has no accumulated gradients to keep). Memory never falls when the micro-batch,
    sequence, rank or targets grow, and checkpointing never raises it (tests/test_memory.py properties),
    so some plan of req fits iff some plan of this request fits (tests/test_plan_multi.py checks it against
    the full search)."""
    low = req
    if low.gradient_checkpointing is None:
        low = replace(low, gradient_checkpointing=True)
    if not (low.rank or low.targets):
        rank, targets = LORA_FALLBACKS[-1]
        low = replace(low, rank=rank, targets=targets)
    if low.seq_len == 0:
        low = replace(low, seq_len=AUTO_SEQ_LENS[0])
    return low


def fewest_gpus(model, gpu, req: Request, coeffs, strategy: str | None = None, cpu_offload: bool | None = None,
                loading: str | None = None, start: int = 2, max_n: int = 8) -> tuple[int, str, bool] | None:
    """(n, strategy, cpu_offload): the fewest GPUs in start..max_n on which `qfit plan --num-gpus n` with
    the same strategy, offload and loading choices finds a fitting plan, in choose_multi's order (DDP, FSDP,
    FSDP with CPU offload). Searches only least_memory_request(req): a few ms."""
    low = least_memory_request(req)
    asked = strategy or "auto"
    loading = loading or DEFAULT_LOADING
    fsdp_ok = asked != "ddp" and req.optim in (None, FSDP_OPTIM)
    offloads = (False, True) if cpu_offload is None else (cpu_offload,)
    for n in range(start, max_n + 1):
        if asked in ("auto", "ddp") and not cpu_offload and best_multi(model, gpu, low, coeffs, n, "ddp") is not None:
            return n, "ddp", False
        if fsdp_ok:
            for offload in offloads:
                if best_multi(model, gpu, low, coeffs, n, "fsdp", cpu_offload=offload, loading=loading) is not None:
                    return n, "fsdp", offload
    return None
