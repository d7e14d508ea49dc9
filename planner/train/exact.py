"""Exact mode, the heavy half: run one real LoRA training step (qlora, lora-8bit or lora) on fake tensors and
count every byte.
(One job, the trace, hence the length: the allocation tracker and the step it watches belong together.)

The stack is the one `qfit run` builds (planner/train/stack.py): transformers' bitsandbytes
integration puts Linear4bit layers where from_pretrained would, peft's prepare_model_for_kbit_training
and get_peft_model wrap it, and the step is what transformers' Trainer runs (accelerate's autocast
wrapper with its fp32 output conversion, loss / num_items_in_batch, backward, clip_grad_norm_ at 1.0,
optimizer.step, zero_grad). Every tensor is a FakeTensor: shapes, dtypes and storages are real, no
memory is touched, so a 7B-shaped layer costs what a few kilobytes would.

A TorchDispatchMode above the FakeTensorMode sees every op's outputs. Each new storage is counted
as the CUDA caching allocator would (rounded up to 512 bytes) and a weakref finalizer sees it die;
the running sum gives peak allocated bytes, per named window of the step (forward, loss, backward of
the last layer, optimizer step, ...), and what was alive at each window's peak.

The trace runs on the CPU but stands for an sm90 GPU (H200). Where CPU execution would allocate
differently from CUDA's, the trace does what CUDA does (each named where it is done):
  - dropout: the fused native_dropout with a bool mask (_cuda_dropout);
  - peft's `torch.is_autocast_enabled()` (the CUDA flag) answers for the autocast in force;
  - transformers' is_tracing() ignores fake tensors, so the all-ones attention mask is dropped and
    sdpa runs causal with enable_gqa, as on the GPU (_untrace_fake_tensors);
  - bitsandbytes gemm_4bit: its CUDA dispatch, dequantize + F.linear at training sizes, with the
    dequantized weight as a workspace (AllocTracker._gemm_4bit_workspace);
  - bitsandbytes.matmul (lora-8bit): MatMul8bitLt, not the CPU's MatMul8bitFp (_cuda_int8_matmul), with
    int8_scaled_mm's int32 and fp16 buffers as workspaces (AllocTracker._int8_scaled_mm_workspace);
  - flash attention's backward workspaces (AllocTracker._flash_backward_workspace);
  - torch AdamW's foreach implementation; paged bitsandbytes state in managed memory; AdamW's step
    counters on the host; two 32 MiB cuBLAS workspaces (CudaDevice).
Module.to on fake parameters takes Module._apply's `param.data = ...` path (_module_to_sets_data).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import itertools
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from planner.exact_types import INT8_TRACE_THRESHOLD, CudaDevice
from planner.memory import ALLOC_GRANULE, resolve_targets
from planner.specs import LoraSettings, ModelSpec, TrainSettings

# categories of storage that are not on torch's CUDA allocator (planner/exact.py groups the others)
EXCLUDED = ("host", "paged")


def alloc(n_bytes: int) -> int:
    """The caching allocator's block for a request of n_bytes (c10 CUDACachingAllocator round_size)."""
    if n_bytes <= 0:
        return 0
    return -(-n_bytes // ALLOC_GRANULE) * ALLOC_GRANULE


# --------------------------------------------------------------------------- bitsandbytes' CUDA dispatch

@functools.lru_cache(maxsize=8)
def _bnb_cuda_heuristic(num_sms: int, major: int, minor: int):
    """bitsandbytes' own `_gemm_4bit_use_custom_cuda` (backends/cuda/ops.py), lifted from its source
    for one GPU: that module cannot be imported without CUDA, but the heuristic is plain Python over
    (M, N, K, dtype, SM count, compute capability). None if bitsandbytes no longer has it."""
    import bitsandbytes.backends as backends

    path = f"{backends.__path__[0]}/cuda/ops.py"
    with open(path) as fh:
        tree = ast.parse(fh.read())
    wanted = {"_gemm_4bit_use_custom_cuda", "_GEMM_4BIT_CUSTOM_FLOOR_M"}
    body = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in wanted:
            node.decorator_list = []  # its functools.cache would outlive this GPU's namespace
            body.append(node)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") in wanted for t in node.targets):
            body.append(node)
    if len(body) < 2:
        return None
    ns = {"torch": torch, "functools": functools, "_gpu_dispatch_props": lambda _index: (num_sms, major, minor)}
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), ns)  # noqa: S102 - bitsandbytes' source
    return functools.lru_cache(maxsize=4096)(ns["_gemm_4bit_use_custom_cuda"])


def gemm_4bit_uses_dequant(device: CudaDevice, dtype, m: int, n: int, k: int, blocksize: int) -> bool:
    """True when bitsandbytes' CUDA gemm_4bit dequantizes the weight and calls F.linear: always above
    1536 rows (_gemm_4bit_custom_max_m) or for K not a multiple of the blocksize; below, its
    per-architecture heuristic decides (on sm90 the fused kernel wins only up to 16-64 rows)."""
    if m > 1536 or k % blocksize != 0:
        return True
    use_custom = _bnb_cuda_heuristic(device.num_sms, device.major, device.minor)
    if use_custom is None:  # the heuristic moved: assume the dequant path (the larger one)
        return True
    return not use_custom(0, dtype, m, n, k)


# --------------------------------------------------------------------------- the tracker

@dataclass
class WindowPeak:
    bytes: int = -1
    event: int = -1
    op: str = ""
    region: str = ""


@dataclass
class TraceLog:
    """What the tracker saw: per storage its size and category, the alloc/free event log, window peaks."""

    sizes: dict = field(default_factory=dict)  # serial -> bytes (allocator-rounded)
    category: dict = field(default_factory=dict)  # serial -> category, for storages given a role
    born: dict = field(default_factory=dict)  # serial -> (stage, region)
    events: list = field(default_factory=list)  # +serial (alloc) / -serial-1 (free)
    marks: dict = field(default_factory=dict)  # name -> len(events) then: "loaded" (before the LoRA wrap), "train"
    windows: dict = field(default_factory=dict)  # window -> WindowPeak
    window_order: list = field(default_factory=list)


class AllocTracker(TorchDispatchMode):
    """Counts live bytes per storage over time, as the CUDA caching allocator would."""

    def __init__(self, device: CudaDevice, compute_dtype):
        super().__init__()
        self.device = device
        self.compute_dtype = compute_dtype
        self.log = TraceLog()
        self._ids: dict[int, int] = {}  # id(storage) -> serial, while alive
        self._serial = itertools.count()
        self.current = 0
        self.window = "setup"
        self.stage = "setup"  # setup / forward / recompute / backward / optimizer
        self.region = ""
        self.op = ""
        self.scalar_calls: list[str] = []

    # ------------------------------------------------------------ storage bookkeeping
    def _new(self, nbytes: int, category: str | None = None) -> int:
        serial = next(self._serial)
        size = alloc(nbytes)
        self.log.sizes[serial] = size
        stage = self.stage
        if stage == "backward" and torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1:
            # the autograd engine runs backward ops with grad mode off; a checkpointed layer's recompute
            # (transformers 5 checkpoints forward, so no module hook fires) runs with it on
            stage = "recompute"
        self.log.born[serial] = (stage, self.region, self.op)
        if category:
            self.log.category[serial] = category
        self.log.events.append(serial)
        if category not in EXCLUDED:
            self.current += size
            self._check_peak()
        return serial

    def _free(self, serial: int) -> None:
        self.log.events.append(-serial - 1)
        if self.log.category.get(serial) not in EXCLUDED:
            self.current -= self.log.sizes[serial]

    def _check_peak(self) -> None:
        w = self.log.windows.get(self.window)
        if w is None:
            w = self.log.windows[self.window] = WindowPeak()
            self.log.window_order.append(self.window)
        if self.current > w.bytes:
            w.bytes, w.event, w.op, w.region = self.current, len(self.log.events) - 1, self.op, self.region

    def track(self, t, category: str | None = None) -> int | None:
        """Register t's storage (once); give it a category if asked. Returns its serial."""
        if not isinstance(t, torch.Tensor):
            return None
        st = t.untyped_storage()
        sid = id(st)
        serial = self._ids.get(sid)
        if serial is None:
            serial = self._new(st.nbytes(), category)
            self._ids[sid] = serial
            weakref.finalize(st, self._died, sid, serial)
        else:
            if alloc(st.nbytes()) != self.log.sizes[serial]:  # resized in place (out= ops)
                self.resize(serial, st.nbytes())
            if category:
                self.set_category(serial, category)
        return serial

    def resize(self, serial: int, nbytes: int) -> None:
        self._free(serial)
        self.log.sizes[serial] = alloc(nbytes)
        self.log.events.append(serial)
        if self.log.category.get(serial) not in EXCLUDED:
            self.current += self.log.sizes[serial]
            self._check_peak()

    def set_category(self, serial: int, category: str) -> None:
        old = self.log.category.get(serial)
        if (old in EXCLUDED) != (category in EXCLUDED):  # moving on or off the allocator's books
            self.current += self.log.sizes[serial] * (1 if old in EXCLUDED else -1)
        self.log.category[serial] = category

    def _died(self, sid: int, serial: int) -> None:
        if self._ids.get(sid) == serial:
            del self._ids[sid]
        self._free(serial)

    def transient(self, nbytes_list, category: str = "kernel_workspace") -> list[int]:
        """Buffers a CUDA kernel allocates and frees inside one op (not visible on the CPU)."""
        return [self._new(n, category) for n in nbytes_list if n > 0]

    def end_transient(self, serials) -> None:
        for s in serials:
            self._free(s)

    def set_window(self, window: str) -> None:
        self.window = window
        self._check_peak()

    # ------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.op = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        if func is torch.ops.aten._local_scalar_dense.default:
            return self._scalar(args[0])
        transients = []
        name = getattr(func, "_schema", None)
        qual = name.name if name is not None else ""
        if qual == "bitsandbytes::gemm_4bit":
            transients = self._gemm_4bit_workspace(*args, **kwargs)
        elif qual == "bitsandbytes::int8_scaled_mm":
            transients = self._int8_scaled_mm_workspace(*args, **kwargs)
        elif func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
            transients = self._flash_backward_workspace(*args, **kwargs)
        out = func(*args, **kwargs)
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                self.track(t)
        self.end_transient(transients)
        return out

    def _scalar(self, t):
        """`.item()` / `bool()` on a fake tensor: the trace feeds full-length sequences of ones-masks,
        so a boolean reduction is True; a count or value is only logged (memory does not depend on it)."""
        self.scalar_calls.append(f"{self.window}: {t.dtype}")
        if t.dtype == torch.bool:
            return True
        if t.dtype.is_floating_point:
            return 1.0
        return 1

    def _gemm_4bit_workspace(self, A, B, shapeB, absmax, blocksize, quant_type, bias=None,
                             absmax_8bit=None, absmax_code=None, absmax_offset=None):
        """bitsandbytes backends/cuda/ops.py gemm_4bit: on its dequant path (_dequant_linear_fallback)
        it allocates absmax_dq (fp32), absmax_dq + offset (fp32) when nested, and the dequantized
        weight B_dq [N, K] in A's dtype, all freed when the op returns."""
        k = A.shape[-1]
        m = A.numel() // k
        n = shapeB[0]
        if not gemm_4bit_uses_dequant(self.device, A.dtype, m, n, k, blocksize):
            return []
        sizes = []
        if absmax_8bit is not None:
            blocks = absmax_8bit.numel()
            sizes += [4 * blocks, 4 * blocks]
        sizes.append(A.element_size() * shapeB[0] * shapeB[1])
        return self.transient(sizes)

    def _int8_scaled_mm_workspace(self, A, B, row_stats, col_stats, bias=None, dtype=None):
        """bitsandbytes' int8_scaled_mm has no CUDA kernel of its own: its default one (backends/default/ops.py) runs
        int8_linear_matmul into an int32 C [M, N], then the CUDA int8_mm_dequant (backends/cuda/ops.py) writes an
        fp16 [M, N] (`out = torch.empty_like(A, dtype=torch.float16)`) and returns `out.to(dtype)`, a second
        buffer unless dtype is fp16. Both are alive when the output is allocated and freed when the op returns."""
        m, n = A.numel() // A.shape[-1], B.shape[0]
        sizes = [4 * m * n]
        if (dtype or torch.float16) != torch.float16:
            sizes.append(2 * m * n)
        return self.transient(sizes)

    def _flash_backward_workspace(self, grad_out, q, k, v, out, lse, *rest, attn_mask=None, **kw):
        """The CPU op stands for CUDA's. Without a mask CUDA runs FlashAttention-2's mha_bwd
        (aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp): besides dq, dk, dv it allocates
        softmax_d fp32 [B, H, round128(L_q)], dq_accum fp32 [B, round128(L_q), H, round32(D)] and, for
        grouped-query attention, dk and dv expanded to all query heads before the sum. With a mask CUDA
        runs the memory-efficient kernel, whose backward adds delta fp32 [B, H, L_q] (its other
        workspaces depend on kernel tiling and are not modelled)."""
        b, h, lq, d = q.shape
        hk, lk = k.shape[1], k.shape[2]
        if attn_mask is not None:
            return self.transient([4 * b * h * lq])
        lq_r = -(-lq // 128) * 128
        d_r = -(-d // 32) * 32 if d <= 192 else 256
        sizes = [4 * b * h * lq_r, 4 * b * lq_r * h * d_r]
        if hk != h:
            sizes += [q.element_size() * b * lk * h * d] * 2
        return self.transient(sizes)


# --------------------------------------------------------------------------- CUDA behaviour on the CPU

def _cuda_dropout(input, p=0.5, training=True, inplace=False):
    """at::dropout on CUDA takes the fused kernel (is_fused_kernel_acceptable): native_dropout, which
    saves a bool mask. The CPU path would save a full-precision noise tensor instead."""
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if p == 1.0:
        return input.mul(0) if not inplace else input.mul_(0)
    out, _mask = torch.native_dropout(input, p, True)
    if inplace:
        input.copy_(out)
        return input
    return out


def _cuda_int8_matmul(A, B, out=None, state=None, threshold=0.0, bias=None):
    """bitsandbytes.matmul (autograd/_functions.py), as Linear8bitLt.forward calls it, on a CUDA input: training on
    the CPU takes MatMul8bitFp (dequantize + F.linear), on CUDA always the LLM.int8 MatMul8bitLt."""
    from bitsandbytes.autograd._functions import MatMul8bitLt, MatmulLtState

    state = state or MatmulLtState()
    if threshold > 0.0:
        state.threshold = threshold
    return MatMul8bitLt.apply(A, B, out, bias, state)


@contextlib.contextmanager
def cuda_semantics():
    """Patch the few Python-level places where CPU and CUDA execution allocate differently."""
    saved_dropout = F.dropout
    saved_is_autocast = torch.is_autocast_enabled
    saved_sync = torch.cuda.synchronize
    import bitsandbytes as bnb

    saved_matmul = bnb.matmul

    def is_autocast_enabled(device_type=None):
        # peft's LoRA forward calls torch.is_autocast_enabled() (the CUDA autocast state): answer
        # for the autocast this trace runs under
        if device_type is None:
            return saved_is_autocast("cpu") or saved_is_autocast("cuda")
        return saved_is_autocast(device_type)

    F.dropout = _cuda_dropout
    torch.is_autocast_enabled = is_autocast_enabled
    torch.cuda.synchronize = lambda *a, **k: None
    bnb.matmul = _cuda_int8_matmul
    tracing_patched = _untrace_fake_tensors()
    try:
        yield
    finally:
        bnb.matmul = saved_matmul
        F.dropout = saved_dropout
        torch.is_autocast_enabled = saved_is_autocast
        torch.cuda.synchronize = saved_sync
        for module, original in tracing_patched:
            module.is_tracing = original


def _untrace_fake_tensors() -> list:
    """transformers' is_tracing(tensor) is True for a FakeTensor, and masking_utils then keeps a dense
    causal mask (and repeat_kv instead of sdpa's enable_gqa) where the real run, seeing an all-ones
    attention mask, drops it and lets sdpa take the causal flash kernel. Here is_tracing ignores
    fake tensors (still True under dynamo/jit), and `.all()` on the mask answers True (see _scalar)."""
    import sys

    from transformers.utils import import_utils

    original = import_utils.is_tracing

    def is_tracing(tensor=None):
        return original(None)

    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers") and getattr(module, "is_tracing", None) is original:
            module.is_tracing = is_tracing
            patched.append((module, original))
    return patched


# --------------------------------------------------------------------------- building the model

class TraceError(ValueError):
    """A configuration the trace cannot build or run; the message says what to do."""


def _hf_config(config_fields: dict, layers: int, trust_remote_code: bool = False):
    from transformers import AutoConfig

    cfg = {k: v for k, v in config_fields.items() if k not in ("model_type", "architectures", "auto_map")}
    cfg["num_hidden_layers"] = layers
    model_type = config_fields.get("model_type")
    if not model_type:
        raise TraceError("the config has no 'model_type': add it (e.g. \"llama\")")
    if "auto_map" in config_fields and not trust_remote_code:
        raise TraceError(f"model_type {model_type!r} needs trust_remote_code (custom modeling code); "
                         "exact mode runs only architectures built into transformers")
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as exc:
        raise TraceError(f"transformers {_tf_version()} does not know model_type {model_type!r} "
                         f"({str(exc).splitlines()[0][:120]}); upgrade transformers or use the analytic plan") from None


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def _materialize(model, compute_dtype, tracker: AllocTracker) -> None:
    """Give every meta parameter and buffer a fake storage, as loading a checkpoint in the compute
    dtype would, and quantize Linear4bit weights with bitsandbytes' own quantize_4bit (what
    Params4bit._quantize calls), Linear8bitLt weights with its int8_vectorwise_quant (Int8Params._quantize).
    Ties (lm_head = embed_tokens) keep one storage."""
    import bitsandbytes as bnb

    memo: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        is4 = isinstance(module, bnb.nn.Linear4bit)
        is8 = isinstance(module, bnb.nn.Linear8bitLt)
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) in memo:
                module._parameters[name] = memo[id(p)]
                continue
            if is4 and name == "weight":
                new = _quantized_weight(p, module, compute_dtype, tracker)
            elif is8 and name == "weight":
                new = _int8_weight(p, module, compute_dtype, tracker)
            else:
                dtype = compute_dtype if p.dtype.is_floating_point else p.dtype
                new = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=p.requires_grad)
                tracker.track(new, "unquantized_weights")
            memo[id(p)] = new
            module._parameters[name] = new
        for name, b in list(module._buffers.items()):
            if b is None:
                continue
            new = torch.empty(b.shape, dtype=b.dtype)
            tracker.track(new, "buffers")
            module._buffers[name] = new


def _quantized_weight(meta_weight, module, compute_dtype, tracker: AllocTracker):
    """transformers' Bnb4bitQuantize.convert: Params4bit(value, **old.__dict__).to(device) ->
    bnb.functional.quantize_4bit(w, blocksize, compress_statistics, quant_type, quant_storage).

    A FakeTensor cannot be re-wrapped as a Params4bit subclass, so the packed weight is a frozen
    nn.Parameter carrying Params4bit's attributes (quant_state, blocksize, ...): Linear4bit.forward,
    bnb.matmul_4bit and peft read only those."""
    import bitsandbytes as bnb

    attrs = dict(meta_weight.__dict__)
    w = torch.empty(tuple(meta_weight.shape), dtype=compute_dtype)  # the checkpoint tensor, briefly
    w4, qs = bnb.functional.quantize_4bit(
        w, blocksize=attrs.get("blocksize", 64), compress_statistics=attrs.get("compress_statistics", True),
        quant_type=attrs.get("quant_type", "nf4"), quant_storage=attrs.get("quant_storage", torch.uint8))
    del w
    p = torch.nn.Parameter(w4, requires_grad=False)
    attrs.update(quant_state=qs, bnb_quantized=True, module=module)
    for k, v in attrs.items():
        setattr(p, k, v)
    module.quant_state = qs
    tracker.track(p, "quantized_weights")
    for t in _quant_state_tensors(qs):
        tracker.track(t, "quant_constants")
    return p


def _quant_state_tensors(qs) -> list:
    out = [qs.absmax, qs.code]
    if getattr(qs, "nested", False):
        out += [qs.offset, qs.state2.absmax, qs.state2.code]
    return [t for t in out if isinstance(t, torch.Tensor)]


@dataclass
class Built:
    model: object  # the PeftModel
    base: object
    layers: list
    lm_head: object
    embed: object
    final_norm: object
    lora_params: list
    attn_implementation: str


def build(config_fields: dict, layers: int, lora: LoraSettings, targets: tuple[str, ...],
          train: TrainSettings, tracker: AllocTracker, input_requires_grad: bool = False) -> Built:
    """Architecture from its config, loaded as train.method holds the base, LoRA-wrapped: stack.load_4bit (qlora),
    stack.load_base's 8-bit path (lora-8bit) or its 16-bit path (lora) + get_peft_model."""
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    from planner.train import stack

    config = _hf_config(config_fields, layers)
    if train.method == "lora":
        return _build_16bit(config, config_fields, lora, targets, train, tracker, input_requires_grad)
    if train.method == "lora-8bit":
        return _build_8bit(config, config_fields, lora, targets, train, tracker, input_requires_grad)
    bnb_cfg = stack.bnb_config(train.compute_dtype, train.double_quant)
    model = _load_kbit(config, config_fields, Bnb4BitHfQuantizer(bnb_cfg, pre_quantized=False), bnb_cfg, train, tracker)
    return _wrap(model, lora, targets, train, tracker, input_requires_grad)


def _load_kbit(config, config_fields: dict, quantizer, bnb_cfg, train: TrainSettings, tracker: AllocTracker):
    """from_pretrained(quantization_config=bnb_cfg) + prepare_model_for_kbit_training, as stack.load_base does for
    a k-bit base: the transformers quantizer puts its bitsandbytes layers where from_pretrained would, the weights
    get fake storages (_materialize: quantized as the layer's own Params class would), and the rest is upcast."""
    from peft import prepare_model_for_kbit_training

    from planner.train import stack

    compute_dtype = stack.TORCH_DTYPES[train.compute_dtype]
    # the skeleton is built on the meta device outside the fake and tracking modes (Params4bit / Int8Params cannot
    # wrap a FakeTensor); _materialize then gives it fake storages, as loading the checkpoint would
    with _disable_current_modes():
        model = _meta_skeleton(config, config_fields, compute_dtype)
        quantizer._process_model_before_weight_loading(model, device_map=None)
    _materialize(model, compute_dtype, tracker)
    model = quantizer._process_model_after_weight_loading(model)  # is_loaded_in_{4,8}bit: peft's k-bit LoRA layers
    model.hf_quantizer = quantizer
    model.config.quantization_config = bnb_cfg
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False, auto_clear_cache=False)
    model.config.use_cache = False
    tracker.log.marks["loaded"] = len(tracker.log.events)  # stack.load_base returns here
    return model


def _meta_skeleton(config, config_fields: dict, compute_dtype):
    """The model built from its config on the meta device (no storage yet), or a TraceError naming the type."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    except ValueError as exc:
        raise TraceError(f"transformers cannot build {config_fields.get('model_type')!r} as a causal LM: "
                         f"{str(exc).splitlines()[0][:160]}") from None


def _build_16bit(config, config_fields: dict, lora: LoraSettings, targets: tuple[str, ...], train: TrainSettings,
                 tracker: AllocTracker, input_requires_grad: bool) -> Built:
    """lora: stack.load_base's 16-bit path: from_pretrained(dtype=compute dtype), no quantization, no k-bit
    preparation; the decoder layers' nn.Linear weights are the base weights (category quantized_weights, the
    MemoryBreakdown field that holds the base as the method stores it)."""

    from planner.train import stack

    compute_dtype = stack.TORCH_DTYPES[train.compute_dtype]
    with _disable_current_modes():
        model = _meta_skeleton(config, config_fields, compute_dtype)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    _materialize(model, compute_dtype, tracker)
    for module in decoder.layers.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.qfit_base_weight = True
            tracker.track(module.weight, "quantized_weights")
    model.config.use_cache = False
    tracker.log.marks["loaded"] = len(tracker.log.events)  # stack.load_base returns here
    return _wrap(model, lora, targets, train, tracker, input_requires_grad)


def _build_8bit(config, config_fields: dict, lora: LoraSettings, targets: tuple[str, ...], train: TrainSettings,
                tracker: AllocTracker, input_requires_grad: bool) -> Built:
    """lora-8bit: stack.load_base's 8-bit path, from_pretrained(quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    + prepare_model_for_kbit_training. transformers' Bnb8BitHfQuantizer puts bnb.nn.Linear8bitLt layers where
    from_pretrained would (replace_with_bnb_linear), each weight is quantized as Int8Params._quantize does
    (_int8_weight), and prepare_model_for_kbit_training upcasts the rest to fp32.

    The one departure, INT8_TRACE_THRESHOLD: the layers trace with LLM.int8's outlier threshold at 0.0, so
    MatMul8bitLt takes its static int8_scaled_mm path (subA = None). At the real 6.0 the number of outlier columns
    depends on the values (the fake kernels of int8_vectorwise_quant and int8_mixed_scaled_mm return
    `get_ctx().new_dynamic_size()`), which fake tensors cannot size; planner/exact.py adds the saved outlier
    columns back from planner.memory.int8_outlier_bytes_per_token."""
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

    bnb_cfg = BitsAndBytesConfig(load_in_8bit=True)  # as stack.load_base: threshold 6.0, int8 weights
    model = _load_kbit(config, config_fields, Bnb8BitHfQuantizer(bnb_cfg, pre_quantized=False), bnb_cfg, train, tracker)
    return _wrap(model, lora, targets, train, tracker, input_requires_grad)


def _int8_weight(meta_weight, module, compute_dtype, tracker: AllocTracker):
    """transformers' Bnb8bitQuantize.convert: Int8Params(value).to(device) -> Int8Params._quantize:
    `B = data.contiguous().to(device, float16)`, `CB, SCB, _ = int8_vectorwise_quant(B)`, `data = CB`.

    As for 4-bit, a FakeTensor cannot be re-wrapped as an Int8Params subclass: the int8 weight is a frozen
    nn.Parameter carrying Int8Params' attributes (CB, SCB, has_fp16_weights), all Linear8bitLt.forward
    (init_8bit_state) and MatMul8bitLt read. The layer's outlier threshold is set to INT8_TRACE_THRESHOLD
    (see _build_8bit)."""
    import bitsandbytes as bnb

    w = torch.empty(tuple(meta_weight.shape), dtype=compute_dtype)  # the checkpoint tensor, briefly
    half = w.contiguous().to(torch.float16)
    del w
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(half)
    del half
    p = torch.nn.Parameter(cb, requires_grad=False)
    p.CB, p.SCB, p.has_fp16_weights, p.qfit_base_weight = cb, scb, False, True
    module.state.threshold = INT8_TRACE_THRESHOLD
    module.state.use_pool = False
    tracker.track(p, "quantized_weights")
    tracker.track(scb, "quant_constants")
    return p


def _wrap(model, lora: LoraSettings, targets: tuple[str, ...], train: TrainSettings, tracker: AllocTracker,
          input_requires_grad: bool) -> Built:
    """get_peft_model and the Trainer's checkpointing setup, on a loaded base (any method)."""
    from peft import get_peft_model

    from planner.train import stack

    with _module_to_sets_data():
        peft_model = get_peft_model(model, stack.lora_config(lora, targets))
    if train.gradient_checkpointing:
        # what Trainer does for activation_checkpointing=True (transformers 5: use_reentrant=False,
        # and enable_input_require_grads on the embeddings)
        enable = getattr(peft_model, "activation_checkpointing_enable", None) or peft_model.gradient_checkpointing_enable
        enable()
        if train.uncheckpointed_layers:  # partial checkpointing, as qfit run's PartialCheckpointing callback
            stack.uncheckpoint_last_layers(peft_model, train.uncheckpointed_layers)
    elif input_requires_grad:
        peft_model.get_base_model().enable_input_require_grads()
    base = peft_model.get_base_model()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    lora_params = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    _label_static(peft_model, tracker)
    return Built(model=peft_model, base=base, layers=list(decoder.layers), lm_head=base.get_output_embeddings(),
                 embed=base.get_input_embeddings(), final_norm=getattr(decoder, "norm", None),
                 lora_params=lora_params, attn_implementation=str(base.config._attn_implementation))


@contextlib.contextmanager
def _module_to_sets_data():
    """peft calls Module.to(device, dtype) on each new adapter (to its 4-bit base layer's device and
    compute dtype, before autocast_adapter_dtype casts it back to fp32). On FakeTensor parameters
    Module._apply always swaps tensors, which torch refuses for tensors the fake mode holds weak
    references to, so this takes Module._apply's other, long-standing path: `param.data = param.to(...)`
    (same storages allocated and freed, same result)."""
    saved = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, non_blocking, _fmt = torch._C._nn._parse_to(*args, **kwargs)
        with torch.no_grad():
            for t in itertools.chain(self.parameters(), self.buffers()):
                cast = dtype if (dtype is not None and (t.is_floating_point() or t.is_complex())) else None
                if (device is not None and t.device != device) or (cast is not None and t.dtype != cast):
                    t.data = t.data.to(device=device, dtype=cast, non_blocking=non_blocking)
        return self

    torch.nn.Module.to = to
    try:
        yield
    finally:
        torch.nn.Module.to = saved


def _label_static(model, tracker: AllocTracker) -> None:
    """After k-bit prep (fp32 upcast) and LoRA: every parameter and buffer gets its category."""
    for p in model.parameters():
        if getattr(p, "bnb_quantized", False) or getattr(p, "qfit_base_weight", False):
            cat = "quantized_weights"
        elif p.requires_grad:
            cat = "lora_params"
        else:
            cat = "unquantized_weights"
        tracker.track(p, cat)
    for _, b in model.named_buffers():
        tracker.track(b, "buffers")


# --------------------------------------------------------------------------- the step

class Regions:
    """Module hooks name the region of each op (embed / layer i / norm / head) and open the forward
    windows; in backward, prehooks on each layer's (and the final norm's) output node mark where its
    backward starts and open the windows "backward, last layer" / "middle layers" / "first layer"
    (the autograd engine runs nodes in reverse creation order, so the marks come in order)."""

    def __init__(self, built: Built, tracker: AllocTracker):
        self.t = tracker
        self.built = built
        self.n = len(built.layers)
        self.in_backward = False
        self.prefix = ""
        self.handles = []
        self.handles.append(built.embed.register_forward_pre_hook(self._pre("embed")))
        for i, layer in enumerate(built.layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre(f"layer {i}")))
            self.handles.append(layer.register_forward_hook(self._post_layer(i)))
        if built.final_norm is not None:
            self.handles.append(built.final_norm.register_forward_pre_hook(self._pre("norm")))
            self.handles.append(built.final_norm.register_forward_hook(self._post_norm))
        self.handles.append(built.lm_head.register_forward_pre_hook(self._pre_head))

    def layer_name(self, i: int) -> str:
        if i == self.n - 1:
            return "last layer"
        if i == 0:
            return "first layer"
        return "middle layers"

    def _pre(self, region):
        def hook(_mod, _args):
            self.t.region = region
            if not self.in_backward and region.startswith("layer"):
                self.t.set_window(f"{self.prefix}forward")
        return hook

    def _pre_head(self, _mod, _args):
        self.t.region = "head"
        if not self.in_backward:
            self.t.set_window(f"{self.prefix}forward, lm_head and loss")

    def _post_layer(self, i):
        def hook(_mod, _args, output):
            if self.in_backward:  # a recompute under a checkpoint that wraps __call__ (older transformers)
                return
            out = output[0] if isinstance(output, tuple) else output
            node = getattr(out, "grad_fn", None)
            if node is not None:
                node.register_prehook(self._backward_of(i))
        return hook

    def _post_norm(self, _mod, _args, output):
        node = getattr(output, "grad_fn", None)
        if node is not None and not self.in_backward:
            node.register_prehook(self._backward_of_norm)

    def _backward_of_norm(self, _grads):
        # the gradient reaching the final norm is the hidden-state gradient, not part of the logits chain
        self.t.region = "norm"

    def _backward_of(self, i):
        def prehook(_grads):
            self.t.region = f"layer {i}"
            self.t.stage = "backward"
            self.t.set_window(f"{self.prefix}backward, {self.layer_name(i)}")
        return prehook

    def remove(self):
        for h in self.handles:
            h.remove()


def _optimizer(params, optim: str, tracker: AllocTracker, fake_mode: FakeTensorMode):
    """What Trainer.create_optimizer builds for --optim (transformers trainer_optimizer.py)."""
    kwargs = {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    if optim == "adamw_torch":
        # on CUDA torch picks the foreach implementation (_default_to_fused_or_foreach); FakeTensor
        # parameters would make it pick the single-tensor loop, so ask for foreach explicitly
        return torch.optim.AdamW(params, foreach=True, **kwargs)
    import bitsandbytes as bnb

    opt = bnb.optim.AdamW(params, optim_bits=8 if "8bit" in optim else 32, is_paged="paged" in optim, **kwargs)
    _patch_bnb_optimizer(opt, tracker, fake_mode)
    return opt


def _patch_bnb_optimizer(opt, tracker: AllocTracker, fake_mode: FakeTensorMode) -> None:
    """bitsandbytes Optimizer8bit on CUDA: state tensors of >= 1e5 elements of a paged optimizer come
    from cudaMallocManaged (F.get_paged), outside torch's allocator; its CPU fallback would put them
    on the allocator. The 8-bit quantization maps (create_dynamic_map, 256 fp32 each) are built on
    the host and moved to the device once."""
    from bitsandbytes import functional as bnbf

    def get_state_buffer(p, dtype=torch.float32):
        buf = torch.zeros_like(p, dtype=dtype)
        paged = opt.is_paged and p.numel() >= 1e5
        tracker.track(buf, "paged" if paged else "optimizer_state")
        return buf

    opt.get_state_buffer = get_state_buffer
    opt.prefetch_state = lambda p: None
    if not hasattr(opt, "name2qmap"):
        return
    with _disable_current_modes():
        real = {"dynamic": bnbf.create_dynamic_map(signed=True), "udynamic": bnbf.create_dynamic_map(signed=False)}
    for key, value in real.items():
        fake = fake_mode.from_tensor(value)
        opt.name2qmap[key] = fake
        tracker.track(fake, "optimizer_state")


def _label_step_state(opt, tracker: AllocTracker) -> None:
    for state in opt.state.values():
        for key, v in state.items():
            if not isinstance(v, torch.Tensor):
                continue
            serial = tracker.track(v)
            if key == "step":  # torch AdamW (capturable=False) keeps the step count on the host
                tracker.set_category(serial, "host")
            elif tracker.log.category.get(serial) != "paged":
                tracker.set_category(serial, "optimizer_state")


def _batches(train: TrainSettings, vocab: int, tracker: AllocTracker) -> list[dict]:
    """Trainer.get_batch_samples: all grad_accum micro-batches of an optimizer step are fetched, and
    moved to the GPU, before the first forward (int64 input_ids, labels, attention_mask)."""
    out = []
    for _ in range(train.grad_accum):
        shape = (train.batch_size, train.seq_len)
        batch = {"input_ids": torch.empty(shape, dtype=torch.long), "labels": torch.empty(shape, dtype=torch.long),
                 "attention_mask": torch.empty(shape, dtype=torch.long)}
        for v in batch.values():
            tracker.track(v, "batch")
        out.append(batch)
    return out


def _accelerate_forward(model, compute_dtype):
    """accelerate Accelerator.prepare_model with mixed precision: forward under autocast, outputs
    converted to fp32 (convert_outputs_to_fp32), exactly as the Trainer's model is wrapped."""
    from accelerate.utils import convert_outputs_to_fp32

    inner = model.forward.__func__

    @functools.wraps(inner)
    def autocast_forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=compute_dtype):
            return inner(self, *args, **kwargs)

    return convert_outputs_to_fp32(autocast_forward)


def run_step(built: Built, train: TrainSettings, vocab: int, tracker: AllocTracker, fake_mode: FakeTensorMode) -> dict:
    """Trainer._inner_training_loop for two optimizer steps, as far as memory can differ: step 1 runs one
    micro-batch (it creates the gradients and the optimizer state), step 2 runs up to two micro-batches
    (the first without gradients, the second accumulating into them; further ones repeat the second)."""
    from planner.train import stack

    compute_dtype = stack.TORCH_DTYPES[train.compute_dtype]
    model = built.model
    model.train()
    forward = _accelerate_forward(model, compute_dtype)
    opt = _optimizer(built.lora_params, train.optim, tracker, fake_mode)
    regions = Regions(built, tracker)
    tracker.log.marks["train"] = len(tracker.log.events)
    tracker.set_window("setup")
    tr_loss = torch.zeros(())  # Trainer._tr_loss lives on the device
    tracker.track(tr_loss, "temporaries")
    micro = {1: 1, 2: min(train.grad_accum, 2)}
    try:
        for step in (1, 2):
            tracker.stage, tracker.region = "forward", "batch"
            tracker.set_window(f"step {step}: fetch batches")
            batches = _batches(train, vocab, tracker)
            num_items = sum(b["labels"][..., 1:].ne(-100).sum() for b in batches)
            for mb in range(1, micro[step] + 1):
                prefix = f"step {step}, micro-batch {mb}: "
                regions.prefix = prefix
                inputs = batches[mb - 1]
                tracker.stage, tracker.region = "forward", "embed"
                tracker.set_window(f"{prefix}forward")
                loss = forward(model, **inputs, num_items_in_batch=num_items)["loss"]
                # Linear4bit.forward casts a bias to the compute dtype in place (bias.data = ...): the
                # new storage is still a weight
                _label_static(model, tracker)
                tracker.stage, tracker.region = "backward", "head"
                regions.in_backward = True
                tracker.set_window(f"{prefix}backward, lm_head and loss")
                loss.backward()
                regions.in_backward = False
                tr_loss += loss.detach()
                del loss
            tracker.stage, tracker.region = "optimizer", "optimizer"
            tracker.set_window(f"step {step}: clip_grad_norm_")
            for p in built.lora_params:
                if p.grad is not None:
                    tracker.set_category(tracker.track(p.grad), "lora_grads")
            torch.nn.utils.clip_grad_norm_(built.lora_params, 1.0)
            tracker.set_window(f"step {step}: optimizer step")
            opt.step()
            _label_step_state(opt, tracker)
            tracker.set_window(f"step {step}: zero_grad")
            model.zero_grad(set_to_none=True)
            del batches, num_items
    finally:
        regions.remove()
    return {"optimizer": type(opt).__module__ + "." + type(opt).__name__}


# --------------------------------------------------------------------------- one trace

@dataclass
class RawTrace:
    layers: int
    windows: dict  # window -> {"bytes": int, "categories": {cat: bytes}, "op": str, "region": str}
    window_order: list
    static: dict  # category -> bytes after setup (weights, LoRA, buffers)
    paged_bytes: int  # bitsandbytes paged state (managed memory, not on the allocator)
    host_bytes: int
    attn_implementation: str
    optimizer: str
    seconds: float
    scalar_calls: list
    device: str
    simulated_reserved: int = 0  # planner.allocsim over this trace: max_memory_reserved (0: not simulated)
    simulated_allocated: int = 0  # the same replay's max_memory_allocated
    simulated_required: int = 0  # the smallest allocator cap the replay runs under (0: not simulated)


def simulate_allocator(log: TraceLog, expandable: bool, budget: bool = False):
    """Replay the trace through planner.allocsim as a training process runs it: the model loaded, the
    allocator's cache emptied (the calibration harness, and `qfit run` after its fit probe), peaks reset,
    then the LoRA wrap and the step. Returns (the Allocator: peak_reserved, peak_allocated; and with
    budget, the smallest cap it runs under, else 0)."""
    from planner.allocsim import replay, smallest_budget

    skip = {s for s, c in log.category.items() if c in EXCLUDED}
    at = log.marks.get("loaded", 0)
    free = replay(log.sizes, log.events, expandable, skip, empty_cache_at=[at], reset_peak_at=at)
    need = smallest_budget(log.sizes, log.events, expandable, skip, empty_cache_at=[at], reset_peak_at=at) if budget else 0
    return free, need


def trace(config_fields: dict, spec: ModelSpec, lora: LoraSettings, train: TrainSettings, layers: int,
          device: CudaDevice | None = None, input_requires_grad: bool = False, static_only: bool = False,
          simulate: bool = False, simulate_budget: bool = False) -> RawTrace:
    """Build the model with `layers` decoder layers and trace two optimizer steps (see run_step);
    static_only: build it and stop (the weights and adapters, no step). simulate: replay the allocation
    log through the caching allocator (simulate_allocator) for peak reserved memory; simulate_budget: also
    bisect the smallest allocator cap it runs under (a dozen replays).

    input_requires_grad: make the embedding output require grad without checkpointing (transformers'
    enable_input_require_grads hook, which activation checkpointing installs and
    gradient_checkpointing_disable leaves in place on a peft-wrapped model)."""
    device = device or CudaDevice()
    t0 = time.perf_counter()
    targets = resolve_targets(spec, lora.targets)
    from planner.train import stack

    tracker = AllocTracker(device, stack.TORCH_DTYPES[train.compute_dtype])
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    from bitsandbytes import functional as bnbf

    saved_qmap = dict(bnbf.name2qmap)
    try:
        with fake_mode, tracker, cuda_semantics(), _quiet():
            # bitsandbytes builds its shared 8-bit map (used for the nested absmax) on first use; a 16-bit base
            # never quantizes, so it has none
            if train.method == "qlora":
                with _disable_current_modes():
                    dyn = bnbf.create_dynamic_map()
                bnbf.name2qmap["dynamic"] = fake_mode.from_tensor(dyn)
                tracker.track(bnbf.name2qmap["dynamic"], "quant_constants" if train.double_quant else "temporaries")
                if not train.double_quant:  # only quantize_blockwise (the nested absmax) creates it
                    del bnbf.name2qmap["dynamic"]
            built = build(config_fields, layers, lora, targets, train, tracker, input_requires_grad)
            static = _category_totals(tracker, alive_only=True)
            info = {"optimizer": ""}
            if not static_only:
                ws = tracker.transient([device.cublas_workspace_bytes] * device.cublas_handles, "cublas_workspace")
                info = run_step(built, train, spec.vocab_size, tracker, fake_mode)
                tracker.end_transient(ws)
            paged = _category_totals(tracker, alive_only=True).get("paged", 0)
            host = _category_totals(tracker, alive_only=True).get("host", 0)
            attn = built.attn_implementation
            del built
    except TraceError:
        raise
    except torch._subclasses.fake_tensor.UnsupportedOperatorException as exc:
        raise TraceError(f"the fake-tensor trace has no kernel for {exc.func}; exact mode cannot trace "
                         f"{config_fields.get('model_type')!r} (use the analytic plan)") from None
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise TraceError(f"exact mode cannot trace {config_fields.get('model_type')!r}: the fake-tensor step failed in "
                         f"{tracker.op or 'setup'} ({first}); use the analytic plan") from exc
    finally:
        bnbf.name2qmap.clear()
        bnbf.name2qmap.update(saved_qmap)
    windows = {} if static_only else _window_breakdowns(tracker)
    sim, need = (simulate_allocator(tracker.log, train.expandable_segments, simulate_budget)
                 if (simulate or simulate_budget) and not static_only else (None, 0))
    return RawTrace(layers=layers, windows=windows, window_order=list(tracker.log.window_order), static=static,
                    paged_bytes=paged, host_bytes=host, attn_implementation=attn, optimizer=info["optimizer"],
                    seconds=time.perf_counter() - t0, scalar_calls=tracker.scalar_calls, device=device.name,
                    simulated_reserved=sim.peak_reserved if sim else 0,
                    simulated_allocated=sim.peak_allocated if sim else 0, simulated_required=need)


@contextlib.contextmanager
def _quiet():
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")  # logs a traceback before re-raising
    fake_level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    from planner.train.stack import INT8_LOGGER

    int8_log = logging.getLogger(INT8_LOGGER)  # MatMul8bitLt's per-call fp16-cast warning
    int8_level = int8_log.level
    int8_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
            fake_log.setLevel(fake_level)
            int8_log.setLevel(int8_level)


def _category_totals(tracker: AllocTracker, alive_only: bool) -> dict:
    alive = set(tracker._ids.values())
    out: dict[str, int] = {}
    for serial in alive:
        cat = _classify(tracker.log, serial)
        out[cat] = out.get(cat, 0) + tracker.log.sizes[serial]
    return out


def _classify(log: TraceLog, serial: int) -> str:
    cat = log.category.get(serial)
    if cat:
        return cat
    stage, region, _op = log.born.get(serial, ("", "", ""))
    if region == "head":
        return "logits"
    if stage == "forward":
        return "saved_activations"
    if stage == "recompute":
        return "recomputed_activations"
    if stage == "backward":
        return "backward_temporaries"
    if stage == "optimizer":
        return "optimizer_temporaries"
    return "temporaries"


def _window_breakdowns(tracker: AllocTracker) -> dict:
    """Replay the alloc/free log once and read off what was alive at each window's peak."""
    log = tracker.log
    marks = sorted((w.event, name) for name, w in log.windows.items() if w.event >= 0)
    out = {}
    alive: dict[int, int] = {}
    mi = 0
    for idx, ev in enumerate(log.events):
        if ev >= 0:
            alive[ev] = log.sizes[ev]
        else:
            alive.pop(-ev - 1, None)
        while mi < len(marks) and marks[mi][0] == idx:
            name = marks[mi][1]
            cats: dict[str, int] = {}
            for serial, size in alive.items():
                cat = _classify(log, serial)
                cats[cat] = cats.get(cat, 0) + size
            w = log.windows[name]
            out[name] = {"bytes": w.bytes, "categories": cats, "op": w.op, "region": w.region}
            mi += 1
    return out
