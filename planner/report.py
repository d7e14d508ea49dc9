"""Rendering: the only place bytes become "x.xx GiB". Plain text via tabulate, and JSON documents."""

from __future__ import annotations

from dataclasses import replace

from tabulate import tabulate

from planner.memory import quant_constants_bytes, quantized_weights_bytes, resolve_targets, trainable_params
from planner.multigpu import multigpu_calibrated
from planner.search import SearchResult, next_larger_batch, smallest
from planner.specs import Coefficients, MemoryBreakdown, ModelSpec, Plan, settings_dict
from planner.units import GiB

SEP = "-" * 66


def gib_str(n_bytes: int, digits: int = 2) -> str:
    """12345678901 -> '11.50' (GiB, 2**30). Callers label the unit."""
    return f"{n_bytes / GiB:.{digits}f}"


def _params_str(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def ckpt_str(plan: Plan, short: bool = False) -> str:
    """'on', 'off', or partial: 'on for 28 of 32 layers' ('on 28/32' when short)."""
    t, layers = plan.train, plan.model.num_hidden_layers
    k = t.checkpointed_layers(layers)
    if not t.gradient_checkpointing or k == 0:
        return "off"
    if k == layers:
        return "on"
    return f"on {k}/{layers}" if short else f"on for {k} of {layers} layers"


def component_labels(plan: Plan) -> dict[str, str]:
    m, t, lora = plan.model, plan.train, plan.lora
    k = t.checkpointed_layers(m.num_hidden_layers)
    if k == m.num_hidden_layers:
        ckpt = f"{m.num_hidden_layers} checkpointed layer inputs"
    elif k:
        ckpt = f"{k} checkpointed layer inputs + {m.num_hidden_layers - k} whole layers"
    else:
        ckpt = f"{m.num_hidden_layers} layers, no checkpointing"
    recompute = k == m.num_hidden_layers or (k and plan.memory.peak_phase == "backward, last checkpointed layer")
    return {
        "quantized_weights": f"4-bit base weights (NF4, {_params_str(m.quantized_param_count)} params)",
        "quant_constants": "quantization constants (" + ("double quant)" if t.double_quant else "fp32 absmax)"),
        "unquantized_weights": "unquantized weights (embeddings, lm_head, norms; fp32)",
        "lora_params": f"LoRA weights (fp32, {_params_str(trainable_params(m, lora))} params)",
        "lora_grads": "LoRA gradients (fp32)",
        "optimizer_state": f"optimizer state ({t.optim})",
        "saved_activations": f"saved activations ({ckpt})",
        "layer_working_set": ("recomputed layer + backward temporaries" if recompute
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
            f"{ckpt_str(plan)} · {t.optim} · {t.compute_dtype} · "
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
            f"ckpt {ckpt_str(plan, short=True)} {t.optim}")


def alternatives(result: SearchResult, best: Plan, n: int = 4) -> list[Plan]:
    """Fitting runners-up with different shapes (micro-batch, checkpointing, LoRA): the optimizer
    variants of one shape are not shown separately."""

    def shape(p: Plan):
        return (p.train.batch_size, p.train.gradient_checkpointing, p.train.uncheckpointed_layers, p.train.seq_len, p.lora)

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
    k, layers = t.checkpointed_layers(best.model.num_hidden_layers), best.model.num_hidden_layers
    if t.gradient_checkpointing and 0 < k < layers:
        full = [p for p in result.plans if p.train == replace(t, uncheckpointed_layers=0) and p.lora == best.lora]
        gain = f" (est. {best.tokens_per_s / full[0].tokens_per_s - 1:+.0%} tokens/s)" if full and full[0].tokens_per_s else ""
        lines.append(f"the last {layers - k} of {layers} layers are not checkpointed: they keep their activations "
                     f"in memory that would otherwise stay unused and skip their recompute{gain}.")
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


# --------------------------------------------------------------------------- multi-GPU (qfit plan --num-gpus N)

STRATEGY_TITLES = {"ddp": "DDP", "fsdp": "FSDP2 full shard"}
# "rank0_cpu" never reaches a plan: planner.multigpu refuses it with the measurement (RANK0_CPU_MEASURED)
LOADING_TEXT = {"full": "every rank loads the whole 4-bit model, and FSDP's wrap holds it beside the new shards (measured)"}


def _nccl_label(plan) -> str:
    measured = any("NCCL buffers measured" in n for n in plan.memory.notes)
    return ("NCCL buffers + process group (measured on 2 x H200; outside the allocator)" if measured
            else "NCCL buffers (assumed, not measured; outside the allocator)")


def multi_component_labels(plan) -> dict[str, str]:
    """Row labels for a planner.multigpu.MultiPlan, in its memory object's order."""
    labels = component_labels(plan)
    if plan.strategy == "ddp":
        labels.update(grad_buckets="DDP gradient buckets (one more fp32 copy of the LoRA gradients)",
                      nccl_buffer=_nccl_label(plan))
        return labels
    m, t, mem = plan.model, plan.train, plan.memory
    where = ", offloaded to CPU memory" if mem.cpu_offload else ""

    def shard(text: str) -> str:
        return f"{text}, 1/{plan.n} shard{where}"

    return {
        **labels,
        "quantized_weights": shard(f"4-bit base weights (NF4, {_params_str(m.quantized_param_count)} params)"),
        "quant_constants": shard(labels["quant_constants"]),
        "unquantized_weights": shard(f"unquantized weights (embeddings, lm_head, norms; {t.compute_dtype})"),
        "gathered_layers": "gathered decoder layers (2: the current one + the prefetched next)",
        "gathered_root": f"gathered root unit (embeddings, lm_head, final norm; {t.compute_dtype})",
        "lora_params": shard(f"LoRA weights (fp32, {_params_str(trainable_params(m, plan.lora))} params)"),
        "lora_grads": shard("LoRA gradients (fp32)"),
        "optimizer_state": shard(f"optimizer state ({t.optim})"),
        "logits": f"logits + cross-entropy (fp32, vocab {m.vocab_size:,}; no lm_head copy)",
        "nccl_buffer": _nccl_label(plan),
        "calibration_margin": "FSDP margin (worst measured per-rank under-prediction on 2 x H200)",
    }


def multi_components(plan) -> dict[str, int]:
    """The per-GPU rows of a MultiPlan, bytes: FSDP's own terms, or DDP's single-GPU terms + buckets + NCCL."""
    mem = plan.memory
    if plan.strategy == "ddp":
        return {**mem.single.components(), "grad_buckets": mem.grad_buckets, "nccl_buffer": mem.nccl_buffer}
    return mem.components()


def _allocated_fields(plan) -> tuple[str, ...]:
    return MemoryBreakdown.ALLOCATED_FIELDS if plan.strategy == "ddp" else plan.memory.ALLOCATED_FIELDS


def _largest(plan) -> str:
    comps = multi_components(plan)
    return max(_allocated_fields(plan), key=lambda k: comps[k])


def multi_breakdown_table(plan) -> str:
    mem, comps, labels = plan.memory, multi_components(plan), multi_component_labels(plan)
    largest = _largest(plan)
    rows = [[labels[k], gib_str(v), "<- largest term" if k == largest else ""] for k, v in comps.items()]
    rows.append([SEP[:50], "", ""])
    capacity = f"of {gib_str(plan.gpu.memory_bytes)} GiB (headroom {gib_str(plan.gpu.memory_bytes - mem.needs_bytes)} GiB)"
    if plan.strategy == "ddp":
        title = f"Memory per GPU at peak ({mem.single.peak_phase})"
        rows.append(["device used, unconstrained run (sum of the rows)", gib_str(sum(comps.values())), ""])
        rows.append(["needs (one-GPU needs + buckets + NCCL)", gib_str(mem.needs_bytes), capacity])
    else:
        title = "Memory per GPU, training phase"
        load = f"whole 4-bit model + LoRA, and their 1/{plan.n} shards at the wrap"
        rows.append(["device used in training (sum of the rows)", gib_str(sum(comps.values())), ""])
        rows.append([f"load phase needs ({load})", gib_str(mem.load_needs_bytes), ""])
        rows.append(["training phase needs (smallest budget + context + NCCL)", gib_str(mem.training_needs_bytes), ""])
        rows.append([f"needs per GPU (max of the two: {mem.peak_phase} phase)", gib_str(mem.needs_bytes), capacity])
    return tabulate(rows, headers=[title, "GiB", ""], tablefmt="plain", colalign=("left", "right", "left"),
                    disable_numparse=True)


def multi_settings_lines(plan) -> list[str]:
    t, lora = plan.train, plan.lora
    return [f"per rank: micro-batch {t.batch_size} x accumulation {t.grad_accum} · seq {t.seq_len} · "
            f"LoRA r{lora.rank} ({','.join(lora.targets)}) · gradient checkpointing "
            f"{'on' if t.gradient_checkpointing else 'off'} · {t.optim} · {t.compute_dtype} · "
            f"expandable_segments {'on' if t.expandable_segments else 'off'}",
            f"global batch {plan.n} GPUs x {t.batch_size} x {t.grad_accum} = {plan.global_batch} sequences per optimizer step"]


def strategy_reason(choice) -> str:
    """One line: why this strategy (choice is the CLI's MultiChoice)."""
    best = choice.plans[0]
    if choice.strategy == "ddp":
        if choice.asked == "ddp":
            return "DDP (--strategy ddp): every GPU holds the whole 4-bit model and runs its own micro-batch"
        return ("DDP: the whole 4-bit model fits on each GPU, so no per-layer all-gather is needed "
                "(faster than FSDP)")
    if choice.asked == "fsdp":
        return f"FSDP (--strategy fsdp): the model is sharded {best.n} ways, each layer gathered when it runs"
    if choice.ddp_min_needs_bytes is None:
        return "FSDP: --cpu-offload needs it (DDP keeps the whole model on every GPU)"
    return (f"FSDP: DDP does not fit (every GPU would hold the whole 4-bit model: its smallest configuration "
            f"needs {gib_str(choice.ddp_min_needs_bytes)} GiB of {gib_str(best.capacity_bytes)} usable)")


def _fsdp_line(choice) -> str:
    offload = "CPU offload " + ("on" if choice.cpu_offload else "off")
    if choice.fsdp_min_needs_bytes is not None:
        offload += f" (without it the smallest configuration needs {gib_str(choice.fsdp_min_needs_bytes)} GiB per GPU)"
    return f"FSDP2 · {offload}\nloading {choice.loading}: {LOADING_TEXT[choice.loading]}"


def _multi_notes(plan) -> tuple[list[str], list[str]]:
    """(request notes, memory notes), without repeats: the memory object carries the estimate and optimizer notes."""
    mem_notes = list(dict.fromkeys(plan.memory.notes))
    return [n for n in dict.fromkeys(plan.notes) if n not in mem_notes], mem_notes


def render_multi_header(choice, model: ModelSpec, coeffs: Coefficients, gpu_title: str) -> list[str]:
    plan = choice.plans[0]
    dtype_note = "" if plan.gpu.bf16 else "; no bf16 -> fp16 compute"
    out = [f"qfit plan: {model.display_name} ({_params_str(model.total_param_count)} params) on {plan.n} x "
           f"{gpu_title} ({gib_str(plan.gpu.memory_bytes)} GiB each{dtype_note}) · {STRATEGY_TITLES[choice.strategy]}",
           f"calibration: {coeffs.description}"]
    out += [f"note: {n}" for n in _multi_notes(plan)[0]]
    out += ["", "Strategy     " + strategy_reason(choice)]
    return out


def render_multi_plan(choice, model: ModelSpec, coeffs: Coefficients, gpu_title: str) -> str:
    """Human output of `qfit plan --num-gpus N` when a plan fits (choice.best)."""
    best = choice.best
    out = render_multi_header(choice, model, coeffs, gpu_title)
    lines = multi_settings_lines(best)
    if choice.strategy == "fsdp":
        lines += _fsdp_line(choice).split("\n")
    lines.append(f"est. {best.tokens_per_s_per_gpu:,.0f} tokens/s per GPU (one rank's roofline; communication "
                 + ("and CPU offload not modelled)" if choice.cpu_offload else "not modelled)")
                 if best.tokens_per_s_per_gpu else "no speed estimate (no GPU speed facts)")
    out += ["Recommended  " + lines[0]] + ["             " + line for line in lines[1:]]
    out += ["", multi_breakdown_table(best), ""]
    comps, labels, largest = multi_components(best), multi_component_labels(best), _largest(best)
    why = [f"largest term: {labels[largest]}, {gib_str(comps[largest])} GiB."]
    if choice.strategy == "fsdp" and best.memory.peak_phase == "load":
        why.append(f"the load phase sets the peak ({gib_str(best.memory.load_needs_bytes)} GiB per GPU, training "
                   f"{gib_str(best.memory.training_needs_bytes)} GiB)"
                   + ": every rank first loads the whole 4-bit model (measured; transformers loads a quantized "
                   "checkpoint whole on each rank) and FSDP's wrap holds it beside the new shards.")
    out += ["Why:  " + line if i == 0 else "      " + line for i, line in enumerate(why)]
    alts = multi_alternatives(choice.plans, best)
    if alts:
        rows = [[_short(p), gib_str(p.memory.needs_bytes), f"{p.tokens_per_s_per_gpu:,.0f}" if p.tokens_per_s_per_gpu else "-"]
                for p in alts]
        out += ["", tabulate(rows, headers=["Alternatives that fit (per rank)", "needs GiB per GPU", "est. tokens/s per GPU"],
                             tablefmt="plain", disable_numparse=True)]
    out.append("")
    out += [f"note: {n}" for n in _multi_notes(best)[1]]
    return "\n".join(out)


def multi_alternatives(plans, best, n: int = 4) -> list:
    """Fitting runners-up with other shapes (micro-batch, checkpointing, sequence, LoRA)."""

    def shape(p):
        return (p.train.batch_size, p.train.gradient_checkpointing, p.train.seq_len, p.lora)

    out, seen = [], {shape(best)}
    for p in plans:
        if p.fits and shape(p) not in seen:
            out.append(p)
            seen.add(shape(p))
        if len(out) >= n:
            break
    return out


def smallest_multi(plans):
    """The configuration that needs least per GPU; among equal needs (a load phase that sets the peak does
    not depend on the batch) the one whose training phase needs least."""
    return min(plans, key=lambda p: (p.memory.needs_bytes, getattr(p.memory, "training_needs_bytes", 0)))


def render_multi_no_fit(choice) -> list[str]:
    """`does not fit.` and the smallest configuration's per-GPU memory."""
    low = smallest_multi(choice.plans)
    comps, labels, largest = multi_components(low), multi_component_labels(low), _largest(low)
    lines = ["does not fit.",
             f"  smallest configuration ({_short(low)}) needs {gib_str(low.memory.needs_bytes)} GiB per GPU; "
             f"each card has {gib_str(low.gpu.memory_bytes)} GiB ({gib_str(low.capacity_bytes)} usable)."]
    if choice.strategy == "fsdp" and low.memory.peak_phase == "load":
        m = low.model
        whole = quantized_weights_bytes(m) + quant_constants_bytes(m, low.train.double_quant)
        lines.append(f"  the load phase sets the peak ({gib_str(low.memory.load_needs_bytes)} GiB per GPU; training "
                     f"{gib_str(low.memory.training_needs_bytes)} GiB): every rank first loads the whole 4-bit model "
                     f"({gib_str(whole)} GiB of 4-bit weights and constants) and FSDP's wrap adds its 1/{low.n} "
                     "shards (measured).")
    else:
        lines.append(f"  dominated by {labels[largest]} ({gib_str(comps[largest])} GiB).")
    lines += ["", multi_breakdown_table(low), ""]
    lines += [f"note: {n}" for n in _multi_notes(low)[1]]
    return lines


def multi_plan_json(choice, model: ModelSpec, coeffs: Coefficients) -> dict:
    """`qfit plan --num-gpus N --json`: settings per rank, memory per GPU (`per_gpu`, int bytes)."""
    best = choice.best or smallest_multi(choice.plans)
    mem = best.memory
    per_gpu = {f"{k}_bytes": v for k, v in multi_components(best).items()}
    per_gpu["peak_allocated_bytes"] = sum(multi_components(best)[k] for k in _allocated_fields(best))
    if choice.strategy == "fsdp":
        per_gpu.update(load_needs_bytes=mem.load_needs_bytes, training_needs_bytes=mem.training_needs_bytes)
        peak_phase = mem.peak_phase
    else:
        per_gpu.update(single_gpu_needs_bytes=mem.single.needs_bytes)
        peak_phase = mem.single.peak_phase
    per_gpu.update(needs_bytes=mem.needs_bytes, gpu_capacity_bytes=best.gpu.memory_bytes, usable_bytes=best.capacity_bytes)
    request_notes, memory_notes = _multi_notes(best)

    def plan_doc(p) -> dict:
        return {"settings": settings_dict(p.lora, p.train, resolve_targets(p.model, p.lora.targets)),
                "global_batch": p.global_batch, "needs_bytes": p.memory.needs_bytes,
                "tokens_per_s_per_gpu": round(p.tokens_per_s_per_gpu, 1), "fits": p.fits}

    return {
        "model": model.name,
        "gpu": best.gpu.name,
        "num_gpus": best.n,
        "strategy": choice.strategy,
        "strategy_reason": strategy_reason(choice),
        "cpu_offload": choice.cpu_offload,
        "loading": choice.loading if choice.strategy == "fsdp" else None,
        "settings": settings_dict(best.lora, best.train, resolve_targets(model, best.lora.targets)),
        "global_batch": best.global_batch,
        "params": {"total": model.total_param_count, "trainable": trainable_params(model, best.lora),
                   "quantized": model.quantized_param_count},
        "per_gpu": per_gpu,
        "peak_phase": peak_phase,
        "fits": choice.best is not None,
        "tokens_per_s_per_gpu": round(best.tokens_per_s_per_gpu, 1),
        "calibration": coeffs.name,
        "calibrated": multigpu_calibrated(coeffs),
        "notes": request_notes + memory_notes,
        "alternatives": [plan_doc(p) for p in (multi_alternatives(choice.plans, best) if choice.best else [])],
    }
