"""run_report.json, the run's record: what was planned, what was in effect, the measured against the predicted
memory, speed, steps, OOM events and loss, for one GPU (single_report, from a TrainingSession) and for a
multi-GPU run (multi_report, from every rank's file); the summary printed at the end; and the calibration
row a measured CUDA run appends to the user's <qfit cache>/runs.csv (append_calibration).

Standard library and light planner modules only (library versions are read through planner.train.stack,
imported inside the functions).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

from planner.codec import settings_to_dict
from planner.coefficients import user_cache_dir
from planner.memory import resolve_targets
from planner.report import gib_str
from planner.specs import Plan
from planner.train.device import Device
from planner.train.options import RunResult
from planner.train.output import RUN_REPORT, last_checkpoint, write_json


def single_report(s, measured: dict, effect: dict) -> dict:
    """run_report.json of a single-GPU run. s: the planner.train.session.TrainingSession after train();
    measured: its measurements with the final peaks; effect: trainer_glue.settings_in_effect."""
    from planner.train import stack

    plan, config, progress = s.plan, s.config, s.progress
    cuda = s.device.kind == "cuda"
    total = config["max_steps"]
    step = s.trainer.state.global_step
    planned = settings_to_dict(plan.lora, plan.train, resolve_targets(plan.model, plan.lora.targets))
    differs = [k for k in ("batch_size", "grad_accum", "gradient_checkpointing", "uncheckpointed_layers", "optim", "compute_dtype", "rank",
                           "alpha", "double_quant") if k in planned and effect.get(k) != planned[k]]
    notes = list(s.notes)
    if differs:
        why = " (after out-of-memory back-off)" if s.oom_events else ""
        notes.append(f"in effect differs from the plan in {', '.join(differs)}{why}")
    seconds = progress.train_seconds
    tok_s = progress.train_tokens / seconds if seconds else 0.0
    history = [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate")}
               for h in s.trainer.state.log_history if "loss" in h]
    ckpt = last_checkpoint(s.out)
    device = s.device
    return {
        "status": "completed" if step >= total else "interrupted",
        "model": {"name": s.src.spec.name, "source": s.src.ref},
        "data": s.data_info,
        "device": {"kind": device.kind, "name": device.name, "total_bytes": device.total_bytes,
                   "free_bytes": device.free_bytes, "notes": list(device.notes),
                   "emulation": s.emulation or None},  # QFIT_EMULATE_GPU: card, allocator budget (bytes)
        "planned": planned,
        "in_effect": effect,
        "memory": {
            "predicted": {"peak_allocated_bytes": plan.memory.peak_allocated_bytes,
                          "peak_reserved_bytes": plan.memory.peak_reserved_bytes,
                          "needs_bytes": plan.memory.needs_bytes, "peak_phase": plan.memory.peak_phase},
            "measured": measured,
            "longest_micro_batch_tokens": s.collator.longest,
            "note": ("measured since the last (re)start of training: torch.cuda.max_memory_allocated/reserved" if cuda
                     else "CPU run: no CUDA memory to measure (0); the prediction is for a GPU"),
            "per_interval": progress.memory,
            "per_interval_note": ("per logging interval: the peak allocated in it (peaks reset after each) and what "
                                  "stays allocated after its last step" if cuda else
                                  "CPU run: each logging interval's step is recorded with null bytes (nothing measured)"),
            "leak_from_step": next((w["step"] for w in progress.warnings if w["kind"] == "leak"), None),
        },
        "eval": eval_section(s),
        "speed": {"tokens_per_s": round(tok_s, 1),
                  "padded_tokens_per_s": round(progress.train_padded_tokens / seconds, 1) if seconds else 0.0,
                  "predicted_tokens_per_s": round(plan.tokens_per_s, 1), "train_seconds": round(seconds, 2),
                  "train_tokens": progress.train_tokens, "train_padded_tokens": progress.train_padded_tokens,
                  "note": "tokens/s counts non-padding tokens; padded counts what the device computed"},
        "steps": {"planned": total, "completed": step, "run_in_this_process": progress.steps_run,
                  "resumed_from": s.resumed_from, "effective_batch": effect["effective_batch"]},
        "oom_events": s.oom_events,
        "loss": {"first": history[0]["loss"] if history else None, "last": history[-1]["loss"] if history else None,
                 "history": history},
        "stopped_by": s.stop.name or None,
        "checkpoint": str(ckpt) if ckpt else None,
        "library_versions": stack.library_versions(),
        "training": {"scheduler": config.get("scheduler", "cosine"), "warmup": config["warmup"], "seed": config["seed"],
                     "report_to": config.get("report_to", "none")},
        "warnings": [w["message"] for w in progress.warnings],
        "sample": None,
        "notes": notes,
    }


def eval_section(s) -> dict | None:
    """run_report.json's "eval": the validation loss of every evaluation and the final one, and how its memory
    was planned (None: the run had no validation set)."""
    ev = s.config.get("eval")
    if not ev:
        return None
    hist = [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in s.progress.evals]
    best = min(hist, key=lambda e: e["eval_loss"]) if hist else None
    return {"rows": ev["rows"], "source": (s.data_info.get("eval") or {}).get("source"), "every_steps": ev["steps"],
            "history": hist, "final": hist[-1]["eval_loss"] if hist else None,
            "best": best, "divergence_from_step": next((w["step"] for w in s.progress.warnings
                                                        if w["kind"] == "divergence"), None),
            "batch_size": s.train_settings.batch_size,
            "memory_note": ("evaluation runs at the training micro-batch (per_device_eval_batch_size = the planned "
                            "micro-batch) under no_grad, loss only: no gradients, optimizer step or saved activations, "
                            "so it needs less than the planned training peak"),
            "packing": bool(s.config.get("packing"))}


def completed_lines(s, report: dict) -> list[str]:
    """What a completed single-GPU run prints at the end (s: the TrainingSession; report: single_report's)."""
    plan, out = s.plan, s.out
    seconds = s.progress.train_seconds
    tok_s = s.progress.train_tokens / seconds if seconds else 0.0
    step = report["steps"]["completed"]
    measured = report["memory"]["measured"]
    calib = report.get("calibration_row")
    lines = [""]
    loss = report["loss"]
    if loss["first"] is not None:
        lines.append(f"done: {step} steps, loss {loss['first']:.3f} -> {loss['last']:.3f}, {tok_s:,.0f} tokens/s")
    else:
        lines.append(f"done: {step} steps, {tok_s:,.0f} tokens/s")
    ev = report.get("eval")
    if ev and ev["history"]:
        hist = ev["history"]
        lines.append(f"validation loss: {hist[0]['eval_loss']:.3f} (step {hist[0]['step']}) -> {ev['final']:.3f} "
                     f"(step {hist[-1]['step']}); best {ev['best']['eval_loss']:.3f} at step {ev['best']['step']}; "
                     f"{ev['rows']} rows")
    if s.device.kind == "cuda":
        lines.append(f"peak memory: measured {gib_str(measured['peak_allocated_bytes'])} GiB allocated / "
                     f"{gib_str(measured['peak_reserved_bytes'])} GiB reserved; predicted "
                     f"{gib_str(plan.memory.peak_allocated_bytes)} / {gib_str(plan.memory.peak_reserved_bytes)} GiB")
        lines.append(f"calibration: run appended to {calib}" if calib else "calibration: not appended (see run_report.json)")
    else:
        lines.append("peak memory: not measured on the CPU; calibration data not appended (CUDA runs only)")
    if s.oom_events:
        lines.append(f"out-of-memory events: {len(s.oom_events)} (micro-batch now {s.train_settings.batch_size}, "
                     f"effective batch {s.train_settings.effective_batch}); see run_report.json")
    for w in report.get("warnings") or []:
        lines.append(w)
    if report.get("sample"):
        lines.append(f"sample: {report['sample']['prompt']!r} -> {report['sample']['completion']!r}")
    lines.append(f"adapter: {out} (adapter_config.json, adapter_model.safetensors); report: {out / RUN_REPORT}")
    lines.append(f"merge it into a 16-bit model with: qfit merge {out} --output {out}-merged")
    lines.append("load it with:")
    lines.append(load_snippet(s.src.ref, out.resolve(), report["in_effect"]["compute_dtype"] or plan.train.compute_dtype,
                              plan.train.method))
    return lines


def load_snippet(base_ref: str, adapter_dir: Path, compute_dtype: str, method: str = "qlora") -> str:
    """How to load the adapter on the base it was trained on (the adapter itself is the same for every method)."""
    torch_dtype = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}[compute_dtype]
    if method == "lora":
        load = [f"base = AutoModelForCausalLM.from_pretrained({base_ref!r}, dtype={torch_dtype})"]
    elif method == "lora-8bit":
        load = ["bnb = BitsAndBytesConfig(load_in_8bit=True)",
                f"base = AutoModelForCausalLM.from_pretrained({base_ref!r}, quantization_config=bnb, dtype={torch_dtype})"]
    else:
        load = ["bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\", bnb_4bit_use_double_quant=True,",
                f"                         bnb_4bit_compute_dtype={torch_dtype})",
                f"base = AutoModelForCausalLM.from_pretrained({base_ref!r}, quantization_config=bnb)"]
    return "\n".join([
        "import torch",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer" + (", BitsAndBytesConfig" if method != "lora" else ""),
        "",
        *load,
        f"model = PeftModel.from_pretrained(base, {str(adapter_dir)!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({str(adapter_dir)!r})",
    ])


def append_calibration(report: dict, plan: Plan, device: Device, config: dict, measured: dict, progress,
                       collator) -> str | None:
    """One row in the calibration CSV layout (planner.train.harness.FIELDS) at <qfit cache>/runs.csv.

    seq_len is the longest padded micro-batch actually run (the data decides it, not the plan), so the
    row states the shape whose memory was measured."""
    from planner.train.harness import FIELDS

    if not measured.get("peak_allocated_bytes"):
        return None
    e = report["in_effect"]
    versions = report["library_versions"]
    targets = plan.lora.targets[0] if len(plan.lora.targets) == 1 else ",".join(plan.lora.targets)
    step_s = progress.train_seconds / progress.steps_run if progress.steps_run else 0.0
    row = {
        "run_id": f"qfit-run|{plan.model.name}|{time.strftime('%Y%m%d-%H%M%S')}",
        "model": plan.model.name, "compute_dtype": e["compute_dtype"], "double_quant": e["double_quant"],
        "alloc_conf": e["alloc_conf"], "batch_size": e["batch_size"], "grad_accum": e["grad_accum"],
        "seq_len": collator.longest or config["seq_len"], "gradient_checkpointing": e["gradient_checkpointing"],
        "uncheckpointed_layers": e.get("uncheckpointed_layers", 0),
        "rank": e["rank"], "alpha": e["alpha"], "lora_dropout": e["lora_dropout"], "targets": targets,
        "optim": e["optim"], "status": "ok",
        "budget_bytes": ((report.get("device") or {}).get("emulation") or {}).get("budget_bytes", 0),  # capped run
        "load_peak_allocated_bytes": measured.get("load_peak_allocated_bytes", ""),
        "after_load_allocated_bytes": measured.get("after_load_allocated_bytes", ""),
        "after_wrap_allocated_bytes": measured.get("after_wrap_allocated_bytes", ""),
        "peak_allocated_bytes": measured["peak_allocated_bytes"], "peak_reserved_bytes": measured["peak_reserved_bytes"],
        "nvml_used_bytes": measured.get("nvml_used_bytes", ""), "nvml_baseline_bytes": measured.get("nvml_baseline_bytes", ""),
        "context_bytes": "", "leak_bytes": "", "step_time_s": round(step_s, 4),
        "tokens_per_s": report["speed"]["padded_tokens_per_s"], "steps": progress.steps_run, "error": "",
        "gpu_name": device.name, "gpu_total_bytes": device.total_bytes, "driver": "",
        "torch": versions.get("torch", ""), "transformers": versions.get("transformers", ""),
        "peft": versions.get("peft", ""), "bitsandbytes": versions.get("bitsandbytes", ""),
        "cuda": versions.get("cuda", ""), "date": time.strftime("%Y-%m-%d"), "method": plan.train.method,
    }
    path = user_cache_dir() / "runs.csv"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.is_file() or path.stat().st_size == 0
        if not new:
            with path.open(newline="") as fh:
                old = csv.DictReader(fh)
                rows = list(old) if old.fieldnames != list(FIELDS) else None
            if rows is not None:  # written by an older qfit: the same rows under today's columns
                with path.open("w", newline="") as fh:
                    w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
                    w.writeheader()
                    w.writerows(rows)
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
    except OSError:
        return None
    return str(path)



def multi_report(out: Path, config: dict, ranks: list[dict], device, events: list, code: int, seconds: float, echo):
    """run_report.json of a multi-GPU run from every rank's rank<r>.json (planner.train.distributed.train_rank),
    written, and the summary printed. -> the RunResult of `qfit run --num-gpus N`."""
    from planner.train.stack import library_versions

    n = config["num_gpus"]  # this machine's ranks wrote their files here
    completed = len(ranks) == n and all(r["steps"] >= config["max_steps"] for r in ranks)
    world = n * config.get("num_machines", 1)
    pred = config.get("predicted_per_gpu", {})
    per_rank = []
    for r in sorted(ranks, key=lambda r: r["rank"]):
        row = {k: r.get(k) for k in ("rank", "load_peak_allocated_bytes", "after_load_allocated_bytes",
                                     "peak_allocated_bytes", "peak_reserved_bytes", "nvml_used_bytes", "wrapper")}
        if r.get("peak_allocated_bytes") and pred.get("peak_allocated_bytes"):
            row["allocated_error_pct"] = round(100 * (pred["peak_allocated_bytes"] - r["peak_allocated_bytes"])
                                               / r["peak_allocated_bytes"], 2)
        per_rank.append(row)
    r0 = next((r for r in ranks if r["rank"] == 0), ranks[0] if ranks else {})
    secs = r0.get("train_seconds") or 0.0
    tokens = sum(r.get("tokens", 0) for r in ranks)
    padded = sum(r.get("padded_tokens", 0) for r in ranks)
    report = {
        "status": "completed" if completed else "interrupted",
        "model": {"name": config["model_name"], "source": config["model"]},
        "num_gpus": n, "strategy": config["strategy"],
        "device": {"name": device.name, "total_bytes": device.total_bytes, "free_bytes": device.free_bytes},
        "planned": config["settings"],
        "num_machines": config.get("num_machines", 1),
        "global_batch": world * config["settings"]["batch_size"] * config["settings"]["grad_accum"],
        "memory": {"predicted_per_gpu": pred, "measured_per_rank": per_rank,
                   "note": "per rank: torch.cuda.max_memory_allocated/reserved since training (re)started; "
                           "load peak since the process started"},
        "speed": {"tokens_per_s": round(tokens / secs, 1) if secs else 0.0, "train_seconds": round(secs, 2),
                  "padded_tokens_per_s": round(padded / secs, 1) if secs else 0.0,
                  "train_tokens": tokens, "train_padded_tokens": padded, "packing": bool(config.get("packing")),
                  "note": "tokens of all ranks over rank 0's training time; train_tokens: non-padding, "
                          "train_padded_tokens: computed (padding included)"},
        "steps": {"planned": config["max_steps"], "completed": min((r["steps"] for r in ranks), default=0)},
        "oom_events": events,
        "loss": {"history": r0.get("loss", [])},
        "wall_seconds": round(seconds, 1),
        "library_versions": library_versions(),
    }
    if completed:
        report["adapter_dir"] = str(out)
    write_json(out / RUN_REPORT, report)
    hist = report["loss"]["history"]
    echo("")
    if not completed:
        ckpt = last_checkpoint(out)
        echo(f"stopped at step {report['steps']['completed']} of {config['max_steps']}; checkpoint {ckpt}")
        echo(f"continue with: qfit run --resume {out}")
        return RunResult("interrupted", out, report, exit_code=code or 1, checkpoint=str(ckpt) if ckpt else None)
    echo(f"done: {report['steps']['completed']} steps on {n} {'GPUs' if device.kind == 'cuda' else 'processes'} "
         f"({config['strategy'].upper()})" + (f", loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f}" if hist else "")
         + f", {report['speed']['tokens_per_s']:,.0f} tokens/s")
    for row in per_rank:
        if row.get("peak_allocated_bytes"):
            echo(f"rank {row['rank']}: peak {gib_str(row['peak_allocated_bytes'])} GiB allocated / "
                 f"{gib_str(row['peak_reserved_bytes'])} GiB reserved; predicted "
                 f"{gib_str(pred.get('peak_allocated_bytes', 0))} GiB allocated")
    echo(f"adapter: {out} (adapter_config.json, adapter_model.safetensors); report: {out / RUN_REPORT}")
    return RunResult("completed", out, report, exit_code=0, checkpoint=None)
