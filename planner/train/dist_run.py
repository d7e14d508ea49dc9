"""`qfit run --num-gpus N`: the same run as on one GPU, spread over N processes by accelerate.

The parent (`run_multi`, in the `qfit run` process) checks everything, plans per GPU with
planner.multigpu, writes run_config.json, plan.json, job.json and the accelerate configuration
(planner.launch), and launches one rank per GPU (`accelerate launch ... -m planner.train.distributed`).
Each rank (`train_rank`) loads the model by its strategy's recipe (planner.train.distributed), trains
with transformers' Trainer (which wraps it in DDP or FSDP2 from accelerate's environment), measures its
own peak memory into rank<r>.json, and rank 0 saves the adapter. The parent then writes run_report.json
with every rank's measured peak next to the per-GPU prediction.

Out of memory on any rank: that rank writes oom.json and exits; the parent halves the micro-batch,
doubles gradient accumulation (the global batch is unchanged) and relaunches from the last checkpoint.
SIGINT/SIGTERM: the parent forwards SIGTERM to the ranks; they agree (an all-reduce of the flag after
every step) on the step to stop at, save a checkpoint there and exit; `qfit run --resume DIR` relaunches.

Module level is light (standard library and planner modules); torch and transformers load in the ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from planner import data as qdata
from planner.report import gib_str

JOB_FILE = "job.json"
ACCELERATE_FILE = "accelerate_config.json"
OOM_FILE = "oom.json"
RANK_FILE = "rank{rank}.json"
EXIT_OOM = 3


# --------------------------------------------------------------------------- rank side

def _stop_callback_class():
    from transformers import TrainerCallback

    class AgreedStop(TrainerCallback):
        """SIGINT/SIGTERM on any rank -> every rank saves after the same step and stops (all-reduce MAX of
        the flag after each step: one scalar, so ranks never disagree and hang in a collective)."""

        def __init__(self, stop):
            self.stop = stop

        def on_step_end(self, args, state, control, **kwargs):
            import torch
            import torch.distributed as dist

            flag = torch.tensor([1 if self.stop.signum is not None else 0],
                                device="cuda" if torch.cuda.is_available() else "cpu")
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if int(flag.item()) and state.global_step < state.max_steps:
                control.should_save = True
                control.should_training_stop = True
            return control

    return AgreedStop


def train_rank(job: dict) -> int:
    """One rank of `qfit run --num-gpus N` (launched by accelerate). Returns the process exit code."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, PrinterCallback, Trainer

    from planner.specs import LoraSettings, TrainSettings
    from planner.train import stack
    from planner.train.distributed import load_for_strategy, nvml_index, rank_info, training_args
    from planner.train.runner import PadCollator, StopFlag, _ExampleDataset, callback_classes, is_cuda_oom

    rank, local_rank, world = rank_info()
    cuda = torch.cuda.is_available()
    out = Path(job["out"])
    config = json.loads((out / "run_config.json").read_text())
    s = config["settings"]
    lora = LoraSettings(rank=s["rank"], alpha=s["alpha"], dropout=s["lora_dropout"], targets=tuple(s["targets"]))
    train = TrainSettings(batch_size=s["batch_size"], grad_accum=s["grad_accum"], seq_len=config["seq_len"],
                          gradient_checkpointing=s["gradient_checkpointing"], optim=s["optim"],
                          compute_dtype=s["compute_dtype"], double_quant=s["double_quant"],
                          expandable_segments=s.get("expandable_segments", True))
    strategy = config["strategy"]
    measured: dict = {"rank": rank, "local_rank": local_rank, "world_size": world}
    if cuda:
        torch.cuda.set_device(local_rank)
        os.environ["QFIT_NVML_INDEX"] = str(nvml_index(local_rank))
        if job.get("budget_bytes"):  # an emulated smaller card (QFIT_EMULATE_GPU): cap this rank's allocator
            total = torch.cuda.get_device_properties(local_rank).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, job["budget_bytes"] / total), local_rank)
        torch.cuda.reset_peak_memory_stats()

    tokenizer = AutoTokenizer.from_pretrained(config["tokenizer"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "right"
    rows, fmt = qdata.load_rows(config["dataset"]["source"], config["format"])
    examples, _ = qdata.tokenize_rows(rows, fmt, tokenizer)
    examples, _ = qdata.truncate(examples, config["seq_len"])

    model = load_for_strategy(config["model"], strategy, train.compute_dtype, train.double_quant, local_rank,
                              train.gradient_checkpointing)
    if cuda:
        measured["load_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        measured["after_load_allocated_bytes"] = torch.cuda.memory_allocated()
    model = get_peft_model(model, stack.lora_config(lora, lora.targets))  # run_config holds the resolved names
    collator = PadCollator(tokenizer.pad_token_id, **({"pad_to": config["seq_len"]} if config.get("padding") == "max-length"
                                                     else {}))
    _, progress_cls = callback_classes()
    progress = progress_cls(collator, cuda, enabled=rank == 0 and job.get("progress", True))
    stop = StopFlag()
    stop.install()
    args = training_args(
        str(out), train, strategy, max_steps=config["max_steps"], learning_rate=config["learning_rate"],
        lr_scheduler_type="cosine", warmup_steps=config["warmup"], max_grad_norm=job["max_grad_norm"],
        save_strategy="steps", save_steps=config["save_steps"], save_total_limit=job["save_total_limit"],
        logging_strategy="steps", logging_steps=max(1, config["max_steps"] // 500), report_to=[],
        seed=config["seed"], disable_tqdm=True, include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=model, args=args, train_dataset=_ExampleDataset(examples), data_collator=collator,
                      processing_class=tokenizer, callbacks=[progress, _stop_callback_class()(stop)])
    trainer.remove_callback(PrinterCallback)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train(resume_from_checkpoint=job.get("resume_from"))
    except Exception as exc:
        if not is_cuda_oom(exc):
            raise
        (out / OOM_FILE).write_text(json.dumps({"rank": rank, "step": trainer.state.global_step,
                                                "message": str(exc).splitlines()[0][:200]}))
        progress.close()
        os._exit(EXIT_OOM)  # the other ranks are stuck in a collective: the launcher tears them down
    progress.close()
    if cuda:
        from planner.train.harness import nvml_used

        torch.cuda.synchronize()
        measured["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        measured["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        try:
            measured["nvml_used_bytes"] = nvml_used()[0]
        except Exception:  # NVML is a measurement extra
            pass
    history = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    measured.update(steps=trainer.state.global_step, steps_run=progress.steps_run, train_seconds=progress.train_seconds,
                    tokens=progress.train_tokens, padded_tokens=progress.train_padded_tokens,
                    wrapper=type(trainer.model_wrapped).__name__, stopped_by=stop.name or None, loss=history)
    completed = trainer.state.global_step >= config["max_steps"]
    if completed:
        if getattr(trainer, "is_fsdp_enabled", False):  # gather the adapter whole (peft's FSDP-QLoRA example does this)
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(out))  # rank 0 writes; under FSDP every rank takes part in gathering the state
        if rank == 0:
            tokenizer.save_pretrained(str(out))
    (out / RANK_FILE.format(rank=rank)).write_text(json.dumps(measured, indent=1))
    stop.restore()
    return 0


# --------------------------------------------------------------------------- parent side

def _launch(argv: list[str], env: dict, echo) -> int:
    """Run the launcher in its own process group; SIGINT/SIGTERM here become SIGTERM to the ranks."""
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    received = []

    def forward(signum, frame):
        received.append(signum)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
    if received:
        echo(f"stopped by {signal.Signals(received[0]).name}: the ranks saved a checkpoint")
        return 128 + received[0]
    return code


def _plan_multi(spec, device, req, n: int, strategy: str | None, cpu: bool):
    """The best per-GPU plan on n of this device; strategy None = DDP when it fits (no per-layer
    all-gather: faster), else FSDP. On the CPU only DDP exists (accelerate has no FSDP on the CPU)."""
    from planner.coefficients import load_coefficients
    from planner.multigpu import plan_multi
    from planner.train.runner import RunError

    coeffs = load_coefficients(None if cpu else device.spec.name)
    if cpu and strategy == "fsdp":
        raise RunError("--strategy fsdp needs CUDA GPUs (accelerate runs FSDP on GPUs only); use --strategy ddp on the CPU")
    order = [strategy] if strategy else (["ddp"] if cpu else ["ddp", "fsdp"])
    tried = []
    for strat in order:
        try:
            plans = plan_multi(spec, device.spec, req, coeffs, n, strat)
        except ValueError as exc:  # e.g. a bitsandbytes optimizer asked for under FSDP
            raise RunError(str(exc)) from None
        if plans and cpu:  # no speed model for a CPU: fewer, larger micro-batches without recompute run fastest
            best = plans[0]
            same = [p for p in plans if p.lora == best.lora and p.train.seq_len == best.train.seq_len]
            return min(same, key=lambda p: (p.train.gradient_checkpointing, -p.train.batch_size,
                                            p.train.optim != "adamw_torch")), tried
        if plans and plans[0].fits:
            return plans[0], tried
        if plans:
            tried.append(f"{strat}: the smallest setting needs {gib_str(min(p.memory.needs_bytes for p in plans))} GiB "
                         f"per GPU of {gib_str(device.spec.memory_bytes)} GiB")
    raise RunError(f"{spec.display_name} does not fit {n} x {device.spec.display_name} ({'; '.join(tried)}): "
                   "try more GPUs, a shorter --seq-len, a lower --rank or --gradient-checkpointing")


def run_multi(opts, saved: dict | None, plan_doc: dict | None, src, dataset: str, fmt: str, seq_len: int,
              n_examples: int, data_info: dict, echo):
    """`qfit run --num-gpus N` from the point where the data is checked: plan per GPU, launch, report."""
    import torch

    from planner.launch import accelerate_config, launch_argv, launch_command_text, write_config
    from planner.memory import resolve_targets
    from planner.multigpu import peak_allocated_per_gpu
    from planner.specs import settings_dict
    from planner.train import runner

    n = int(saved["num_gpus"] if saved else opts.num_gpus)  # GPUs (processes) on this machine
    machines = int(saved.get("num_machines", 1) if saved else (opts.num_machines or 1))
    world = n * machines  # ranks in all: the plan splits the effective batch over every one of them
    cpu = not torch.cuda.is_available()
    if not cpu and torch.cuda.device_count() < n:
        raise runner.RunError(f"--num-gpus {n}: only {torch.cuda.device_count()} CUDA GPU(s) visible "
                              "(CUDA_VISIBLE_DEVICES decides which)")
    device = runner.detect_device(multi=True)
    for note in device.notes:
        echo(f"note: {note}")
    if saved is not None:
        strategy = saved["strategy"]
        lora, train = runner._saved_settings(saved)
        settings = saved["settings"]
        predicted = saved.get("predicted_per_gpu", {})
    else:
        req, req_notes = runner.build_request(opts, plan_doc, seq_len)
        for note in req_notes:
            echo(f"note: {note}")
        plan, tried = _plan_multi(src.spec, device, req, world, opts.strategy, cpu)
        strategy, lora, train = plan.strategy, plan.lora, plan.train
        for note in tried + [x for x in plan.notes if "calibrat" not in x and "buckets" not in x]:
            echo(f"note: {note}")
        settings = settings_dict(lora, train, resolve_targets(src.spec, lora.targets))
        mem = plan.memory
        predicted = {"needs_bytes": mem.needs_bytes, "peak_allocated_bytes": peak_allocated_per_gpu(mem),
                     "peak_phase": mem.peak_phase}
        where = f"{machines} machines x {n}" if machines > 1 else f"{n}"
        echo(f"plan: {where} x {device.spec.display_name}, {strategy.upper()}: micro-batch {train.batch_size} x "
             f"accumulation {train.grad_accum} per GPU = global batch {world * train.effective_batch} · seq {train.seq_len} · "
             f"LoRA r{lora.rank} ({', '.join(lora.targets)}) · checkpointing {'on' if train.gradient_checkpointing else 'off'} · "
             f"{train.optim} · {train.compute_dtype}")
        echo(f"      per GPU needs {gib_str(mem.needs_bytes)} GiB of {gib_str(device.spec.memory_bytes)} GiB "
             f"({next((x for x in plan.notes if 'calibrat' in x), 'estimate')})")
    total_steps = saved["max_steps"] if saved else runner.planned_steps(n_examples, world * train.effective_batch,
                                                                         opts.epochs, opts.max_steps)
    out = runner.prepare_output(opts)
    config = saved or {
        "version": runner.CONFIG_VERSION, "model": src.ref, "model_name": src.spec.name, "demo": opts.demo,
        "tokenizer": src.ref, "dataset": runner._fingerprint(dataset), "format": fmt, "seq_len": seq_len,
        "max_steps": total_steps, "learning_rate": opts.learning_rate or runner.DEFAULT_LEARNING_RATE,
        "warmup": opts.warmup if opts.warmup is not None else runner.DEFAULT_WARMUP,
        "save_steps": opts.save_steps or runner.auto_save_steps(total_steps), "seed": opts.seed,
        "padding": opts.padding or "longest",
        "num_gpus": n, "num_machines": machines, "machine_rank": opts.machine_rank or 0,
        "main_process_ip": opts.main_process_ip, "main_process_port": opts.main_process_port or 29500,
        "strategy": strategy, "settings": settings, "predicted_per_gpu": predicted,
    }
    runner._write_json(out / runner.RUN_CONFIG, config)
    if not saved:
        runner._write_json(out / runner.PLAN_FILE, {"model": src.spec.name, "gpu": device.spec.name, "num_gpus": n,
                                                     "strategy": strategy, "settings": settings,
                                                     "num_machines": machines,
                                                     "global_batch": world * train.effective_batch,
                                                     "memory_per_gpu": predicted})
    # cpu_ram_efficient_loading off: transformers loads a quantized model whole on every rank anyway, and
    # accelerate's meta-device round trip of that path would drop bitsandbytes' quantization state
    acc = accelerate_config(strategy, world, compute_dtype=train.compute_dtype, model_type=src.spec.model_type, cpu=cpu,
                            num_machines=machines, machine_rank=config.get("machine_rank", 0),
                            main_process_ip=config.get("main_process_ip"),
                            main_process_port=config.get("main_process_port", 29500),
                            cpu_ram_efficient_loading=False, activation_checkpointing=False)
    write_config(out / ACCELERATE_FILE, acc)
    if opts.dry_run:
        job = {"mode": "train", "out": str(out), "resume_from": None, "max_grad_norm": runner.MAX_GRAD_NORM,
               "save_total_limit": runner.SAVE_TOTAL_LIMIT, "progress": opts.progress, "budget_bytes": 0}
        runner._write_json(out / JOB_FILE, job)
        cmd = launch_command_text(str(out / ACCELERATE_FILE), "planner.train.distributed", ["--job", str(out / JOB_FILE)],
                                  machine_rank=config.get("machine_rank", 0) if machines > 1 else None)
        echo(f"dry run: wrote {out / ACCELERATE_FILE} and {out / JOB_FILE}; the launch command"
             + (" (each machine runs it with its own --machine_rank; the data and model paths must exist there):"
                if machines > 1 else ":"))
        echo(f"  {cmd}")
        return runner.RunResult("planned", out, {"accelerate_config": acc}, exit_code=0)
    env = dict(os.environ)
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (it can take a shared host's GPUs down)
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    if train.expandable_segments and "PYTORCH_CUDA_ALLOC_CONF" not in env and not cpu:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    budget = _emulation_budget(device, strategy, config["settings"], src.spec, echo)
    events = list(saved.get("oom_events", [])) if saved else []
    resume_from = str(runner.last_checkpoint(out)) if saved and runner.last_checkpoint(out) else None
    echo(f"training: {config['max_steps']} steps of {n} x {train.effective_batch} rows on {n} "
         f"{'CPU processes (gloo)' if cpu else 'GPUs'}; checkpoint every {config['save_steps']} steps in {out}")
    t0 = time.perf_counter()
    while True:
        for f in out.glob("rank*.json"):
            f.unlink()
        (out / OOM_FILE).unlink(missing_ok=True)
        job = {"mode": "train", "out": str(out), "resume_from": resume_from, "max_grad_norm": runner.MAX_GRAD_NORM,
               "save_total_limit": runner.SAVE_TOTAL_LIMIT, "progress": opts.progress, "budget_bytes": budget}
        runner._write_json(out / JOB_FILE, job)
        code = _launch(launch_argv(str(out / ACCELERATE_FILE), "planner.train.distributed", ["--job", str(out / JOB_FILE)]),
                       env, echo)
        oom = out / OOM_FILE
        if code == 0 or not oom.is_file():
            break
        info = json.loads(oom.read_text())
        s = config["settings"]
        if s["batch_size"] < 2:
            raise runner.RunError(f"out of memory on rank {info['rank']} at micro-batch 1: try more GPUs, "
                                  "--gradient-checkpointing or a shorter --seq-len")
        mb, accum = runner.backoff(s["batch_size"], s["grad_accum"])
        ckpt = runner.last_checkpoint(out)
        resume_from = str(ckpt) if ckpt else None
        events.append({"rank": info["rank"], "step": info["step"] + 1, "message": info["message"],
                       "micro_batch_before": s["batch_size"], "grad_accum_before": s["grad_accum"],
                       "micro_batch_after": mb, "grad_accum_after": accum, "resumed_from": resume_from})
        s.update(batch_size=mb, grad_accum=accum)
        config["oom_events"] = events
        runner._write_json(out / runner.RUN_CONFIG, config)
        echo(f"out of memory on rank {info['rank']} (step {info['step'] + 1}): now micro-batch {mb} x accumulation "
             f"{accum} per GPU (global batch unchanged), "
             + (f"resuming from {Path(resume_from).name}" if resume_from else "starting from step 1") + "; no step lost")
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    if code != 0 and code < 128:
        raise runner.RunError(f"the distributed run failed (launcher exit code {code}); its output is above")
    return _report_multi(out, config, ranks, device, events, code, time.perf_counter() - t0, echo)


def _emulation_budget(device, strategy: str, settings: dict, spec, echo) -> int:
    """QFIT_EMULATE_GPU on every rank: each rank's allocator may hold the emulated card's memory less the
    CUDA context, the NCCL buffers and (DDP) the paged optimizer state, all outside torch's allocator."""
    if not getattr(device, "emulated_on", ""):
        return 0
    from planner.coefficients import load_coefficients
    from planner.memory import cuda_context_bytes, paged_state_bytes
    from planner.multigpu import nccl_buffer_bytes
    from planner.specs import LoraSettings, TrainSettings

    coeffs = load_coefficients(device.spec.name)
    s = settings
    lora = LoraSettings(rank=s["rank"], alpha=s["alpha"], dropout=s["lora_dropout"], targets=tuple(s["targets"]))
    train = TrainSettings(batch_size=s["batch_size"], grad_accum=s["grad_accum"], seq_len=s["seq_len"],
                          gradient_checkpointing=s["gradient_checkpointing"], optim=s["optim"],
                          compute_dtype=s["compute_dtype"], double_quant=s["double_quant"])
    paged = paged_state_bytes(spec, lora, train) if strategy == "ddp" else 0
    budget = device.spec.memory_bytes - cuda_context_bytes(coeffs) - nccl_buffer_bytes(coeffs) - paged
    echo(f"emulation: each rank's allocator capped at {gib_str(budget)} GiB ({device.spec.display_name} less CUDA "
         f"context, NCCL buffers and paged optimizer state)")
    return budget


def _report_multi(out: Path, config: dict, ranks: list[dict], device, events: list, code: int, seconds: float, echo):
    from planner.train import runner
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
                  "note": "non-padding tokens of all ranks over rank 0's training time"},
        "steps": {"planned": config["max_steps"], "completed": min((r["steps"] for r in ranks), default=0)},
        "oom_events": events,
        "loss": {"history": r0.get("loss", [])},
        "wall_seconds": round(seconds, 1),
        "library_versions": library_versions(),
    }
    if completed:
        report["adapter_dir"] = str(out)
    runner._write_json(out / runner.RUN_REPORT, report)
    hist = report["loss"]["history"]
    echo("")
    if not completed:
        ckpt = runner.last_checkpoint(out)
        echo(f"stopped at step {report['steps']['completed']} of {config['max_steps']}; checkpoint {ckpt}")
        echo(f"continue with: qfit run --resume {out}")
        return runner.RunResult("interrupted", out, report, exit_code=code or 1, checkpoint=str(ckpt) if ckpt else None)
    echo(f"done: {report['steps']['completed']} steps on {n} {'GPUs' if device.kind == 'cuda' else 'processes'} "
         f"({config['strategy'].upper()})" + (f", loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f}" if hist else "")
         + f", {report['speed']['tokens_per_s']:,.0f} tokens/s")
    for row in per_rank:
        if row.get("peak_allocated_bytes"):
            echo(f"rank {row['rank']}: peak {gib_str(row['peak_allocated_bytes'])} GiB allocated / "
                 f"{gib_str(row['peak_reserved_bytes'])} GiB reserved; predicted "
                 f"{gib_str(pred.get('peak_allocated_bytes', 0))} GiB allocated")
    echo(f"adapter: {out} (adapter_config.json, adapter_model.safetensors); report: {out / runner.RUN_REPORT}")
    return runner.RunResult("completed", out, report, exit_code=0, checkpoint=None)
