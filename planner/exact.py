"""Exact mode: peak GPU memory of one LoRA training step (qlora, lora-8bit, lora), traced rather than modelled.

`trace_step()` builds the real stack (transformers + bitsandbytes Linear4bit or Linear8bitLt, or a 16-bit
base + peft LoRA + the Trainer's step) on fake tensors and counts every storage the GPU would hold, rounded to the CUDA
caching allocator's 512-byte blocks (planner/train/exact.py does the tracing). A 7B-shaped model
is traced with its decoder cut to 2 and 3 layers; each phase of the step (forward, loss, backward
of the last layer, optimizer step, ...) grows linearly with depth, so each phase's peak and its
breakdown are extrapolated to the full depth and the step's peak is their max.

Against 31 measured H200 runs (Mistral-7B, Llama-3.1-8B; benchmarks/bench_exact.py) the traced peak
allocated is within 36 KB of the measurement. Not traced: Mixtral (torch's fake kernel for
grouped_mm refuses the fp32 experts), fp16's GradScaler scalars, reserved memory (allocator slack)
and what lives outside the allocator (CUDA context; paged optimizer state is reported apart). lora-8bit
traces LLM.int8 at outlier threshold 0 and adds the outlier columns it keeps from the memory model
(int8_outlier_bytes): their number depends on the values, which fake tensors do not have.

This module only resolves the model and extrapolates: torch & co. are imported inside functions.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from planner.errors import QfitError
from planner.exact_types import CudaDevice
from planner.specs import LoraSettings, ModelSpec, TrainSettings
from planner.units import CUBLAS_WORKSPACE_BYTES, KiB

TRACE_DEPTHS = (2, 3)  # decoder layers traced before extrapolating to the full depth

# The traced categories, in report order, and the analytic MemoryBreakdown field each one sits in.
CATEGORY_TO_FIELD = {
    "quantized_weights": "quantized_weights",
    "quant_constants": "quant_constants",
    "unquantized_weights": "unquantized_weights",
    "buffers": None,  # rotary inv_freq tables: not an analytic term
    "lora_params": "lora_params",
    "lora_grads": "lora_grads",
    "optimizer_state": "optimizer_state",
    "batch": "saved_activations",  # input_ids, labels, attention_mask of every micro-batch of the step
    "saved_activations": "saved_activations",
    "recomputed_activations": "layer_working_set",
    "backward_temporaries": "layer_working_set",
    "kernel_workspace": "layer_working_set",  # bitsandbytes dequantized weight, flash-attention backward buffers
    "optimizer_temporaries": "layer_working_set",
    "logits": "logits",
    "temporaries": None,  # loss scalars and the like
    "cublas_workspace": None,  # cuBLAS workspaces on the allocator: not an analytic term
    "int8_outlier_columns": "saved_activations",  # lora-8bit: subA, added from the memory model (int8_outlier_bytes)
}
CATEGORY_LABELS = {
    "quantized_weights": "4-bit base weights (packed uint8)",
    "quant_constants": "quantization constants (absmax, codes, offsets)",
    "unquantized_weights": "unquantized weights (fp32 after k-bit prep)",
    "buffers": "buffers (rotary tables)",
    "lora_params": "LoRA weights (fp32)",
    "lora_grads": "LoRA gradients (fp32)",
    "optimizer_state": "optimizer state on the allocator",
    "batch": "input batches (int64 ids, labels, mask)",
    "saved_activations": "saved activations (forward)",
    "recomputed_activations": "recomputed activations (checkpointing)",
    "backward_temporaries": "backward gradients and temporaries",
    "kernel_workspace": "kernel workspaces (dequant, flash-attn bwd)",
    "optimizer_temporaries": "optimizer-step temporaries",
    "logits": "logits chain (lm_head, fp32 upcast, cross-entropy)",
    "temporaries": "other temporaries (loss scalars)",
    "cublas_workspace": "cuBLAS workspaces (forward and backward handle)",
    "int8_outlier_columns": "int8 outlier columns (subA; analytic: share x input width, not traced)",
}
STATIC_CATEGORIES = ("quantized_weights", "quant_constants", "unquantized_weights", "buffers", "lora_params")


def device_for(gpu) -> CudaDevice:
    """A GpuSpec -> the CudaDevice to trace for (compute capability from the profile; SM count 132
    when unknown, which only matters below ~64 tokens per micro-batch)."""
    try:
        major, minor = (int(x) for x in str(gpu.compute_capability).split(".")[:2])
    except ValueError:
        return CudaDevice(name=gpu.name)
    workspace = CUBLAS_WORKSPACE_BYTES if major >= 9 else 4096 * KiB * 2 + 16 * KiB * 8
    return CudaDevice(name=gpu.name, major=major, minor=minor, cublas_workspace_bytes=workspace)


REQUIRED_CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True, slots=True)
class ExactResult:
    """A traced training step. Every byte count is an int; GiB appear only in the report."""

    model: str
    num_hidden_layers: int
    layers_traced: tuple[int, ...]
    extrapolated: bool
    peak_allocated_bytes: int  # on torch's CUDA allocator, 512-byte blocks, cuBLAS workspaces included
    peak_phase: str  # the window of the step where the peak falls
    peak_op: str  # the op allocating at the peak (in the deepest trace)
    categories: dict = field(default_factory=dict)  # what is alive at the peak, by category
    static: dict = field(default_factory=dict)  # weights and adapters once the model is built
    phase_peaks: dict = field(default_factory=dict)  # every window's own peak
    paged_optimizer_bytes: int = 0  # bitsandbytes paged state: CUDA managed memory, not on the allocator
    attn_implementation: str = ""
    optimizer: str = ""
    device: str = ""
    trace_seconds: float = 0.0
    notes: tuple[str, ...] = ()
    # planner.allocsim replaying the whole-depth trace through the CUDA caching allocator (0 when the
    # trace was extrapolated from a few layers: fragmentation does not extrapolate)
    simulated_reserved_bytes: int = 0
    simulated_required_bytes: int = 0  # the smallest allocator cap the simulated step runs under (0: not simulated)
    expandable_segments: bool = True

    @property
    def tensor_peak_bytes(self) -> int:
        """The peak without the cuBLAS workspaces (what the analytic terms describe)."""
        return self.peak_allocated_bytes - self.categories.get("cublas_workspace", 0)

    def as_fields(self) -> dict[str, int]:
        """The categories summed into planner.specs.MemoryBreakdown's allocated fields (+ 'other')."""
        out: dict[str, int] = {}
        for cat, n in self.categories.items():
            key = CATEGORY_TO_FIELD.get(cat) or "other"
            out[key] = out.get(key, 0) + n
        return out


# --------------------------------------------------------------------------- resolving the model

def resolve(model) -> tuple[ModelSpec, dict]:
    """A profile name, a .toml/config.json path, a ModelSpec, or a config dict -> (spec, HF config fields).

    Raises ValueError with a one-line message for anything a user can get wrong."""
    from planner.profiles import PROFILES_DIR, _load_toml, load_model

    if isinstance(model, ModelSpec):
        path = PROFILES_DIR / "models" / f"{model.name}.toml"
        if path.is_file():
            cfg = dict(_load_toml(path)["config"])
        else:
            cfg = _config_from_spec(model)
        cfg["num_hidden_layers"] = model.num_hidden_layers
        return model, cfg
    if isinstance(model, dict):
        cfg = dict(model)
        _check_config(cfg, "config")
        return _spec_from_config(cfg, "config"), cfg
    name = str(model)
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if name.endswith(".json") or path.name == "config.json":
        if not path.is_file():
            raise QfitError(f"no such file: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise QfitError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(raw, dict):
            raise QfitError(f"{path} must hold a JSON object")
        if "text_config" in raw and "hidden_size" not in raw:
            raw = {**raw["text_config"], "model_type": raw["text_config"].get("model_type", raw.get("model_type"))}
        _check_config(raw, str(path))
        return _spec_from_config(raw, str(path)), raw
    spec = load_model(name)  # ProfileError (a ValueError) for unknown names and bad files
    p = path if name.endswith(".toml") else PROFILES_DIR / "models" / f"{spec.name}.toml"
    cfg = dict(_load_toml(p)["config"]) if p.is_file() else _config_from_spec(spec)
    return spec, cfg


def _check_config(cfg: dict, origin: str) -> None:
    if not cfg.get("model_type"):
        raise QfitError(f"{origin}: missing field 'model_type'; add it (e.g. \"llama\")")
    if cfg.get("auto_map"):
        raise QfitError(f"{origin}: model_type {cfg['model_type']!r} needs trust_remote_code (its modeling code "
                         "lives in the model repo); exact mode traces only architectures built into transformers")
    for key in REQUIRED_CONFIG_FIELDS:
        if key not in cfg:
            raise QfitError(f"{origin}: missing field '{key}'; exact mode builds the model from the config, add it")
        if not isinstance(cfg[key], int) or cfg[key] <= 0:
            raise QfitError(f"{origin}: field '{key}' must be a positive integer, got {cfg[key]!r}")
    _check_transformers_knows(cfg["model_type"], origin)


def _check_transformers_knows(model_type: str, origin: str) -> None:
    from transformers import CONFIG_MAPPING, __version__

    if model_type not in CONFIG_MAPPING:
        raise QfitError(f"{origin}: transformers {__version__} does not know model_type {model_type!r}; "
                         "upgrade transformers, or use the analytic plan (without --exact)")


def _spec_from_config(cfg: dict, origin: str) -> ModelSpec:
    """qfit's own layout for the families it knows; otherwise the inventory transformers builds."""
    from planner.architectures import KNOWN_MODEL_TYPES, layout
    from planner.introspect import CONFIG_FIELDS, IntrospectionError, build_meta_model, inventory
    from planner.profiles import model_from_dict

    name = cfg.get("_name_or_path") or Path(origin).parent.name or "model"
    kept = {k: cfg[k] for k in CONFIG_FIELDS if k in cfg}
    if cfg["model_type"] in KNOWN_MODEL_TYPES:
        inv = layout(dict(kept))
    else:
        try:
            inv = inventory(build_meta_model(kept))
        except IntrospectionError as exc:
            raise QfitError(f"{origin}: {exc}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise QfitError(f"{origin}: transformers cannot build this config as a causal LM "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    return model_from_dict({"name": name, "display_name": name, "source": origin, "config": kept, "inventory": inv}, origin)


def _config_from_spec(spec: ModelSpec) -> dict:
    """HF config fields recoverable from a spec (for specs that did not come from a profile)."""
    cfg = {"model_type": spec.model_type, "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
           "num_hidden_layers": spec.num_hidden_layers, "num_attention_heads": spec.num_attention_heads,
           "num_key_value_heads": spec.num_key_value_heads, "head_dim": spec.head_dim, "vocab_size": spec.vocab_size,
           "max_position_embeddings": spec.max_position_embeddings, "tie_word_embeddings": spec.tie_word_embeddings,
           "hidden_act": spec.hidden_act}
    for key in ("num_local_experts", "num_experts_per_tok", "final_logit_softcapping", "attn_logit_softcapping",
                "sliding_window"):
        value = getattr(spec, key)
        if value:
            cfg[key] = value
    return cfg


# --------------------------------------------------------------------------- tracing

def trace_step(model, lora: LoraSettings, train: TrainSettings, layers: int | None = None,
               device=None, input_requires_grad: bool = False, budget: bool = False) -> ExactResult:
    """Trace one training step as train.method holds the base (two optimizer steps of the Trainer, see
    planner/train/exact.py; lora-8bit's outlier columns are added per window, see int8_outlier_bytes).

    layers=None: trace at 2 and 3 decoder layers and extrapolate each phase linearly to the model's
    depth (a model of at most 3 layers is traced whole). layers=n: trace exactly n layers, and replay
    the allocation log through the caching allocator (planner.allocsim) for simulated peak reserved
    memory (a whole-depth trace only: allocator fragmentation does not extrapolate); budget: also
    bisect the smallest allocator cap the simulated step runs under (a dozen more replays).
    device: a CudaDevice (default: H200, sm90), or a GpuSpec (see device_for).
    input_requires_grad: without checkpointing, make the embedding output require grad anyway, as in a
    process where an earlier checkpointed run left transformers' enable_input_require_grads hook on
    the (reused) model: the calibration harness does this, a fresh `qfit run` does not.
    Raises ValueError (one line, says what to do) for models or settings that cannot be traced.
    """
    spec, cfg = resolve(model)
    _check_transformers_knows(cfg.get("model_type", ""), spec.name)
    if device is not None and not isinstance(device, CudaDevice):
        device = device_for(device)
    from planner.memory import resolve_targets

    resolve_targets(spec, lora.targets)  # ValueError naming a bad --targets
    from planner.train import exact as heavy

    t0 = time.perf_counter()
    depth = spec.num_hidden_layers
    try:
        if layers is not None or depth <= max(TRACE_DEPTHS):
            n = layers if layers is not None else depth
            raw = heavy.trace(cfg, dataclasses.replace(spec, num_hidden_layers=n), lora, train, n, device,
                              input_requires_grad, simulate=True, simulate_budget=budget)
            return _result(spec, [raw], n, time.perf_counter() - t0, train)
        raws = [heavy.trace(cfg, dataclasses.replace(spec, num_hidden_layers=n), lora, train, n, device,
                            input_requires_grad) for n in TRACE_DEPTHS]
    except heavy.TraceError as exc:
        raise QfitError(str(exc)) from None
    return _result(spec, raws, depth, time.perf_counter() - t0, train)


def static_bytes(model, lora: LoraSettings, train: TrainSettings, layers: int | None = None) -> dict[str, int]:
    """Bytes per static category (quantized_weights, quant_constants, unquantized_weights, buffers,
    lora_params) of the model as built, 4-bit and LoRA-wrapped, without running a step."""
    spec, cfg = resolve(model)
    n = layers if layers is not None else spec.num_hidden_layers
    from planner.memory import resolve_targets

    resolve_targets(spec, lora.targets)
    from planner.train import exact as heavy

    try:
        raw = heavy.trace(cfg, dataclasses.replace(spec, num_hidden_layers=n), lora, train, n, static_only=True)
    except heavy.TraceError as exc:
        raise QfitError(str(exc)) from None
    return {k: v for k, v in raw.static.items() if k in STATIC_CATEGORIES}


def int8_outlier_bytes(spec: ModelSpec, train: TrainSettings, window: str, depth: int) -> int:
    """lora-8bit: the outlier columns MatMul8bitLt keeps for backward (subA), alive in a window of the step.

    The trace runs LLM.int8 at threshold 0.0 (planner.exact_types.INT8_TRACE_THRESHOLD), where bitsandbytes keeps
    no subA; at the real 6.0 every int8 linear keeps `subA = A[:, outlier_cols].contiguous()` from its forward to
    its backward (`ctx.tensors = (CAt, subA, A)`, bitsandbytes autograd/_functions.py; int8_mixed_scaled_mm in
    backends/default/ops.py), a number of columns set by the values. Per layer and micro-batch this is the memory
    model's term, tokens x planner.memory.int8_outlier_bytes_per_token (train.int8_outlier_share, default
    DEFAULT_INT8_OUTLIER_SHARE). One micro-batch's layers hold it at a time, at most: all `depth` layers through the
    forward (whose peak is at the last layer), the loss and the last layer's backward; the middle layers' backward
    starts with depth - 1 of them, the first layer's with its own. A checkpointed layer's recompute runs its
    MatMul8bitLt forwards again, whose contexts keep a second subA for that layer while its backward runs
    (checkpointed: all but the last train.uncheckpointed_layers, planner.train.stack.uncheckpoint_last_layers)."""
    from planner.memory import int8_outlier_bytes_per_token

    if train.method != "lora-8bit" or "micro-batch" not in window:
        return 0
    checkpointed = depth - train.uncheckpointed_layers if train.gradient_checkpointing else 0
    if window.endswith("backward, first layer"):
        layers = 1 + (checkpointed >= 1)
    elif window.endswith("backward, middle layers"):
        layers = depth - 1 + (checkpointed >= 2)
    elif window.endswith("backward, last layer"):
        layers = depth + (checkpointed == depth)
    else:
        layers = depth
    return layers * train.tokens_per_micro_batch * int8_outlier_bytes_per_token(spec, train)


def _step_windows(raw) -> dict:
    return {k: v for k, v in raw.windows.items() if k != "setup"}


def _linear(at_a: int, at_b: int, a: int, b: int, depth: int) -> int:
    """The value at `depth` of the line through (a, at_a) and (b, at_b); exact in integers for b = a + 1."""
    return at_a + (at_b - at_a) * (depth - a) // (b - a)


def _result(spec: ModelSpec, raws: list, depth: int, seconds: float, train: TrainSettings) -> ExactResult:
    """One trace: read it off. Two traces (depths a < b): extrapolate every window both have, and its
    breakdown, to `depth`; the step's peak is the largest extrapolated window."""
    last = raws[-1]
    notes = []
    if len(raws) == 1:
        windows = {k: (v["bytes"], dict(v["categories"])) for k, v in _step_windows(last).items()}
        static, paged = dict(last.static), last.paged_bytes
    else:
        ra, rb = raws
        a, b = ra.layers, rb.layers
        wa, wb = _step_windows(ra), _step_windows(rb)
        windows = {}
        for name, vb in wb.items():
            va = wa.get(name)
            if va is None:  # "backward, middle layers" exists from 3 layers on
                continue
            cats = {c: _linear(va["categories"].get(c, 0), vb["categories"].get(c, 0), a, b, depth)
                    for c in set(va["categories"]) | set(vb["categories"])}
            windows[name] = (_linear(va["bytes"], vb["bytes"], a, b, depth), cats)
        deeper_only = [k for k in wb if k not in wa and wb[k]["bytes"] > max(wb[n]["bytes"] for n in wa if n in wb)]
        if deeper_only:
            notes.append(f"at {b} layers the window(s) {', '.join(deeper_only)} peaked above every shared window; "
                         "they are not extrapolated, trace the full depth (layers=...) to be sure")
        static = {c: _linear(ra.static.get(c, 0), rb.static.get(c, 0), a, b, depth) for c in set(ra.static) | set(rb.static)}
        paged = _linear(ra.paged_bytes, rb.paged_bytes, a, b, depth)
    for name, (n_bytes, cats) in windows.items():  # lora-8bit: the outlier columns the trace cannot size
        extra = int8_outlier_bytes(spec, train, name, depth)
        if extra:
            windows[name] = (n_bytes + extra, {**cats, "int8_outlier_columns": extra})
    ops = {k: v["op"] for k, v in _step_windows(last).items()}
    peak_name = max(windows, key=lambda k: windows[k][0])
    peak, cats = windows[peak_name]
    on_allocator = {k: v for k, v in cats.items() if k not in ("host", "paged") and v}
    static = {k: v for k, v in static.items() if k in STATIC_CATEGORIES}
    outliers = cats.get("int8_outlier_columns", 0)
    if train.method == "lora-8bit":
        notes.append(f"LLM.int8 traced at outlier threshold 0; its outlier columns (subA, {outliers:,} bytes at the peak) "
                     "are the memory model's int8_outlier_bytes_per_token, added per window (and to the simulated "
                     "reserved peak and budget), not traced")
    if last.scalar_calls:
        notes.append(f"{len(last.scalar_calls)} .item()/bool() calls on fake tensors answered without data (AdamW step counts, the attention-mask check; memory does not depend on them)")
    return ExactResult(
        model=spec.name, num_hidden_layers=depth, layers_traced=tuple(r.layers for r in raws),
        extrapolated=len(raws) > 1, peak_allocated_bytes=int(peak), peak_phase=peak_name, peak_op=ops[peak_name],
        categories=on_allocator, static=static, phase_peaks={k: int(v[0]) for k, v in windows.items()},
        paged_optimizer_bytes=int(paged), attn_implementation=last.attn_implementation, optimizer=last.optimizer,
        device=last.device, trace_seconds=round(seconds, 2), notes=tuple(notes),
        simulated_reserved_bytes=int(last.simulated_reserved) + outliers if len(raws) == 1 and last.simulated_reserved else 0,
        simulated_required_bytes=int(last.simulated_required) + outliers if len(raws) == 1 and last.simulated_required else 0,
        expandable_segments=train.expandable_segments)
