"""Rendering of `qfit plan --exact`: the traced breakdown beside the analytic one (numbers in planner/exact.py).

Example:  qfit plan mistral-7b --gpu h200 --exact

`exact_json` gathers the numbers, `exact_section` renders them; both trace the step unless given an
ExactResult. Bytes stay int until gib_str turns them into GiB at display. Standard library and
tabulate only at module level: the trace imports torch inside planner.exact.trace_step.
"""

from __future__ import annotations

from tabulate import tabulate

from planner.exact import CATEGORY_LABELS, CATEGORY_TO_FIELD, ExactResult, trace_step
from planner.report import gib_str
from planner.specs import LoraSettings, MemoryBreakdown, TrainSettings

FIELD_LABELS = {
    "quantized_weights": "4-bit base weights",
    "quant_constants": "quantization constants",
    "unquantized_weights": "unquantized weights (fp32)",
    "lora_params": "LoRA weights",
    "lora_grads": "LoRA gradients",
    "optimizer_state": "optimizer state (allocator)",
    "saved_activations": "saved activations + batches",
    "layer_working_set": "layer working set (recompute, backward, kernels)",
    "logits": "logits chain",
    "other": "not in the analytic model (cuBLAS workspaces, rotary buffers, scalars)",
}


# the rows that name the base as train.method holds it (planner.specs.METHODS)
METHOD_FIELD_LABELS = {
    "lora": {"quantized_weights": "16-bit base weights", "quant_constants": "quantization constants (none)",
             "unquantized_weights": "other weights (compute dtype)"},
    "lora-8bit": {"quantized_weights": "8-bit base weights", "quant_constants": "int8 row scales"},
}


def _signed_gib(n_bytes: int) -> str:
    return ("+" if n_bytes >= 0 else "") + gib_str(n_bytes)


def _result(model_spec, lora: LoraSettings, train: TrainSettings, result: ExactResult | None, device) -> ExactResult:
    return result if result is not None else trace_step(model_spec, lora, train, device=device)


def exact_json(model_spec, lora: LoraSettings, train: TrainSettings, breakdown: MemoryBreakdown,
               result: ExactResult | None = None, device=None, traced_uncheckpointed_layers: int | None = None) -> dict:
    """The `exact` object of `qfit plan --exact --json` (planner.documents.exact_document), tracing the step
    unless given its ExactResult. device: the plan's GpuSpec (or a planner.exact.CudaDevice); default H200.
    Raises QfitError (one line)."""
    from planner.documents import exact_document

    return exact_document(_result(model_spec, lora, train, result, device), breakdown, traced_uncheckpointed_layers)


def exact_section(model_spec, lora: LoraSettings, train: TrainSettings, breakdown: MemoryBreakdown,
                  result: ExactResult | None = None, device=None) -> str:
    """Plain-text section: analytic vs traced per term, the traced categories, and how it was traced."""
    doc = exact_json(model_spec, lora, train, breakdown, result, device)
    rows = []
    for name, v in doc["fields"].items():
        a, t = v["analytic_bytes"], v["traced_bytes"]
        if name == "other" and not t:
            continue
        labels = {**FIELD_LABELS, **METHOD_FIELD_LABELS.get(train.method, {})}
        rows.append([labels.get(name, name), gib_str(a) if name != "other" else "-", gib_str(t),
                     _signed_gib(t - a) if name != "other" else ""])
    a_peak, t_peak = doc["analytic_peak_allocated_bytes"], doc["peak_allocated_bytes"]
    err = (t_peak - a_peak) / a_peak * 100 if a_peak else 0.0
    rows.append(["-" * 48, "", "", ""])
    rows.append(["peak allocated", gib_str(a_peak), gib_str(t_peak), _signed_gib(t_peak - a_peak)])
    reserved_label = ("peak reserved (allocator simulated)" if doc["reserved_source"] == "allocator simulation"
                      else "peak reserved (+ fitted allocator slack)")
    for label, key in ((reserved_label, "peak_reserved_bytes"),
                       ("device used (+ CUDA context, paged state)", "device_used_bytes")):
        a, t = doc[f"analytic_{key}"], doc[key]
        rows.append([label, gib_str(a), gib_str(t), _signed_gib(t - a)])
    if doc["required_bytes"]:
        a, t = doc["analytic_required_bytes"], doc["required_bytes"]
        rows.append(["smallest allocator budget (simulated caps)", gib_str(a), gib_str(t), _signed_gib(t - a)])
    table = tabulate(rows, headers=["Exact mode: allocated at the peak", "analytic GiB", "traced GiB", "diff GiB"],
                     tablefmt="plain", colalign=("left", "right", "right", "right"), disable_numparse=True)
    lines = [table, "",
             f"traced peak: {doc['peak_phase']} (op {doc['peak_op']}); analytic peak: {doc['analytic_peak_phase']}; "
             f"traced - analytic = {err:+.1f}%"]
    cats = sorted(doc["categories"].items(), key=lambda kv: -kv[1])
    cat_labels = CATEGORY_LABELS if train.method == "qlora" else {
        **CATEGORY_LABELS, "quantized_weights": f"base weights ({train.method})",
        "unquantized_weights": "unquantized weights" + (" (compute dtype)" if not train.upcast_fp32 else " (fp32)")}
    detail = [[cat_labels.get(k, k), gib_str(v), CATEGORY_TO_FIELD.get(k) or "-"] for k, v in cats]
    lines += ["", tabulate(detail, headers=["traced, alive at the peak", "GiB", "analytic field"], tablefmt="plain",
                           colalign=("left", "right", "left"), disable_numparse=True)]
    last_mb = max((k.split(":")[0] for k in doc["phase_peaks"] if k.startswith("step 2, micro-batch")), default="")
    phase_rows = [[k.split(": ", 1)[1], gib_str(v)] for k, v in doc["phase_peaks"].items()
                  if (last_mb and k.startswith(last_mb + ":")) or k == "step 2: optimizer step"]
    if phase_rows:
        lines += ["", tabulate(phase_rows, headers=[f"traced peak per phase ({last_mb})", "GiB"], tablefmt="plain",
                               colalign=("left", "right"), disable_numparse=True)]
    if doc["paged_optimizer_bytes"] or doc["analytic_paged_optimizer_bytes"]:
        lines.append(f"paged optimizer state (CUDA managed memory, outside the allocator): traced "
                     f"{gib_str(doc['paged_optimizer_bytes'])} GiB, analytic {gib_str(doc['analytic_paged_optimizer_bytes'])} GiB")
    how = (f"traced at {' and '.join(str(n) for n in doc['layers_traced'])} of {doc['num_hidden_layers']} decoder layers"
           + (", extrapolated per phase" if doc["extrapolated"] else "")
           + f" on fake tensors for {doc['device']} ({doc['attn_implementation']} attention, {doc['optimizer']}), "
           f"{doc['trace_seconds']:.1f} s")
    if doc["reserved_source"] == "allocator simulation":
        how += (f"; peak reserved replays every allocation through a simulation of PyTorch's caching allocator "
                f"({doc['allocator']}, planner/allocsim.py)")
    lines += ["", how]
    lines += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(lines)
