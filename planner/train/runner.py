"""`qfit run`: plan, then fine-tune with the planned settings, and never lose progress to an OOM.

The order of a run, and why:
  1. options, output directory, model source and data are checked first: every user mistake is a
     one-line RunError / DataError / ProfileError before any model is loaded (planner.train.options,
     output, source, planning);
  2. the GPU is read through NVML (its FREE memory is what the plan may use; planner.train.device), the plan
     comes from planner.search with the user's choices fixed, and is printed (planner.train.planning);
  3. one GPU or the CPU: a planner.train.session.TrainingSession loads the model through the real QLoRA path,
     runs the fit probe, trains with transformers' Trainer, backs off on an out-of-memory error without
     losing a step (planner.train.oom), and writes the adapter and run_report.json (planner.train.run_report);
     several GPUs: planner.train.dist_run launches one rank per GPU;
  4. SIGINT / SIGTERM finish the current step, save a checkpoint and return; `--resume DIR` continues.

This module only orchestrates. Module level is light (standard library and planner modules), so
`qfit run --help` and option errors are instant; torch & co. are imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from planner import data as qdata
from planner.codec import settings_to_dict
from planner.coefficients import load_coefficients
from planner.memory import resolve_targets
from planner.profiles import load_model
from planner.search import compute_dtype_for, make_plan
from planner.train.device import detect_device, set_alloc_conf
from planner.train.options import (
    AUTO_EVAL_POINTS,
    DEFAULT_LEARNING_RATE,
    DEFAULT_WARMUP,
    PreparedData,
    RunError,
    RunOptions,
    RunResult,
    eval_split_size,
)
from planner.train.output import (
    CONFIG_VERSION,
    PLAN_FILE,
    RUN_CONFIG,
    check_output,
    fingerprint,
    prepare_output,
    resume_options,
    saved_settings,
    write_json,
)
from planner.train.planning import (
    auto_save_steps,
    build_request,
    check_against_model,
    check_new_run,
    check_plan_model,
    choose_packing,
    plan_file_doc,
    plan_lines,
    plan_run,
    plan_seq_len,
    planned_steps,
    read_plan_file,
    training_items,
)
from planner.train.session import TrainingSession
from planner.train.source import ModelSource, load_tokenizer, resolve_model

__all__ = ["RunOptions", "RunResult", "RunError", "run", "prepare_data"]


def run(opts: RunOptions, echo: Callable[[str], None] = print, callbacks: tuple = ()) -> RunResult:
    """Plan and train. `callbacks` are extra transformers TrainerCallbacks (tests inject faults with them).

    Raises RunError, DataError or ProfileError (all ValueError) for anything the user can fix."""
    if opts.resume:
        opts, saved = resume_options(opts)
    else:
        saved = None
        check_new_run(opts)
        if opts.demo:
            from planner.demo import DEMO_RUN

            opts = replace(opts, max_steps=opts.max_steps or (None if opts.epochs else DEMO_RUN["max_steps"]),
                           effective_batch=opts.effective_batch or DEMO_RUN["effective_batch"],
                           learning_rate=opts.learning_rate or DEMO_RUN["learning_rate"],
                           warmup=DEMO_RUN["warmup"] if opts.warmup is None else opts.warmup)
    check_output(opts)
    report_to = resolve_report_to(opts.report_to)
    if opts.strategy == "fsdp":  # before the data is read: accelerate runs FSDP on GPUs only
        import torch

        if not torch.cuda.is_available():
            raise RunError("--strategy fsdp needs CUDA GPUs (accelerate runs FSDP on GPUs only); use --strategy ddp on the CPU")

    # --- model source and data: all checks before any model is loaded
    plan_doc = read_plan_file(opts.plan_path) if opts.plan_path and not opts.resume else None
    if opts.demo:
        from planner import demo

        spec = load_model(demo.MODEL_PROFILE)
        check_against_model(opts, spec)
        src = ModelSource(spec, str(demo.prepare()), True)  # built on first use, then cached
        dataset = str(demo.DATA_FILE)
    else:
        src = resolve_model(opts.model or plan_doc["model"])
        if plan_doc:
            check_plan_model(plan_doc, src.spec, opts.plan_path)
        check_against_model(opts, src.spec)
        dataset = opts.dataset
    data = prepare_data(opts, src, dataset, plan_doc, echo)
    if ((saved or {}).get("num_gpus") or opts.num_gpus or 1) > 1 or (opts.num_machines or 1) > 1:  # planner.train.dist_run
        from planner.train.dist_run import run_multi

        return run_multi(opts, saved, plan_doc, src, data, echo)

    # --- packing: on by default when rows are shorter than the sequence (they fill rows of seq_len tokens)
    packing = choose_packing(opts, saved, data.examples, data.seq_len)
    plan_seq = plan_seq_len(data.examples, data.seq_len, packing, opts.padding)

    # --- device and plan
    settings = (saved or plan_doc or {}).get("settings", {})
    alloc_note = set_alloc_conf(settings.get("expandable_segments", True))  # before CUDA is initialised
    device = detect_device()
    for n in device.notes + ((alloc_note,) if alloc_note else ()):
        echo(f"note: {n}")
    if saved is not None:
        lora, train = saved_settings(saved)
        dtype, dtype_note = compute_dtype_for(device.spec, train.compute_dtype)
        train = replace(train, compute_dtype=dtype)
        coeffs = load_coefficients(device.spec.name if device.kind == "cuda" else None)
        plan = make_plan(src.spec, device.spec, lora, train, coeffs)
        plan_notes = ["resuming with the run's saved settings (micro-batch as after any out-of-memory back-off)"]
        plan_notes += [dtype_note] if dtype_note else []
        if not plan.fits:
            plan_notes.append(f"these settings are predicted not to fit {device.spec.display_name}; "
                              "the out-of-memory guard will reduce the micro-batch if needed")
    else:
        req, req_notes = build_request(opts, plan_doc, plan_seq, packing)
        plan, plan_notes = plan_run(src.spec, device, req)
        plan_notes = req_notes + plan_notes
    for n in plan_notes:
        echo(f"note: {n}")
    for line in plan_lines(plan, device):
        echo(line)

    items = training_items(data, packing, opts.padding, plan_seq, echo)
    total_steps = saved["max_steps"] if saved else planned_steps(items, plan.train.effective_batch, opts.epochs, opts.max_steps)
    save_steps = opts.save_steps or auto_save_steps(total_steps)
    eval_steps = (opts.eval_steps or max(1, total_steps // AUTO_EVAL_POINTS)) if data.eval_examples else None
    if data.eval_examples:
        echo(f"validation: {len(data.eval_examples)} rows ({data.info['eval']['source']}), loss every {eval_steps} "
             f"steps and at the end, at micro-batch {plan.train.batch_size} without gradients (less memory than a "
             "training step)")
    out = prepare_output(opts)
    config = saved or {
        "version": CONFIG_VERSION, "model": src.ref, "model_name": src.spec.name, "demo": opts.demo,
        "dataset": fingerprint(dataset), "format": data.fmt, "seq_len": data.seq_len,
        "padding": opts.padding or "longest", "packing": packing,
        "max_steps": total_steps,
        "learning_rate": opts.learning_rate or DEFAULT_LEARNING_RATE, "warmup": opts.warmup if opts.warmup is not None
        else DEFAULT_WARMUP, "save_steps": save_steps, "seed": opts.seed,
        "settings": settings_to_dict(plan.lora, plan.train, resolve_targets(src.spec, plan.lora.targets)),
        "scheduler": opts.scheduler or "cosine",
        "eval": {"dataset": str(Path(opts.eval_dataset).resolve()) if opts.eval_dataset and Path(opts.eval_dataset).exists()
                 else opts.eval_dataset, "fraction": opts.eval_fraction, "steps": eval_steps,
                 "rows": len(data.eval_examples)} if data.eval_examples else None,
    }
    config["report_to"] = report_to  # not fixed by --resume: where the logs also go
    if saved and fingerprint(dataset) != saved.get("dataset"):
        echo(f"warning: {Path(dataset).name} changed since the run started (size or time): the data order may differ")
    write_json(out / RUN_CONFIG, config)
    if not opts.resume:
        from planner.documents import plan_document as plan_json

        write_json(out / PLAN_FILE, plan_file_doc(plan, src.spec, device, plan_json))
    return TrainingSession(opts, out, src, data.tokenizer, data.examples, plan, device, config, data.info, echo,
                           callbacks, eval_examples=data.eval_examples).run()


def resolve_report_to(choice: str | None) -> str:
    """--report-to: what the Trainer also logs to; None: tensorboard when it is installed, else none.
    A named integration that is not installed is a RunError (before any model is loaded)."""
    import importlib.util

    if choice is None:
        return "tensorboard" if importlib.util.find_spec("tensorboard") is not None else "none"
    if choice != "none" and importlib.util.find_spec(choice) is None:
        raise RunError(f"--report-to {choice}: {choice} is not installed (pip install {choice}), or pass --report-to none")
    return choice


def split_eval(examples: list, n: int, seed: int) -> tuple[list, list]:
    """(training, validation): n examples drawn with `seed` (the same split on --resume), both in data order."""
    import random

    if n <= 0:
        return examples, []
    held = set(random.Random(seed).sample(range(len(examples)), n))
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def prepare_data(opts: RunOptions, src: ModelSource, dataset: str, plan_doc: dict | None, echo) -> PreparedData:
    """Read the data, load the model's tokenizer and tokenize the rows, choose the sequence length (--seq-len,
    the plan's, or from the data's lengths), cut the rows to it and print what was read."""
    rows, fmt = qdata.load_rows(dataset, opts.fmt)
    tokenizer = load_tokenizer(src.ref)
    examples, data_notes = qdata.tokenize_rows(rows, fmt, tokenizer)
    lengths = [len(e) for e in examples]
    stats = qdata.length_stats(lengths)
    max_pos = src.spec.max_position_embeddings
    if opts.seq_len:
        seq_len, seq_from = opts.seq_len, "the saved run" if opts.resume else "--seq-len"
    elif plan_doc:
        seq_len, seq_from = int(plan_doc["settings"]["seq_len"]), "the plan"
    else:
        seq_len, seq_from = qdata.choose_seq_len(stats, max_pos), "chosen from the data"
    if seq_len > max_pos:
        raise RunError(f"--seq-len {seq_len} exceeds {src.spec.display_name}'s max_position_embeddings ({max_pos})")
    examples, dropped = qdata.truncate(examples, seq_len)
    if not examples:
        raise qdata.DataError(f"no example has a response within the first {seq_len} tokens: raise --seq-len")
    trunc = qdata.truncation_rate(lengths, seq_len)
    echo(f"data: {len(rows)} rows ({fmt}) from {Path(dataset).name}; tokens per row min {stats.min} / median "
         f"{stats.median} / p95 {stats.p95} / max {stats.max}")
    echo(f"      seq {seq_len} ({seq_from}): {trunc:.1%} of rows truncated"
         + (f", {dropped} dropped (no response left)" if dropped else "")
         + (f"; every row is padded to {seq_len} tokens (--padding max-length)" if opts.padding == "max-length" else ""))
    for n in data_notes:
        echo(f"      note: {n}")
    eval_examples: list = []
    eval_info = None
    if opts.eval_dataset:
        eval_rows, _ = qdata.load_rows(opts.eval_dataset, fmt)  # the training format: same template, same masking
        eval_examples, _ = qdata.tokenize_rows(eval_rows, fmt, tokenizer)
        eval_examples, _ = qdata.truncate(eval_examples, seq_len)
        if not eval_examples:
            raise qdata.DataError(f"--eval-dataset {opts.eval_dataset}: no row has a response within {seq_len} tokens")
        eval_info = {"source": Path(opts.eval_dataset).name, "rows": len(eval_rows), "examples": len(eval_examples)}
    elif (opts.num_gpus or 1) == 1:
        n_eval = eval_split_size(len(examples), opts.eval_fraction)
        if n_eval:
            examples, eval_examples = split_eval(examples, n_eval, opts.seed)
            eval_info = {"source": f"held back from the {len(examples) + n_eval} training rows, seed {opts.seed}",
                         "rows": n_eval, "examples": n_eval, "fraction": opts.eval_fraction}
    info = {"source": str(Path(dataset).resolve()) if Path(dataset).exists() else dataset, "format": fmt,
            "rows": len(rows), "examples": len(examples), "dropped_rows": dropped, "lengths": stats.as_dict(),
            "seq_len": seq_len, "seq_len_from": seq_from, "truncation_rate": round(trunc, 4), "notes": data_notes,
            "eval": eval_info}
    return PreparedData(dataset, fmt, seq_len, examples, info, tokenizer, eval_examples)
