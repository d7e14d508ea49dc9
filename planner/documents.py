"""Every `--json` document qfit prints or saves, declared and built here and nowhere else.

Each document has a builder and the key set it writes (a tuple, in the order written); tests/test_documents.py
checks every builder's exact keys against these declarations. The `settings` object inside them is
planner.codec.settings_to_dict (codec.SETTINGS_KEYS). Standard library only: values are ints (bytes),
floats, strings, lists and dicts, never GiB.

  plan          `qfit plan --json` / `--save` (README "--json schema", stable) + `exact` with --exact
  multi_plan    `qfit plan --num-gpus N --json`
  compare       `qfit compare --json`: a list of per-GPU options
  error         `{"error": "..."}`: any command's user error under --json
  models, gpus  `qfit models --json`, `qfit gpus --json`: lists of catalog entries
  calibrate     `qfit calibrate --json`: what was fitted and where it was written
  profile       `qfit profile --json`: the profile as data (its TOML tables) and where it was written
"""

from __future__ import annotations

from planner.codec import settings_to_dict
from planner.memory import resolve_targets, trainable_params
from planner.multigpu import multigpu_calibrated
from planner.specs import MemoryBreakdown

# --------------------------------------------------------------------------- qfit plan --json

PLAN_KEYS = ("model", "gpu", "settings", "params", "memory", "fits", "tokens_per_s", "calibration", "notes",
             "alternatives", "reasons", "advice", "methods")
PLAN_OPTIONAL_KEYS = ("exact",)  # added by --exact (a fitting plan only)
PARAMS_KEYS = ("total", "trainable", "quantized")
MEMORY_KEYS = ("components", "peak_phase", "peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes",
               "required_bytes", "needs_bytes", "gpu_capacity_bytes", "usable_bytes")
COMPONENT_KEYS = MemoryBreakdown.ALLOCATED_FIELDS + ("allocator_reserve", "cuda_context", "paged_optimizer_state")
ALTERNATIVE_KEYS = ("settings", "needs_bytes", "peak_reserved_bytes", "tokens_per_s", "fits")
# per method the search considered (--method; auto: all), its best-ranked plan: the trade the "Why:" lines state
METHOD_KEYS = ("method", "chosen", "fits", "needs_bytes", "headroom_bytes", "tokens_per_s", "settings", "gpu_measured")
# when nothing fits (planner.reasons.NoFitAdvice); null when a plan fits
ADVICE_KEYS = ("larger_gpu", "seq_len", "num_gpus", "strategy", "cpu_offload", "max_num_gpus", "load_needs_bytes",
               "usable_bytes")


def _settings(p) -> dict:
    return settings_to_dict(p.lora, p.train, resolve_targets(p.model, p.lora.targets))


def _params(model, lora) -> dict:
    return {"total": model.total_param_count, "trainable": trainable_params(model, lora),
            "quantized": model.quantized_param_count}


def _speed(tokens_per_s: float) -> float | None:
    """An estimate rounded to 0.1 tokens/s; null when there is none (a GPU without speed facts), never 0.0."""
    return round(tokens_per_s, 1) if tokens_per_s > 0 else None


def advice_document(advice) -> dict | None:
    """planner.reasons.NoFitAdvice -> ADVICE_KEYS (None -> None)."""
    if advice is None:
        return None
    n, strategy, offload = advice.fewest_gpus or (None, None, None)
    return {"larger_gpu": advice.larger_gpu.name if advice.larger_gpu else None, "seq_len": advice.seq_len,
            "num_gpus": n, "strategy": strategy, "cpu_offload": offload, "max_num_gpus": advice.max_gpus,
            "load_needs_bytes": advice.load_needs_bytes, "usable_bytes": advice.usable_bytes}


def plan_document(result, model, coeffs) -> dict:
    """The stable `qfit plan --json` document (README) of a planner.search.SearchResult; `reasons` and
    `advice` are those planner.reasons.explain attached (the text's "Why:" and no-fit lines)."""
    from planner.report import alternatives
    from planner.search import smallest

    best = result.best or smallest(result.plans)

    def alternative(p) -> dict:
        return {"settings": _settings(p), "needs_bytes": p.memory.needs_bytes,
                "peak_reserved_bytes": p.memory.peak_reserved_bytes, "tokens_per_s": _speed(p.tokens_per_s),
                "fits": p.fits}

    mem = best.memory
    return {
        "model": model.name,
        "gpu": best.gpu.name,
        "settings": settings_to_dict(best.lora, best.train, resolve_targets(model, best.lora.targets)),
        "params": _params(model, best.lora),
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
        "tokens_per_s": _speed(best.tokens_per_s),
        "calibration": coeffs.name,
        "notes": list(result.notes),
        "alternatives": [alternative(p) for p in (alternatives(result, best) if result.best else [])],
        "reasons": list(result.reasons),
        "advice": advice_document(result.advice),
        "methods": methods_document(result, coeffs),
    }


def methods_document(result, coeffs=None) -> list[dict]:
    """METHOD_KEYS per method considered, best-ranked first; gpu_measured: whether the coefficients carry terms fitted
    on GPU runs of that method (qlora always; lora and lora-8bit once calibration/speed has their sweep)."""
    from planner.reasons import best_per_method
    from planner.speed import method_fitted

    chosen = result.best.train.method if result.best else None
    return [{"method": m, "chosen": m == chosen, "fits": p.fits, "needs_bytes": p.memory.needs_bytes,
             "headroom_bytes": p.headroom_bytes, "tokens_per_s": _speed(p.tokens_per_s), "settings": _settings(p),
             "gpu_measured": m == "qlora" or (coeffs is not None and method_fitted(coeffs, m))}
            for m, p in best_per_method(result).items()]


# --------------------------------------------------------------------------- qfit plan --exact --json: "exact"

EXACT_KEYS = ("model", "peak_allocated_bytes", "peak_reserved_bytes", "reserved_source", "allocator",
              "device_used_bytes", "required_bytes", "analytic_required_bytes", "analytic_peak_reserved_bytes",
              "analytic_device_used_bytes", "peak_allocated_without_cublas_workspace_bytes",
              "analytic_peak_allocated_bytes", "peak_phase", "analytic_peak_phase", "peak_op", "fields", "categories",
              "static", "phase_peaks", "paged_optimizer_bytes", "analytic_paged_optimizer_bytes", "layers_traced",
              "num_hidden_layers", "extrapolated", "attn_implementation", "optimizer", "device", "trace_seconds",
              "notes")
EXACT_PLAN_KEYS = EXACT_KEYS + ("traced_uncheckpointed_layers",)  # as `qfit plan --exact` adds it
EXACT_FIELD_KEYS = ("analytic_bytes", "traced_bytes")  # per name of EXACT_FIELD_NAMES
EXACT_FIELD_NAMES = MemoryBreakdown.ALLOCATED_FIELDS + ("other",)


def exact_document(res, breakdown, traced_uncheckpointed_layers: int | None = None) -> dict:
    """The `exact` object: a planner.exact.ExactResult's traced bytes per analytic field and per category,
    beside the analytic MemoryBreakdown's (EXACT_KEYS); `qfit plan --exact` also gives the plan's
    uncheckpointed layers (EXACT_PLAN_KEYS)."""
    traced = res.as_fields()
    fields = {}
    for name in EXACT_FIELD_NAMES:
        analytic = getattr(breakdown, name, 0) if name != "other" else 0
        fields[name] = {"analytic_bytes": analytic, "traced_bytes": traced.get(name, 0)}
    # reserved: the allocator simulated over a whole-depth trace; else traced allocated + the fitted slack
    simulated = res.simulated_reserved_bytes > 0
    reserved = res.simulated_reserved_bytes if simulated else res.peak_allocated_bytes + breakdown.allocator_reserve
    return {
        "model": res.model,
        "peak_allocated_bytes": res.peak_allocated_bytes,
        "peak_reserved_bytes": reserved,
        "reserved_source": "allocator simulation" if simulated else "traced allocated + fitted allocator slack",
        "allocator": "expandable_segments:True" if res.expandable_segments else "default",
        "device_used_bytes": reserved + breakdown.cuda_context + res.paged_optimizer_bytes,
        "required_bytes": res.simulated_required_bytes or None,
        "analytic_required_bytes": breakdown.required_bytes,
        "analytic_peak_reserved_bytes": breakdown.peak_reserved_bytes,
        "analytic_device_used_bytes": breakdown.device_used_bytes,
        "peak_allocated_without_cublas_workspace_bytes": res.tensor_peak_bytes,
        "analytic_peak_allocated_bytes": breakdown.peak_allocated_bytes,
        "peak_phase": res.peak_phase,
        "analytic_peak_phase": breakdown.peak_phase,
        "peak_op": res.peak_op,
        "fields": fields,
        "categories": dict(res.categories),
        "static": dict(res.static),
        "phase_peaks": dict(res.phase_peaks),
        "paged_optimizer_bytes": res.paged_optimizer_bytes,
        "analytic_paged_optimizer_bytes": breakdown.paged_optimizer_state,
        "layers_traced": list(res.layers_traced),
        "num_hidden_layers": res.num_hidden_layers,
        "extrapolated": res.extrapolated,
        "attn_implementation": res.attn_implementation,
        "optimizer": res.optimizer,
        "device": res.device,
        "trace_seconds": res.trace_seconds,
        "notes": list(res.notes),
    } | ({} if traced_uncheckpointed_layers is None else {"traced_uncheckpointed_layers": traced_uncheckpointed_layers})


# --------------------------------------------------------------------------- qfit plan --num-gpus N --json

MULTI_PLAN_KEYS = ("model", "gpu", "num_gpus", "strategy", "strategy_reason", "cpu_offload", "loading", "settings",
                   "global_batch", "params", "per_gpu", "load_phase", "cpu_ram_per_node", "peak_phase", "fits", "tokens_per_s_per_gpu", "calibration",
                   "calibrated", "notes", "alternatives", "reasons", "advice")
MULTI_ALTERNATIVE_KEYS = ("settings", "global_batch", "needs_bytes", "tokens_per_s_per_gpu", "fits")
# load_phase (FSDP; null under DDP): f"{term}_bytes" for the loading's named terms (planner.multigpu.fsdp_per_gpu)
LOAD_PHASE_KEYS = {"sharded": ("shards_bytes", "quant_state_bytes", "one_tensor_bytes"),
                   "full": ("whole_model_bytes", "shards_bytes")}
# cpu_ram_per_node (FSDP; null under DDP): planner.multigpu.CpuRam's terms, then the total
CPU_RAM_KEYS = ("offloaded_params_bytes", "offloaded_grads_bytes", "offloaded_optimizer_bytes", "read_buffers_bytes",
                "total_bytes")
# per_gpu: f"{row}_bytes" for every memory row of the strategy (planner.report.multi_components), then these
PER_GPU_TAIL_KEYS = {"ddp": ("peak_allocated_bytes", "single_gpu_needs_bytes", "needs_bytes", "gpu_capacity_bytes",
                             "usable_bytes"),
                     "fsdp": ("peak_allocated_bytes", "load_needs_bytes", "training_needs_bytes", "needs_bytes",
                              "gpu_capacity_bytes", "usable_bytes")}
DDP_ROW_KEYS = COMPONENT_KEYS + ("grad_buckets", "nccl_buffer")


def per_gpu_keys(strategy: str) -> tuple[str, ...]:
    """The exact keys of `per_gpu` under a strategy."""
    from planner.multigpu import FsdpMemory

    rows = DDP_ROW_KEYS if strategy == "ddp" else FsdpMemory.ALLOCATED_FIELDS + (
        "allocator_reserve", "calibration_margin", "cuda_context", "nccl_buffer")
    return tuple(f"{k}_bytes" for k in rows) + PER_GPU_TAIL_KEYS[strategy]


def multi_plan_document(choice, model, coeffs, advice=None) -> dict:
    """`qfit plan --num-gpus N --json` of a planner.multigpu.MultiChoice: settings per rank, memory per GPU
    (`per_gpu`, int bytes); `reasons` as the text's "Why:", `advice` (planner.reasons) when nothing fits."""
    from planner.reasons import multi_why
    from planner.report import (
        _allocated_fields,
        _multi_notes,
        multi_alternatives,
        multi_components,
        smallest_multi,
        strategy_reason,
    )

    best = choice.best or smallest_multi(choice.plans)
    mem = best.memory
    rows = multi_components(best)
    per_gpu = {f"{k}_bytes": v for k, v in rows.items()}
    per_gpu["peak_allocated_bytes"] = sum(rows[k] for k in _allocated_fields(best))
    if choice.strategy == "fsdp":
        per_gpu.update(load_needs_bytes=mem.load_needs_bytes, training_needs_bytes=mem.training_needs_bytes)
        peak_phase = mem.peak_phase
    else:
        per_gpu.update(single_gpu_needs_bytes=mem.single.needs_bytes)
        peak_phase = mem.single.peak_phase
    per_gpu.update(needs_bytes=mem.needs_bytes, gpu_capacity_bytes=best.gpu.memory_bytes, usable_bytes=best.capacity_bytes)
    request_notes, memory_notes = _multi_notes(best)

    def alternative(p) -> dict:
        return {"settings": _settings(p), "global_batch": p.global_batch, "needs_bytes": p.memory.needs_bytes,
                "tokens_per_s_per_gpu": _speed(p.tokens_per_s_per_gpu), "fits": p.fits}

    return {
        "model": model.name,
        "gpu": best.gpu.name,
        "num_gpus": best.n,
        "strategy": choice.strategy,
        "strategy_reason": strategy_reason(choice),
        "cpu_offload": choice.cpu_offload,
        "loading": choice.loading if choice.strategy == "fsdp" else None,
        "settings": settings_to_dict(best.lora, best.train, resolve_targets(model, best.lora.targets)),
        "global_batch": best.global_batch,
        "params": _params(model, best.lora),
        "per_gpu": per_gpu,
        "load_phase": ({f"{k}_bytes": v for k, v in mem.load_terms} if choice.strategy == "fsdp" else None),
        "cpu_ram_per_node": ({**{f"{k}_bytes": v for k, v in mem.cpu_ram.components().items()},
                              "total_bytes": mem.cpu_ram.total_bytes} if choice.strategy == "fsdp" else None),
        "peak_phase": peak_phase,
        "fits": choice.best is not None,
        "tokens_per_s_per_gpu": _speed(best.tokens_per_s_per_gpu),
        "calibration": coeffs.name,
        "calibrated": multigpu_calibrated(coeffs),
        "notes": request_notes + memory_notes,
        "alternatives": [alternative(p) for p in (multi_alternatives(choice.plans, best) if choice.best else [])],
        "reasons": list(multi_why(choice)) if choice.best else [],
        "advice": advice_document(advice),
    }


# --------------------------------------------------------------------------- qfit compare --json

COMPARE_OPTION_KEYS = ("gpu", "display_name", "fits", "settings", "peak_reserved_bytes", "needs_bytes", "capacity_bytes",
                       "memory_bytes", "tokens_per_s", "speed_basis", "speed_error_pct", "total_tokens",
                       "tokens_approximate", "hours", "hours_range", "price_usd_per_hour", "price_basis", "cost_usd",
                       "pareto", "memory_basis", "reason", "smallest", "multi_gpu", "num_gpus", "strategy", "notes")
COMPARE_SMALLEST_KEYS = ("settings", "needs_bytes", "largest_term", "largest_term_bytes")  # null when it fits
COMPARE_MULTI_GPU_KEYS = ("count", "per_gpu_needs_bytes", "sharded_bytes", "shard_bytes", "replicated_bytes",
                          "gathered_layer_bytes", "capacity_bytes", "peak_phase", "loading", "cpu_offload",
                          "cpu_ram_bytes", "basis")  # null when it fits


def compare_option_document(o, c) -> dict:
    """One GPU of `qfit compare --json` (a planner.compare.GpuOption of Comparison c)."""
    from planner.report_compare import reason_str

    plan = o.plan
    small = o.smallest
    term, term_bytes = o.largest_term
    d = {
        "gpu": o.gpu.name,
        "display_name": o.gpu.display_name,
        "fits": o.fits,
        "settings": _settings(plan) if plan else None,
        "peak_reserved_bytes": o.peak_reserved_bytes,
        "needs_bytes": plan.memory.needs_bytes if plan else small.memory.needs_bytes,
        "capacity_bytes": small.capacity_bytes,
        "memory_bytes": o.gpu.memory_bytes,
        "tokens_per_s": _speed(o.tokens_per_s) if plan else None,
        "speed_basis": o.speed_basis,
        "speed_error_pct": o.speed_error_pct,
        "total_tokens": c.workload.total_tokens,
        "tokens_approximate": c.workload.approximate,
        "hours": o.hours,
        "hours_range": list(o.hours_range) if o.hours_range else None,
        "price_usd_per_hour": o.price_usd_per_hour,
        "price_basis": "--price" if o.price_given else (f"profile {o.gpu.price_date}".strip() if o.price_usd_per_hour is not None else None),
        "cost_usd": o.cost_usd,
        "pareto": o.pareto,
        "memory_basis": "predicted",
        "reason": None if o.fits else reason_str(o),
        "smallest": None if o.fits else {
            "settings": _settings(small),
            "needs_bytes": small.memory.needs_bytes, "largest_term": term, "largest_term_bytes": term_bytes,
        },
        "multi_gpu": None,
        "num_gpus": o.count,
        "strategy": o.strategy,
        "notes": list(o.notes),
    }
    if not o.fits and o.multi_gpu is not None:
        m = o.multi_gpu
        d["multi_gpu"] = {
            "count": m.count, "per_gpu_needs_bytes": m.per_gpu_needs_bytes, "sharded_bytes": m.sharded_bytes,
            "shard_bytes": m.shard_bytes, "replicated_bytes": m.replicated_bytes, "gathered_layer_bytes": m.gathered_layer_bytes,
            "capacity_bytes": m.capacity_bytes, "peak_phase": m.peak_phase, "loading": m.memory.loading,
            "cpu_offload": m.cpu_offload, "cpu_ram_bytes": m.cpu_ram_bytes,
            "basis": ("FSDP-sharded 4-bit base, calibrated on 2 x H200" if m.calibrated
                      else "estimate: FSDP-sharded 4-bit base, not calibrated on multi-GPU runs"),
        }
    return d


def compare_document(c) -> list[dict]:
    """`qfit compare --json`: every GPU within the limits (fitting, in sort order), then those that do not fit."""
    return [compare_option_document(o, c) for o in c.options]


# --------------------------------------------------------------------------- errors and catalogs

ERROR_KEYS = ("error",)
MODEL_ENTRY_KEYS = ("name", "hf_id", "params", "layers", "hidden", "vocab", "tied")
GPU_ENTRY_KEYS = ("name", "display_name", "memory_bytes", "compute_capability", "bf16", "flash_attention_2",
                  "bf16_tflops", "fp16_tflops", "bandwidth_gb_s", "price_usd_per_hour", "price_date")


# --------------------------------------------------------------------------- qfit calibrate --json

CALIBRATE_KEYS = ("action", "coefficients_file", "report_file", "runs", "summary")
CALIBRATE_ACTIONS = ("refit", "gpu_auto", "from_runs")


def calibrate_document(action: str, coefficients_file, report_file=None, runs=(), summary: str = "") -> dict:
    """`qfit calibrate --json`: action (CALIBRATE_ACTIONS), the coefficients file written, the report written
    (--refit; else null), the run files fitted (--refit; else []), the summary line."""
    return {"action": action, "coefficients_file": str(coefficients_file),
            "report_file": str(report_file) if report_file else None, "runs": [str(r) for r in runs],
            "summary": summary}


# --------------------------------------------------------------------------- qfit profile --json

PROFILE_KEYS = ("name", "display_name", "hf_id", "aliases", "source", "config", "inventory", "out")


def profile_document(profile: dict, out: str | None) -> dict:
    """`qfit profile --json`: the profile's TOML as data (name, display_name, hf_id, aliases, source, the
    [config] and [inventory] tables) and the file it was written to (--out; else null)."""
    return {**{k: profile.get(k) for k in PROFILE_KEYS if k != "out"}, "out": out}


def error_document(message: str) -> dict:
    """`{"error": "..."}`: a user error under --json (planner.cli_errors)."""
    return {"error": message}


def model_entry(m) -> dict:
    """One entry of `qfit models --json` (a ModelSpec)."""
    return {"name": m.name, "hf_id": m.hf_id, "params": m.total_param_count, "layers": m.num_hidden_layers,
            "hidden": m.hidden_size, "vocab": m.vocab_size, "tied": m.tie_word_embeddings}


def gpu_entry(g) -> dict:
    """One entry of `qfit gpus --json` (a GpuSpec)."""
    return {"name": g.name, "display_name": g.display_name, "memory_bytes": g.memory_bytes,
            "compute_capability": g.compute_capability, "bf16": g.bf16, "flash_attention_2": g.flash_attention_2,
            "bf16_tflops": g.bf16_tflops, "fp16_tflops": g.fp16_tflops, "bandwidth_gb_s": g.bandwidth_gb_s,
            "price_usd_per_hour": g.price_usd_per_hour, "price_date": g.price_date}
