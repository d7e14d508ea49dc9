"""Rendering of `qfit plan`: the only place bytes become "x.xx GiB". Plain text via tabulate; the JSON documents
are built in planner.documents, the reasons they share with the text in planner.reasons."""

from __future__ import annotations

from tabulate import tabulate

from planner.memory import quant_constants_bytes, quantized_weights_bytes, trainable_params
from planner.search import SearchResult, smallest
from planner.specs import Coefficients, MemoryBreakdown, ModelSpec, Plan
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
        **base_labels(plan),
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


def base_labels(plan: Plan) -> dict[str, str]:
    """The rows that depend on how the base is held (TrainSettings.method)."""
    m, t = plan.model, plan.train
    n = _params_str(m.quantized_param_count)
    rest = "fp32" if t.upcast_fp32 else t.compute_dtype
    if t.method == "lora":
        return {"quantized_weights": f"16-bit base weights ({t.compute_dtype}, {n} params)",
                "quant_constants": "quantization constants (none: 16-bit base)",
                "unquantized_weights": f"other weights (embeddings, lm_head, norms; {rest})"}
    if t.method == "lora-8bit":
        return {"quantized_weights": f"8-bit base weights (LLM.int8, {n} params)",
                "quant_constants": "int8 row scales (SCB, fp32 per output row)",
                "unquantized_weights": f"unquantized weights (embeddings, lm_head, norms; {rest})"}
    return {"quantized_weights": f"4-bit base weights (NF4, {n} params)",
            "quant_constants": "quantization constants (" + ("double quant)" if t.double_quant else "fp32 absmax)"),
            "unquantized_weights": f"unquantized weights (embeddings, lm_head, norms; {rest})"}


def method_str(plan: Plan, short: bool = False) -> str:
    """'' for qlora (the default, so its lines read as before); ' · method lora' otherwise."""
    if plan.train.method == "qlora":
        return ""
    return f" {plan.train.method}" if short else f" · method {plan.train.method}"


def settings_line(plan: Plan) -> str:
    t, lora = plan.train, plan.lora
    targets = ",".join(lora.targets)
    return (f"micro-batch {t.batch_size} x accumulation {t.grad_accum} = effective batch {t.effective_batch} · "
            f"seq {t.seq_len} · LoRA r{lora.rank} ({targets}) · gradient checkpointing "
            f"{ckpt_str(plan)} · {t.optim} · {t.compute_dtype} · "
            f"expandable_segments {'on' if t.expandable_segments else 'off'}{method_str(plan)}")


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
            f"ckpt {ckpt_str(plan, short=True)} {t.optim}{method_str(plan, short=True)}")


def alternatives(result: SearchResult, best: Plan, n: int = 4) -> list[Plan]:
    """Fitting runners-up with different shapes (micro-batch, checkpointing, LoRA): the optimizer
    variants of one shape are not shown separately."""

    def shape(p: Plan):
        return (p.train.batch_size, p.train.gradient_checkpointing, p.train.uncheckpointed_layers, p.train.seq_len, p.lora,
                p.train.method)

    out, seen = [], {shape(best)}
    for p in result.fitting:
        key = shape(p)
        if key not in seen:
            out.append(p)
            seen.add(key)
        if len(out) >= n:
            break
    return out


def speed_basis_text(gpu, coeffs: Coefficients) -> str:
    """Where a plan's tokens/s comes from: the GPU kind the speed model was fitted on, or datasheet scaling."""
    on = [n for n in str(coeffs.values.get("speed_calibrated_on", "")).split(",") if n]
    err = coeffs.values.get("speed_cv_error_pct")
    band = f", typical error +/-{err:g}%" if err is not None else ""
    if gpu.name in on:
        return f"speed model fitted on {gpu.name} runs{band}"
    sheet = f"{gpu.speed_proxy}'s datasheet (same memory class)" if gpu.speed_proxy else "this GPU's datasheet"
    return f"speed model fitted on {', '.join(on) or 'no'} runs; scaled by {sheet}"



def no_speed_reason(plan) -> str:
    """Why a plan has no tokens/s estimate: lora-8bit on a card whose datasheet lists no int8 tensor-core or fp32
    rate (planner.speed.tokens_per_second), else a card without speed facts."""
    g = plan.gpu
    if plan.train.method == "lora-8bit" and g.tflops(plan.train.compute_dtype) > 0 and (g.int8_tops <= 0 or g.fp32_tflops <= 0):
        return f"the {g.display_name} datasheet lists no int8 tensor-core rate for LLM.int8's matmuls"
    return "no GPU speed facts"

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
    speed = (f"est. {best.tokens_per_s:,.0f} tokens/s ({speed_basis_text(best.gpu, coeffs)})" if best.tokens_per_s
             else f"no speed estimate ({no_speed_reason(best)})")
    out.append("Recommended  " + settings_line(best))
    out.append("             " + speed)
    out.append("")
    out.append(breakdown_table(best))
    out.append("")
    out += ["Why:  " + line if i == 0 else "      " + line for i, line in enumerate(result.reasons)]
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


def larger_gpu_line(advice) -> str:
    """The smallest larger catalog GPU on which one card fits, as one line."""
    other = advice.larger_gpu
    if other is not None:
        return f"would fit: one {other.display_name} ({other.name}) or any larger catalog GPU."
    return "no single catalog GPU fits this model with these settings."


def fewest_gpus_line(found: tuple[int, str, bool], model_arg: str, gpu, fixed: bool, calibrated: bool) -> str:
    """`fits on N x GPU with FSDP: qfit plan ...`; `(estimate)` when the coefficients are not multi-GPU calibrated."""
    import shlex

    n, strategy, offload = found
    how = "DDP" if strategy == "ddp" else "FSDP" + (" + CPU offload" if offload else "")
    command = f"qfit plan {shlex.quote(model_arg)} --gpu {shlex.quote(gpu.name)} --num-gpus {n}"
    return (f"fits on {n} x {gpu.display_name} with {how}{'' if calibrated else ' (estimate)'}: {command}"
            + (" (with the options above)" if fixed else ""))


def no_count_fits_line(advice, gpu) -> str:
    """Why no count of up to advice.max_gpus GPUs fits: FSDP's load phase, when that alone exceeds the card."""
    head = f"no count of up to {advice.max_gpus} x {gpu.display_name} fits"
    if advice.load_needs_bytes is not None:
        return (f"{head}: every rank first loads the whole 4-bit model and FSDP's wrap adds its shards "
                f"(measured), {gib_str(advice.load_needs_bytes)} GiB per GPU even on {advice.max_gpus} "
                f"({gib_str(advice.usable_bytes)} usable).")
    return head + " with these settings."


def render_advice(advice, model_arg: str, gpu, fixed: bool, calibrated: bool) -> list[str]:
    """The lines under `does not fit.` (planner.reasons.NoFitAdvice): one GPU, then the fewest GPUs."""
    lines = ["  " + larger_gpu_line(advice)]
    if advice.seq_len is not None:
        lines.append(f"  on this card: --seq-len {advice.seq_len} fits.")
    if advice.multi_gpu_note:
        lines.append("  " + advice.multi_gpu_note)
    if advice.fewest_gpus is not None:
        lines.append("  " + fewest_gpus_line(advice.fewest_gpus, model_arg, gpu, fixed=fixed, calibrated=calibrated))
    else:
        lines.append("  " + no_count_fits_line(advice, gpu))
    return lines


def render_multi_advice(advice, model_arg: str, gpu, fixed: bool, calibrated: bool) -> list[str]:
    """The lines under a multi-GPU `does not fit.`: the fewest larger count, or why none and one larger GPU."""
    if advice.fewest_gpus is not None:
        return ["  " + fewest_gpus_line(advice.fewest_gpus, model_arg, gpu, fixed=fixed, calibrated=calibrated)]
    return ["  " + no_count_fits_line(advice, gpu), "  " + larger_gpu_line(advice)]


# --------------------------------------------------------------------------- multi-GPU (qfit plan --num-gpus N)

STRATEGY_TITLES = {"ddp": "DDP", "fsdp": "FSDP2 full shard"}
# "rank0_cpu" never reaches a plan: planner.multigpu refuses it with the measurement (RANK0_CPU_MEASURED)
LOADING_TEXT = {"full": "every rank loads the whole 4-bit model, and FSDP's wrap holds it beside the new shards (measured)",
                "sharded": ("built on meta and sharded first, then the checkpoint streamed one tensor at a time, each rank "
                            "quantizing it and keeping its 1/N (estimate, not measured on GPUs)")}
LOAD_TERM_LABELS = {"whole_model": "whole 4-bit model + LoRA", "shards": "shards", "quant_state": "whole quant_state",
                    "one_tensor": "one tensor being quantized"}
CPU_RAM_LABELS = {"offloaded_params": "offloaded parameter shards (4-bit base, unquantized, LoRA; pinned)",
                  "offloaded_grads": "offloaded LoRA gradient shards (fp32, pinned)",
                  "offloaded_optimizer": "optimizer state on the CPU (AdamW, fp32)",
                  "read_buffers": "loader read buffers (each rank: the largest checkpoint tensor, bf16)"}


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
        "quant_constants": (labels["quant_constants"] + ", whole on every GPU" if mem.loading == "sharded"
                            else shard(labels["quant_constants"])),
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
        load = " + ".join(f"{LOAD_TERM_LABELS[k]} {gib_str(v)}" for k, v in mem.load_terms)
        rows.append(["device used in training (sum of the rows)", gib_str(sum(comps.values())), ""])
        rows.append([f"load phase needs ({load})", gib_str(mem.load_needs_bytes), ""])
        rows.append(["training phase needs (smallest budget + context + NCCL)", gib_str(mem.training_needs_bytes), ""])
        rows.append([f"needs per GPU (max of the two: {mem.peak_phase} phase)", gib_str(mem.needs_bytes), capacity])
    table = tabulate(rows, headers=[title, "GiB", ""], tablefmt="plain", colalign=("left", "right", "left"),
                     disable_numparse=True)
    if plan.strategy == "fsdp" and mem.cpu_ram is not None:
        table += "\n\n" + cpu_ram_table(mem.cpu_ram, plan.n)
    return table


def cpu_ram_table(ram, n: int) -> str:
    """The host memory a node needs (planner.multigpu.CpuRam), by named term."""
    rows = [[CPU_RAM_LABELS[k], gib_str(v)] for k, v in ram.components().items()]
    rows.append([SEP[:50], ""])
    rows.append(["CPU RAM per node (estimate; page cache and process baselines not counted)", gib_str(ram.total_bytes)])
    return tabulate(rows, headers=[f"CPU RAM of the node ({n} ranks)", "GiB"], tablefmt="plain",
                    colalign=("left", "right"), disable_numparse=True)


def multi_settings_lines(plan) -> list[str]:
    t, lora = plan.train, plan.lora
    return [f"per rank: micro-batch {t.batch_size} x accumulation {t.grad_accum} · seq {t.seq_len} · "
            f"LoRA r{lora.rank} ({','.join(lora.targets)}) · gradient checkpointing "
            f"{'on' if t.gradient_checkpointing else 'off'} · {t.optim} · {t.compute_dtype} · "
            f"expandable_segments {'on' if t.expandable_segments else 'off'}",
            f"global batch {plan.n} GPUs x {t.batch_size} x {t.grad_accum} = {plan.global_batch} sequences per optimizer step"]


def strategy_reason(choice) -> str:
    """One line: why this strategy (choice: planner.multigpu.MultiChoice)."""
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


def render_multi_plan(choice, model: ModelSpec, coeffs: Coefficients, gpu_title: str, reasons: tuple[str, ...] = ()) -> str:
    """Human output of `qfit plan --num-gpus N` when a plan fits (choice.best)."""
    best = choice.best
    out = render_multi_header(choice, model, coeffs, gpu_title)
    lines = multi_settings_lines(best)
    if choice.strategy == "fsdp":
        lines += _fsdp_line(choice).split("\n")
    lines.append(f"est. {best.tokens_per_s_per_gpu:,.0f} tokens/s per GPU (one rank's speed model; communication "
                 + ("and CPU offload not modelled)" if choice.cpu_offload else "not modelled)")
                 if best.tokens_per_s_per_gpu else "no speed estimate (no GPU speed facts)")  # multi-GPU: QLoRA only
    out += ["Recommended  " + lines[0]] + ["             " + line for line in lines[1:]]
    out += ["", multi_breakdown_table(best), ""]
    out += ["Why:  " + line if i == 0 else "      " + line for i, line in enumerate(reasons)]
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
    if choice.strategy == "fsdp" and low.memory.peak_phase == "load" and low.memory.loading == "full":
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

