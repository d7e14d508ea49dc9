"""`qfit run --num-gpus N`, the parent side: the same run as on one GPU, spread over N processes by accelerate.

The parent (`run_multi`, in the `qfit run` process) checks everything, plans per GPU with
planner.multigpu, writes run_config.json, plan.json, job.json and the accelerate configuration
(planner.launch), and launches one rank per GPU (`accelerate launch ... -m planner.train.distributed`).
Each rank (planner.train.distributed.train_rank) loads the model by its strategy's recipe (planner.train.distributed), trains
with transformers' Trainer (which wraps it in DDP or FSDP2 from accelerate's environment), measures its
own peak memory into rank<r>.json, and rank 0 saves the adapter. The parent then writes run_report.json
with every rank's measured peak next to the per-GPU prediction.

Out of memory on any rank: that rank writes oom.json and exits; the parent applies the one back-off policy
(planner.train.oom.next_settings: the micro-batch halved, gradient accumulation doubled, the global batch
unchanged) and relaunches from the last checkpoint.
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

from planner.codec import settings_from_dict, settings_to_dict
from planner.report import gib_str
from planner.train.device import detect_device
from planner.train.oom import NoSmallerSettings, explain, next_settings
from planner.train.options import (
    DEFAULT_LEARNING_RATE,
    DEFAULT_WARMUP,
    MAX_GRAD_NORM,
    SAVE_TOTAL_LIMIT,
    PreparedData,
    RunError,
    RunOptions,
    RunResult,
)
from planner.train.output import (
    CONFIG_VERSION,
    OOM_FILE,
    PLAN_FILE,
    RUN_CONFIG,
    fingerprint,
    last_checkpoint,
    prepare_output,
    write_json,
)
from planner.train.planning import (
    auto_save_steps,
    build_request,
    choose_packing,
    plan_seq_len,
    planned_steps,
    training_items,
)
from planner.train.run_report import multi_report
from planner.train.source import ModelSource

JOB_FILE = "job.json"
ACCELERATE_FILE = "accelerate_config.json"


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


def _plan_multi(spec, device, req, n: int, strategy: str | None, cpu: bool, loading: str | None = None):
    """The best per-GPU plan on n of this device; strategy None = DDP when it fits (no per-layer
    all-gather: faster), else FSDP (loaded by `loading`, sharded by default), without CPU offload when a plan fits
    so, else with it. On the CPU only DDP exists (accelerate has no FSDP on the CPU)."""
    from planner.coefficients import load_coefficients
    from planner.multigpu import DEFAULT_LOADING, plan_multi

    coeffs = load_coefficients(None if cpu else device.spec.name)
    if cpu and strategy == "fsdp":
        raise RunError("--strategy fsdp needs CUDA GPUs (accelerate runs FSDP on GPUs only); use --strategy ddp on the CPU")
    order = [strategy] if strategy else (["ddp"] if cpu else ["ddp", "fsdp"])
    tries = [(s, off) for s in order for off in ((False, True) if s == "fsdp" else (False,))]
    tried = []
    for strat, offload in tries:
        kw = {"cpu_offload": offload, "loading": loading or DEFAULT_LOADING} if strat == "fsdp" else {}
        try:
            plans = plan_multi(spec, device.spec, req, coeffs, n, strat, **kw)
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
            tried.append(f"{strat}{' + CPU offload' if offload else ''}: the smallest setting needs "
                         f"{gib_str(min(p.memory.needs_bytes for p in plans))} GiB per GPU of {gib_str(device.spec.memory_bytes)} GiB")
    raise RunError(f"{spec.display_name} does not fit {n} x {device.spec.display_name} ({'; '.join(tried)}): "
                   "try more GPUs, a shorter --seq-len, a lower --rank or --gradient-checkpointing")


def run_multi(opts: RunOptions, saved: dict | None, plan_doc: dict | None, src: ModelSource, data: PreparedData,
              echo) -> RunResult:
    """`qfit run --num-gpus N` from the point where the data is checked: plan per GPU, launch, report."""
    import torch

    from planner.launch import accelerate_config, launch_argv, launch_command_text, write_config
    from planner.memory import resolve_targets
    from planner.multigpu import peak_allocated_per_gpu

    n = int(saved["num_gpus"] if saved else opts.num_gpus)  # GPUs (processes) on this machine
    machines = int(saved.get("num_machines", 1) if saved else (opts.num_machines or 1))
    world = n * machines  # ranks in all: the plan splits the effective batch over every one of them
    cpu = not torch.cuda.is_available()
    if not cpu and torch.cuda.device_count() < n:
        raise RunError(f"--num-gpus {n}: only {torch.cuda.device_count()} CUDA GPU(s) visible "
                              "(CUDA_VISIBLE_DEVICES decides which)")
    device = detect_device(multi=True)
    for note in device.notes:
        echo(f"note: {note}")
    packing = choose_packing(opts, saved, data.examples, data.seq_len)
    plan_seq = plan_seq_len(data.examples, data.seq_len, packing, opts.padding)
    if saved is not None:
        strategy = saved["strategy"]
        lora, train = settings_from_dict(saved["settings"])
        settings = saved["settings"]
        predicted = saved.get("predicted_per_gpu", {})
    else:
        req, req_notes = build_request(opts, plan_doc, plan_seq, packing)
        for note in req_notes:
            echo(f"note: {note}")
        plan, tried = _plan_multi(src.spec, device, req, world, opts.strategy, cpu, opts.loading)
        strategy, lora, train = plan.strategy, plan.lora, plan.train
        for note in tried + [x for x in plan.notes if "calibrat" not in x and "buckets" not in x]:
            echo(f"note: {note}")
        settings = settings_to_dict(lora, train, resolve_targets(src.spec, lora.targets))
        mem = plan.memory
        predicted = {"needs_bytes": mem.needs_bytes, "peak_allocated_bytes": peak_allocated_per_gpu(mem),
                     "peak_phase": mem.peak_phase}
        if strategy == "fsdp":
            predicted.update(load_needs_bytes=mem.load_needs_bytes, loading=mem.loading, cpu_offload=mem.cpu_offload,
                             cpu_ram_per_node_bytes=mem.cpu_ram.total_bytes)
        where = f"{machines} machines x {n}" if machines > 1 else f"{n}"
        echo(f"plan: {where} x {device.spec.display_name}, {strategy.upper()}: micro-batch {train.batch_size} x "
             f"accumulation {train.grad_accum} per GPU = global batch {world * train.effective_batch} · seq {train.seq_len} · "
             f"LoRA r{lora.rank} ({', '.join(lora.targets)}) · checkpointing {'on' if train.gradient_checkpointing else 'off'} · "
             f"{train.optim} · {train.compute_dtype}")
        echo(f"      per GPU needs {gib_str(mem.needs_bytes)} GiB of {gib_str(device.spec.memory_bytes)} GiB "
             f"({next((x for x in plan.notes if 'calibrat' in x), 'estimate')})")
        if strategy == "fsdp":
            echo(f"      FSDP loading {mem.loading}, CPU offload {'on' if mem.cpu_offload else 'off'}; CPU RAM per node "
                 f"{gib_str(mem.cpu_ram.total_bytes)} GiB (estimate)")
    items = training_items(data, packing, opts.padding, plan_seq, echo)
    total_steps = saved["max_steps"] if saved else planned_steps(items, world * train.effective_batch,
                                                                 opts.epochs, opts.max_steps)
    out = prepare_output(opts)
    config = saved or {
        "version": CONFIG_VERSION, "model": src.ref, "model_name": src.spec.name, "demo": opts.demo,
        "tokenizer": src.ref, "dataset": fingerprint(data.path), "format": data.fmt, "seq_len": data.seq_len,
        "max_steps": total_steps, "learning_rate": opts.learning_rate or DEFAULT_LEARNING_RATE,
        "warmup": opts.warmup if opts.warmup is not None else DEFAULT_WARMUP,
        "save_steps": opts.save_steps or auto_save_steps(total_steps), "seed": opts.seed,
        "scheduler": opts.scheduler or "cosine",
        "padding": opts.padding or "longest", "packing": packing,
        "num_gpus": n, "num_machines": machines, "machine_rank": opts.machine_rank or 0,
        "main_process_ip": opts.main_process_ip, "main_process_port": opts.main_process_port or 29500,
        "strategy": strategy, "settings": settings, "predicted_per_gpu": predicted,
        "loading": predicted.get("loading"), "cpu_offload": bool(predicted.get("cpu_offload", False)),
    }
    write_json(out / RUN_CONFIG, config)
    if not saved:
        write_json(out / PLAN_FILE, {"model": src.spec.name, "gpu": device.spec.name, "num_gpus": n,
                                     "strategy": strategy, "settings": settings, "num_machines": machines,
                                     "global_batch": world * train.effective_batch, "memory_per_gpu": predicted})
    # cpu_ram_efficient_loading off: transformers loads a quantized model whole on every rank anyway, and
    # accelerate's meta-device round trip of that path would drop bitsandbytes' quantization state. With loading
    # "sharded" the rank hands the Trainer a model already under fully_shard, which accelerate leaves as it is.
    acc = accelerate_config(strategy, world, compute_dtype=train.compute_dtype, model_type=src.spec.model_type, cpu=cpu,
                            cpu_offload=bool(config.get("cpu_offload", False)),
                            num_machines=machines, machine_rank=config.get("machine_rank", 0),
                            main_process_ip=config.get("main_process_ip"),
                            main_process_port=config.get("main_process_port", 29500),
                            cpu_ram_efficient_loading=False, activation_checkpointing=False)
    write_config(out / ACCELERATE_FILE, acc)
    if opts.dry_run:
        job = {"mode": "train", "out": str(out), "resume_from": None, "max_grad_norm": MAX_GRAD_NORM,
               "save_total_limit": SAVE_TOTAL_LIMIT, "progress": opts.progress, "budget_bytes": 0}
        write_json(out / JOB_FILE, job)
        cmd = launch_command_text(str(out / ACCELERATE_FILE), "planner.train.distributed", ["--job", str(out / JOB_FILE)],
                                  machine_rank=config.get("machine_rank", 0) if machines > 1 else None)
        echo(f"dry run: wrote {out / ACCELERATE_FILE} and {out / JOB_FILE}; the launch command"
             + (" (each machine runs it with its own --machine_rank; the data and model paths must exist there):"
                if machines > 1 else ":"))
        echo(f"  {cmd}")
        return RunResult("planned", out, {"accelerate_config": acc}, exit_code=0)
    env = dict(os.environ)
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (it can take a shared host's GPUs down)
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    if train.expandable_segments and "PYTORCH_CUDA_ALLOC_CONF" not in env and not cpu:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    budget = _emulation_budget(device, strategy, config["settings"], src.spec, echo)
    events = list(saved.get("oom_events", [])) if saved else []
    resume_from = str(last_checkpoint(out)) if saved and last_checkpoint(out) else None
    echo(f"training: {config['max_steps']} steps of {n} x {train.effective_batch} rows on {n} "
         f"{'CPU processes (gloo)' if cpu else 'GPUs'}; checkpoint every {config['save_steps']} steps in {out}")
    t0 = time.perf_counter()
    while True:
        for f in out.glob("rank*.json"):
            f.unlink()
        (out / OOM_FILE).unlink(missing_ok=True)
        job = {"mode": "train", "out": str(out), "resume_from": resume_from, "max_grad_norm": MAX_GRAD_NORM,
               "save_total_limit": SAVE_TOTAL_LIMIT, "progress": opts.progress, "budget_bytes": budget}
        write_json(out / JOB_FILE, job)
        code = _launch(launch_argv(str(out / ACCELERATE_FILE), "planner.train.distributed", ["--job", str(out / JOB_FILE)]),
                       env, echo)
        oom = out / OOM_FILE
        if code == 0 or not oom.is_file():
            break
        info = json.loads(oom.read_text())
        ckpt = last_checkpoint(out)
        resume_from = str(ckpt) if ckpt else None
        s = config["settings"]
        _, current = settings_from_dict(s)
        try:
            train, record = next_settings(current, {"rank": info["rank"], "step": info["step"] + 1,
                                                    "message": info["message"], "resumed_from": resume_from})
        except NoSmallerSettings:
            raise RunError(f"out of memory on rank {info['rank']} at micro-batch 1: try more GPUs, "
                           "--gradient-checkpointing or a shorter --seq-len") from None
        events.append(record)
        s.update(batch_size=train.batch_size, grad_accum=train.grad_accum)
        config["oom_events"] = events
        write_json(out / RUN_CONFIG, config)
        echo(explain(record))
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    if code != 0 and code < 128:
        raise RunError(f"the distributed run failed (launcher exit code {code}); its output is above")
    return multi_report(out, config, ranks, device, events, code, time.perf_counter() - t0, echo)


def _emulation_budget(device, strategy: str, settings: dict, spec, echo) -> int:
    """QFIT_EMULATE_GPU on every rank: each rank's allocator may hold the emulated card's memory less the
    CUDA context, the NCCL buffers and (DDP) the paged optimizer state, all outside torch's allocator."""
    if not getattr(device, "emulated_on", ""):
        return 0
    from planner.coefficients import load_coefficients
    from planner.memory import cuda_context_bytes, paged_state_bytes
    from planner.multigpu import nccl_buffer_bytes

    coeffs = load_coefficients(device.spec.name)
    lora, train = settings_from_dict(settings)
    paged = paged_state_bytes(spec, lora, train) if strategy == "ddp" else 0
    budget = device.spec.memory_bytes - cuda_context_bytes(coeffs) - nccl_buffer_bytes(coeffs) - paged
    echo(f"emulation: each rank's allocator capped at {gib_str(budget)} GiB ({device.spec.display_name} less CUDA "
         f"context, NCCL buffers and paged optimizer state)")
    return budget
