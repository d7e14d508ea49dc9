"""Why this plan, and what would fit when nothing does: computed beside the search, as data.

`explain()` runs planner.search.search and attaches to its SearchResult the reasons `qfit plan` prints
under "Why:" (`reasons`, one sentence each) and, when nothing fits, the advice (`advice`: the smallest
larger catalog GPU, a shorter sequence on this card, the fewest of these GPUs). Both need a few more
estimates and searches, so the search itself (called per GPU by `qfit compare`) does not make them.
planner.report renders them; planner.documents puts the same data in `--json`. No I/O.
"""

from __future__ import annotations

from dataclasses import replace

from planner.multigpu import DEFAULT_LOADING, FSDP_OPTIM, fewest_gpus, least_memory_request, plan_multi
from planner.profiles import all_gpus
from planner.search import (
    AUTO_SEQ_LENS,
    MAX_GPUS,
    NoFitAdvice,
    Request,
    SearchResult,
    next_larger_batch,
    search,
)
from planner.specs import Coefficients, GpuSpec, MemoryBreakdown, ModelSpec, Plan


def why(result: SearchResult, best: Plan, coeffs: Coefficients) -> tuple[str, ...]:
    """The "Why:" sentences of a fitting plan: what limited the micro-batch, why partial or full
    checkpointing, the largest memory term."""
    from planner.report import component_labels, gib_str

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
    tier = lora_tier_cost(result, best)
    if tier:
        lines.append(tier)
    lines.extend(method_trade(result, best))
    return tuple(lines)


METHOD_BASES = {"qlora": "4-bit NF4 base", "lora": "16-bit {dtype} base", "lora-8bit": "8-bit LLM.int8 base"}


def method_label(method: str, compute_dtype: str) -> str:
    """'lora (16-bit bf16 base)'."""
    return f"{method} ({METHOD_BASES[method].format(dtype=compute_dtype)})"


def best_per_method(result: SearchResult) -> dict[str, Plan]:
    """Each method's best plan in the search's own order (fitting first, then the ranking), methods in rank order."""
    out: dict[str, Plan] = {}
    for p in result.plans:
        out.setdefault(p.train.method, p)
    return out


def method_trade(result: SearchResult, best: Plan) -> list[str]:
    """When the search considered several methods (--method auto): which one it chose and the trade against each
    other one, from the same ranking (fitting, quality tier, sequence, optimizer state, est. tokens/s)."""
    from planner.report import gib_str

    per = best_per_method(result)
    if len(per) < 2:
        return []
    label = method_label(best.train.method, best.train.compute_dtype)
    speed = f"est. {best.tokens_per_s:,.0f} tokens/s, " if best.tokens_per_s else ""
    lines = [f"method {label}: the best-ranked method that fits ({speed}{gib_str(best.headroom_bytes)} GiB to spare)."]
    for method, other in per.items():
        if method == best.train.method:
            continue
        if not other.fits:
            lines.append(f"{method} does not fit: its smallest plan needs {gib_str(smallest_needs(result, method))} GiB "
                         f"(capacity {gib_str(best.capacity_bytes)} GiB).")
            continue
        if best.tokens_per_s and other.tokens_per_s:
            ratio = best.tokens_per_s / other.tokens_per_s
            pace = (f"{ratio:.2f}x faster than" if ratio >= 1 else f"{1 / ratio:.2f}x slower than")
            trade = f"is est. {pace} {method} here ({other.tokens_per_s:,.0f} tokens/s"
        else:
            trade = f"ranks above {method} here (no speed estimate on this GPU: ranked by settings"
        if other.lora != best.lora or other.train.seq_len != best.train.seq_len:
            trade += f"; {method} fits only r{other.lora.rank} {','.join(other.lora.targets)} at seq {other.train.seq_len}"
        elif ("8bit" in other.train.optim) != ("8bit" in best.train.optim):
            trade += f"; {method} fits only with {other.train.optim}"
        lines.append(f"{best.train.method} fits with {gib_str(best.headroom_bytes)} GiB to spare and {trade}, "
                     f"{gib_str(other.headroom_bytes)} GiB to spare).")
    return lines


def smallest_needs(result: SearchResult, method: str) -> int:
    return min(p.memory.needs_bytes for p in result.plans if p.train.method == method)


def _lora_str(lora) -> str:
    return f"r{lora.rank} {','.join(lora.targets)}"


def lora_tier_cost(result: SearchResult, best: Plan) -> str | None:
    """What the chosen adapter costs in speed: the fastest fitting plan with a smaller adapter, when the search
    tried one (rank and targets not fixed) and it is faster. The user decides (--optimize speed)."""
    if not best.tokens_per_s:
        return None
    eight = "8bit" in best.train.optim  # compare like with like: 8-bit state is chosen only when nothing else fits
    others = [p for p in result.fitting if p.lora != best.lora and p.tokens_per_s > best.tokens_per_s
              and p.train.seq_len == best.train.seq_len and ("8bit" in p.train.optim) == eight
              and p.train.method == best.train.method]  # the method's own trade is method_trade's
    if not others:
        return None
    fast = max(others, key=lambda p: p.tokens_per_s)
    return (f"LoRA {_lora_str(best.lora)}: est. {best.tokens_per_s:,.0f} tokens/s; {_lora_str(fast.lora)} would train at "
            f"{fast.tokens_per_s:,.0f} ({fast.tokens_per_s / best.tokens_per_s:.2f}x; --optimize speed, or --rank/--targets).")


def larger_gpu(model: ModelSpec, req: Request, coeffs: Coefficients, gpu: GpuSpec) -> GpuSpec | None:
    """The smallest larger catalog GPU on which one card fits `req`."""
    for other in all_gpus():
        if other.memory_bytes > gpu.memory_bytes and search(model, other, req, coeffs).best is not None:
            return other
    return None


def load_phase_limit(model: ModelSpec, gpu: GpuSpec, req: Request, coeffs: Coefficients, strategy: str | None = None,
                     cpu_offload: bool | None = None, max_n: int = MAX_GPUS, loading: str | None = None) -> tuple[int, int] | None:
    """(load needs, usable bytes) when FSDP's whole-model-first load (--loading full: every rank first loads the whole
    4-bit model, measured) alone exceeds the card even on max_n GPUs, which is why no count fits; None otherwise
    (the sharded loader's load phase is never that limit: it holds one tensor beyond the shards)."""
    if (strategy or "auto") == "ddp" or req.optim not in (None, FSDP_OPTIM) or (loading or DEFAULT_LOADING) != "full":
        return None
    plans = plan_multi(model, gpu, least_memory_request(req), coeffs, max_n, "fsdp", cpu_offload=bool(cpu_offload),
                       loading="full")
    load = min(p.memory.load_needs_bytes for p in plans)
    return (load, plans[0].capacity_bytes) if load > plans[0].capacity_bytes else None


def no_fit_advice(model: ModelSpec, gpu: GpuSpec, req: Request, coeffs: Coefficients) -> NoFitAdvice:
    """One GPU, nothing fits: the smallest catalog GPU that does, a shorter sequence on this one, and the
    fewest of these GPUs (or why no count up to MAX_GPUS does)."""
    seq = None
    if req.seq_len != 0:
        seq = next((s for s in reversed(AUTO_SEQ_LENS) if s < (req.seq_len or 512)
                    and search(model, gpu, replace(req, seq_len=s), coeffs).best is not None), None)
    multi_req = req if req.method == "qlora" else replace(req, method="qlora")  # multi-GPU plans are QLoRA only
    found = fewest_gpus(model, gpu, multi_req, coeffs, max_n=MAX_GPUS)
    limit = None if found is not None else load_phase_limit(model, gpu, multi_req, coeffs)
    note = "" if req.method == "qlora" else "several GPUs (multi-GPU plans are QLoRA only: --method qlora):"
    return NoFitAdvice(larger_gpu=larger_gpu(model, req, coeffs, gpu), seq_len=seq, fewest_gpus=found,
                       load_needs_bytes=limit[0] if limit else None, usable_bytes=limit[1] if limit else None,
                       multi_gpu_note=note)


def multi_no_fit_advice(model: ModelSpec, gpu: GpuSpec, req: Request, coeffs: Coefficients, n: int,
                        strategy: str | None = None, cpu_offload: bool | None = None,
                        loading: str | None = None) -> NoFitAdvice:
    """n GPUs, nothing fits: the fewest larger count with the same strategy choices; when none up to
    MAX_GPUS fits, why, and the smallest larger catalog GPU on which one card fits."""
    found = fewest_gpus(model, gpu, req, coeffs, strategy, cpu_offload, loading, start=n + 1, max_n=MAX_GPUS)
    if found is not None:
        return NoFitAdvice(larger_gpu=None, seq_len=None, fewest_gpus=found)
    limit = load_phase_limit(model, gpu, req, coeffs, strategy, cpu_offload, loading=loading)
    return NoFitAdvice(larger_gpu=larger_gpu(model, req, coeffs, gpu), seq_len=None, fewest_gpus=None,
                       load_needs_bytes=limit[0] if limit else None, usable_bytes=limit[1] if limit else None)


def explain(model: ModelSpec, gpu: GpuSpec, req: Request, coeffs: Coefficients) -> SearchResult:
    """planner.search.search with its reasons (a fitting plan) or its no-fit advice attached."""
    result = search(model, gpu, req, coeffs)
    if result.best is not None:
        return replace(result, reasons=why(result, result.best, coeffs))
    return replace(result, advice=no_fit_advice(model, gpu, req, coeffs))


def multi_why(choice) -> tuple[str, ...]:
    """The "Why:" sentences of a fitting multi-GPU plan (choice: planner.multigpu.MultiChoice)."""
    from planner.report import _largest, gib_str, multi_component_labels, multi_components

    best = choice.best
    comps, labels, largest = multi_components(best), multi_component_labels(best), _largest(best)
    why = [f"largest term: {labels[largest]}, {gib_str(comps[largest])} GiB."]
    if choice.strategy == "fsdp" and best.memory.peak_phase == "load" and best.memory.loading == "full":
        why.append(f"the load phase sets the peak ({gib_str(best.memory.load_needs_bytes)} GiB per GPU, training "
                   f"{gib_str(best.memory.training_needs_bytes)} GiB)"
                   + ": every rank first loads the whole 4-bit model (measured; transformers loads a quantized "
                   "checkpoint whole on each rank) and FSDP's wrap holds it beside the new shards.")
    return tuple(why)
