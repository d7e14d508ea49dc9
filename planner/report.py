"""Rendering: the only place bytes become "x.xx GiB". Plain text via tabulate, and JSON documents."""

from __future__ import annotations

from tabulate import tabulate

from planner.memory import resolve_targets, trainable_params
from planner.search import SearchResult, next_larger_batch, smallest
from planner.specs import Coefficients, MemoryBreakdown, ModelSpec, Plan, settings_dict
from planner.units import GiB

SEP = "-" * 66


def gib_str(n_bytes: int, digits: int = 2) -> str:
    """12345678901 -> '11.50' (GiB, 2**30). Callers label the unit."""
    return f"{n_bytes / GiB:.{digits}f}"


def _params_str(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def component_labels(plan: Plan) -> dict[str, str]:
    m, t, lora = plan.model, plan.train, plan.lora
    ckpt = (f"{m.num_hidden_layers} checkpointed layer inputs" if t.gradient_checkpointing
            else f"{m.num_hidden_layers} layers, no checkpointing")
    return {
        "quantized_weights": f"4-bit base weights (NF4, {_params_str(m.quantized_param_count)} params)",
        "quant_constants": "quantization constants (" + ("double quant)" if t.double_quant else "fp32 absmax)"),
        "unquantized_weights": "unquantized weights (embeddings, lm_head, norms; fp32)",
        "lora_params": f"LoRA weights (fp32, {_params_str(trainable_params(m, lora))} params)",
        "lora_grads": "LoRA gradients (fp32)",
        "optimizer_state": f"optimizer state ({t.optim})",
        "saved_activations": f"saved activations ({ckpt})",
        "layer_working_set": ("recomputed layer + backward temporaries" if t.gradient_checkpointing
                              else "backward temporaries of one layer"),
        "logits": f"logits + cross-entropy (fp32, vocab {m.vocab_size:,})",
        "allocator_reserve": "allocator reserve (reserved - allocated)",
        "cuda_context": "CUDA context + kernels (outside the allocator)",
        "paged_optimizer_state": "paged optimizer state (CUDA managed memory)",
    }


def settings_line(plan: Plan) -> str:
    t, lora = plan.train, plan.lora
    targets = ",".join(lora.targets)
    return (f"micro-batch {t.batch_size} x accumulation {t.grad_accum} = effective batch {t.effective_batch} · "
            f"seq {t.seq_len} · LoRA r{lora.rank} ({targets}) · gradient checkpointing "
            f"{'on' if t.gradient_checkpointing else 'off'} · {t.optim} · {t.compute_dtype} · "
            f"expandable_segments {'on' if t.expandable_segments else 'off'}")


def breakdown_table(plan: Plan) -> str:
    mem = plan.memory
    comps = mem.components()
    labels = component_labels(plan)
    largest = max(MemoryBreakdown.ALLOCATED_FIELDS, key=lambda k: comps[k])
    rows = [[labels[k], gib_str(v), "<- largest term" if k == largest else ""] for k, v in comps.items()]
    rows.append([SEP[:50], "", ""])
    rows.append(["device used, unconstrained run (sum of the rows)", gib_str(mem.device_used_bytes), ""])
    rows.append(["  of which peak allocated / peak reserved",
                 f"{gib_str(mem.peak_allocated_bytes)} / {gib_str(mem.peak_reserved_bytes)}", ""])
    rows.append(["needs (smallest allocator budget + context + paged)", gib_str(mem.needs_bytes),
                 f"of {gib_str(plan.gpu.memory_bytes)} GiB (headroom {gib_str(plan.headroom_bytes)} GiB)"])
    return tabulate(rows, headers=[f"Memory at peak ({mem.peak_phase})", "GiB", ""], tablefmt="plain",
                    colalign=("left", "right", "left"), disable_numparse=True)


def _short(plan: Plan) -> str:
    t, lora = plan.train, plan.lora
    return (f"{t.batch_size}x{t.grad_accum} seq {t.seq_len} r{lora.rank} {','.join(lora.targets)} "
            f"ckpt {'on' if t.gradient_checkpointing else 'off'} {t.optim}")


def alternatives(result: SearchResult, best: Plan, n: int = 4) -> list[Plan]:
    """Fitting runners-up with different shapes (micro-batch, checkpointing, LoRA): the optimizer
    variants of one shape are not shown separately."""

    def shape(p: Plan):
        return (p.train.batch_size, p.train.gradient_checkpointing, p.train.seq_len, p.lora)

    out, seen = [], {shape(best)}
    for p in result.fitting:
        key = shape(p)
        if key not in seen:
            out.append(p)
            seen.add(key)
        if len(out) >= n:
            break
    return out


def _why(result: SearchResult, best: Plan, coeffs: Coefficients) -> list[str]:
    lines = []
    bigger = next_larger_batch(best, coeffs)
    t = best.train
    if bigger is not None and not bigger.fits:
        lines.append(f"micro-batch {bigger.train.batch_size} would need {gib_str(bigger.memory.needs_bytes)} GiB "
                     f"(capacity after the {coeffs.get('safety_margin_frac') * 100:.0f}% safety margin: "
                     f"{gib_str(best.capacity_bytes)} GiB).")
    elif t.batch_size == t.effective_batch:
        lines.append(f"the micro-batch is the whole effective batch ({t.effective_batch}); raise --effective-batch to go bigger.")
    if t.gradient_checkpointing:
        twin = [p for p in result.plans if p.train.batch_size == t.batch_size and not p.train.gradient_checkpointing
                and p.lora == best.lora and p.train.optim == t.optim and p.train.seq_len == t.seq_len]
        if twin and not twin[0].fits:
            lines.append(f"checkpointing is on: without it this micro-batch needs {gib_str(twin[0].memory.needs_bytes)} GiB.")
        elif twin:
            lines.append("checkpointing is on: with it a larger micro-batch fits, which is faster overall here.")
    comps = best.memory.components()
    largest = max(MemoryBreakdown.ALLOCATED_FIELDS, key=lambda k: comps[k])
    lines.append(f"largest term: {component_labels(best)[largest]}, {gib_str(comps[largest])} GiB.")
    return lines


def render_plan(result: SearchResult, model: ModelSpec, coeffs: Coefficients, gpu_title: str) -> str:
    """Human output of `qfit plan`."""
    best = result.best
    out = []
    any_plan = result.plans[0]
    dtype_note = "" if any_plan.gpu.bf16 else "; no bf16 -> fp16 compute"
    out.append(f"qfit plan: {model.display_name} ({_params_str(model.total_param_count)} params) on "
               f"{gpu_title} ({gib_str(any_plan.gpu.memory_bytes)} GiB{dtype_note})")
    out.append(f"calibration: {coeffs.description}")
    out += [f"note: {n}" for n in result.notes]
    out.append("")
    if best is None:
        return "\n".join(out + render_no_fit(result, model))
    speed = (f"est. {best.tokens_per_s:,.0f} tokens/s (roofline model calibrated on H200 runs; "
             f"scaled by this GPU's datasheet)" if best.tokens_per_s else "no speed estimate (no GPU speed facts)")
    out.append("Recommended  " + settings_line(best))
    out.append("             " + speed)
    out.append("")
    out.append(breakdown_table(best))
    out.append("")
    out += ["Why:  " + line if i == 0 else "      " + line for i, line in enumerate(_why(result, best, coeffs))]
    alts = alternatives(result, best)
    if alts:
        out.append("")
        rows = [[_short(p), gib_str(p.memory.needs_bytes), f"{p.tokens_per_s:,.0f}" if p.tokens_per_s else "-"] for p in alts]
        out.append(tabulate(rows, headers=["Alternatives that fit", "needs GiB", "est. tokens/s"], tablefmt="plain",
                            disable_numparse=True))
    rejected = [p for p in result.plans if not p.fits and p.lora == best.lora and p.train.seq_len == best.train.seq_len
                and p.tokens_per_s > best.tokens_per_s]
    if rejected:
        near = min(rejected, key=lambda p: p.memory.needs_bytes)
        over = near.memory.needs_bytes - near.capacity_bytes
        out.append("")
        out.append(f"Does not fit:  {_short(near)} needs {gib_str(near.memory.needs_bytes)} GiB "
                   f"({gib_str(over)} GiB over)")
    return "\n".join(out)


def render_no_fit(result: SearchResult, model: ModelSpec) -> list[str]:
    low = smallest(result.plans)
    comps = low.memory.components()
    largest = max(MemoryBreakdown.ALLOCATED_FIELDS, key=lambda k: comps[k])
    labels = component_labels(low)
    lines = ["does not fit.",
             f"  smallest configuration ({_short(low)}) needs {gib_str(low.memory.needs_bytes)} GiB; "
             f"the card has {gib_str(low.gpu.memory_bytes)} GiB ({gib_str(low.capacity_bytes)} usable).",
             f"  dominated by {labels[largest]} ({gib_str(comps[largest])} GiB)."]
    return lines


def plan_json(result: SearchResult, model: ModelSpec, coeffs: Coefficients) -> dict:
    """The stable `qfit plan --json` document (see README)."""
    best = result.best or smallest(result.plans)

    def plan_doc(p: Plan) -> dict:
        return {"settings": settings_dict(p.lora, p.train, resolve_targets(p.model, p.lora.targets)),
                "needs_bytes": p.memory.needs_bytes, "peak_reserved_bytes": p.memory.peak_reserved_bytes,
                "tokens_per_s": round(p.tokens_per_s, 1), "fits": p.fits}

    mem = best.memory
    return {
        "model": model.name,
        "gpu": best.gpu.name,
        "settings": settings_dict(best.lora, best.train, resolve_targets(model, best.lora.targets)),
        "params": {"total": model.total_param_count, "trainable": trainable_params(model, best.lora),
                   "quantized": model.quantized_param_count},
        "memory": {
            "components": mem.components(),
            "peak_phase": mem.peak_phase,
            "peak_allocated_bytes": mem.peak_allocated_bytes,
            "peak_reserved_bytes": mem.peak_reserved_bytes,
            "device_used_bytes": mem.device_used_bytes,
            "required_bytes": mem.required_bytes,
            "needs_bytes": mem.needs_bytes,
            "gpu_capacity_bytes": best.gpu.memory_bytes,
            "usable_bytes": best.capacity_bytes,
        },
        "fits": result.best is not None,
        "tokens_per_s": round(best.tokens_per_s, 1),
        "calibration": coeffs.name,
        "notes": list(result.notes),
        "alternatives": [plan_doc(p) for p in (alternatives(result, best) if result.best else [])],
    }
