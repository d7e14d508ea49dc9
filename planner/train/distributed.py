"""One rank of a multi-GPU QLoRA job: DDP or FSDP2, through accelerate, on the real stack (the entry point
of every rank: `qfit run --num-gpus N`'s training and the distributed calibration sweep).

Launched once per GPU by `accelerate launch --config_file <planner.launch config> -m planner.train.distributed
--job JOB.json` (planner.launch builds both). accelerate sets the process group up (NCCL on GPUs, gloo on
the CPU) and the environment that makes transformers' Trainer wrap the model in DDP or FSDP2.

The two loading recipes differ, and the difference is part of what is measured:
  ddp   every rank loads the whole model as on one GPU: from_pretrained(BitsAndBytesConfig) on its own GPU,
        prepare_model_for_kbit_training (fp32 upcast of embeddings, norms, lm_head), LoRA.
  fsdp  the FSDP-QLoRA recipe (bitsandbytes docs, fsdp_qlora.md): bnb_4bit_quant_storage = the compute
        dtype and dtype = the compute dtype, so the 4-bit weights flatten and shard with the rest; no
        fp32 upcast. Two loadings (run_config.json's "loading"):
          sharded (default) planner.train.sharded_load: built on meta, LoRA added, fully_shard per decoder layer
                  and root (CPUOffloadPolicy when the plan offloads), then the checkpoint streamed tensor by tensor,
                  each rank quantizing it and keeping its chunk; the Trainer gets the FSDP2 module as it is
                  (accelerate's fsdp2_prepare_model returns an FSDPModule unchanged) and rank 0 saves the adapter
                  from the gathered LoRA weights only.
          full    transformers loads a quantized model whole on each rank's GPU before FSDP shards it.

mode "train" (`qfit run --num-gpus N`, launched by planner.train.dist_run): train_rank loads the model by its
strategy's recipe, trains with the Trainer, writes rank<r>.json with its measured peaks (oom.json and exit code
EXIT_OOM on an out-of-memory error: the parent backs off and relaunches), and rank 0 saves the adapter.

mode "measure" (calibration, planner.train.dist_sweep): for each configuration of the job, load, wrap, train `steps` optimizer
steps on full-length random sequences, and write this rank's row (harness.FIELDS + strategy, world size,
rank) to <out>/rank<r>.csv. The model is loaded afresh for every configuration (FSDP wraps in place), so
no configuration inherits another's memory. An OOM is a row.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from planner import data as qdata
from planner.codec import settings_from_dict
from planner.memory import resolve_targets
from planner.profiles import load_model
from planner.specs import LoraSettings, TrainSettings
from planner.train import stack
from planner.train.harness import FIELDS, record_failure, record_success
from planner.train.measure import nvml_used, peak_snapshot
from planner.train.oom import is_cuda_oom
from planner.train.options import LOG_POINTS, one_line
from planner.train.output import OOM_FILE, RANK_FILE, RUN_CONFIG
from planner.train.source import load_tokenizer
from planner.train.trainer_glue import SCHEDULER_TYPES, StopFlag, callback_classes, dataset_and_collator

EXIT_OOM = 3  # a rank's exit code after an out-of-memory error (it wrote OOM_FILE)
DIST_FIELDS = ("strategy", "world_size", "rank_index", "nvml_index", "wrapper", "after_train_allocated_bytes",
               "sharded_param_bytes") + FIELDS


def rank_info() -> tuple[int, int, int]:
    """(global rank, local rank, world size) from the launcher's environment."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")))


def nvml_index(local_rank: int) -> int:
    """NVML numbers every GPU; CUDA_VISIBLE_DEVICES maps this rank's CUDA device to it."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        parts = [p.strip() for p in env.split(",")]
        if local_rank < len(parts) and parts[local_rank].isdigit():
            return int(parts[local_rank])
    return local_rank


def load_for_strategy(path: str, strategy: str, compute_dtype: str, double_quant: bool, local_rank: int,
                      gradient_checkpointing: bool):
    """The model as each strategy's recipe loads it (see the module docstring)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    if strategy == "ddp":
        return stack.load_4bit(path, compute_dtype, double_quant, device_map={"": local_rank} if cuda else None)
    dtype = stack.TORCH_DTYPES[compute_dtype]
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                             bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=dtype)
    model.config.use_cache = False
    if gradient_checkpointing:  # the embeddings' output must require grad for checkpointed layers to backprop
        model.enable_input_require_grads()
    return model


def training_args(out: str, train: TrainSettings, strategy: str, **extra):
    """stack.training_arguments plus what distributed training needs: non-reentrant checkpointing (works
    under DDP and FSDP) and, under DDP, no search for unused parameters (every LoRA weight gets a grad)."""
    more = {"gradient_checkpointing_kwargs": {"use_reentrant": False}} if train.gradient_checkpointing else {}
    if strategy == "ddp":
        more["ddp_find_unused_parameters"] = False
    return stack.training_arguments(out, train, **more, **extra)


# the sweep's job (planner.train.dist_sweep) names settings briefly; the codec's keys for them
SWEEP_KEYS = {"batch": "batch_size", "seq": "seq_len", "accum": "grad_accum", "ckpt": "gradient_checkpointing",
              "dq": "double_quant", "dtype": "compute_dtype"}


def sweep_settings(cfg: dict) -> tuple[LoraSettings, TrainSettings]:
    """A sweep configuration -> settings, through the one codec (alpha 2 x rank, dropout 0.05, accumulation 2,
    bf16, double quant unless given; expandable segments as this process's PYTORCH_CUDA_ALLOC_CONF says)."""
    d = {"alpha": 2 * cfg["rank"], "lora_dropout": 0.05, "grad_accum": 2, "compute_dtype": "bf16", "double_quant": True}
    d.update({SWEEP_KEYS.get(k, k): v for k, v in cfg.items()})
    return settings_from_dict(d, expandable_segments="expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))


def measure_one(job: dict, cfg: dict, env: dict, outdir: str) -> dict:
    """Load, wrap, train a few steps; this rank's memory and speed. Never raises for an OOM or a failure."""
    from peft import get_peft_model
    from transformers import Trainer


    rank, local_rank, world = rank_info()
    cuda = torch.cuda.is_available()
    spec = load_model(job["model"])
    lora, train = sweep_settings(cfg)
    strategy = job["strategy"]
    row = {**env, "model": job["model"], "compute_dtype": train.compute_dtype, "double_quant": train.double_quant,
           "batch_size": train.batch_size, "grad_accum": train.grad_accum, "seq_len": train.seq_len,
           "gradient_checkpointing": train.gradient_checkpointing, "rank": lora.rank, "alpha": lora.alpha,
           "lora_dropout": lora.dropout, "targets": cfg["targets"], "optim": train.optim, "status": "ok", "error": "",
           "budget_bytes": int(cfg.get("budget", 0)), "strategy": strategy, "world_size": world, "rank_index": rank}
    row["run_id"] = (f"{strategy}{world}|{job['model']}|{train.compute_dtype}|dq{int(train.double_quant)}|"
                     f"b{train.batch_size}x{train.grad_accum}|s{train.seq_len}|ckpt{int(train.gradient_checkpointing)}|"
                     f"r{lora.rank}|{cfg['targets']}|{train.optim}|{env['alloc_conf'] or 'default'}|cap{row['budget_bytes']}"
                     + ("|ramload" if cfg.get("ram_efficient") else "") + ("|sharded" if cfg.get("loading") == "sharded" else ""))
    if cuda:
        total = torch.cuda.get_device_properties(local_rank).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, row["budget_bytes"] / total) if row["budget_bytes"] else 1.0,
                                                   local_rank)
        torch.cuda.reset_peak_memory_stats()
    model = trainer = None
    try:
        sharded = strategy == "fsdp" and cfg.get("loading") == "sharded"
        if sharded:  # planner.train.sharded_load: LoRA added and the model under fully_shard before the weights stream in
            from planner.train.sharded_load import load_sharded

            model = load_sharded(job["model_path"], stack.lora_config(lora, resolve_targets(spec, lora.targets)),
                                 compute_dtype=stack.TORCH_DTYPES[train.compute_dtype], double_quant=train.double_quant,
                                 gradient_checkpointing=train.gradient_checkpointing)
        else:
            model = load_for_strategy(job["model_path"], strategy, train.compute_dtype, train.double_quant, local_rank,
                                      train.gradient_checkpointing)
        if cuda:
            row["load_peak_allocated_bytes"] = peak_snapshot(sync=False)["peak_allocated_bytes"]
            row["after_load_allocated_bytes"] = torch.cuda.memory_allocated()
        if not sharded:
            model = get_peft_model(model, stack.lora_config(lora, resolve_targets(spec, lora.targets)))
        if cuda:
            row["after_wrap_allocated_bytes"] = torch.cuda.memory_allocated()
        steps = int(job.get("steps", 2))
        ds = stack.FixedLengthDataset(train.batch_size * train.grad_accum * steps * world, train.seq_len,
                                      spec.vocab_size, seed=rank)
        timer = stack.StepTimer()
        # the sharded loader turned checkpointing on before fully_shard: the Trainer must not wrap the layers again
        args = training_args(outdir, replace(train, gradient_checkpointing=False) if sharded else train, strategy,
                             max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant")
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[timer])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        row["wrapper"] = type(trainer.model_wrapped).__name__  # DistributedDataParallel, or the FSDP2 module class
        if cuda:  # what stays resident between steps, and what this rank's parameters hold (local shards under FSDP)
            torch.cuda.synchronize()
            row["after_train_allocated_bytes"] = torch.cuda.memory_allocated()
            row["sharded_param_bytes"] = sum(
                (p.to_local() if hasattr(p, "to_local") else p).untyped_storage().nbytes() for p in trainer.model_wrapped.parameters())
        record_success(row, timer, train, cuda)
    except Exception as exc:  # an OOM or a failed configuration is a data row too
        record_failure(row, exc, cuda)
    finally:
        if trainer is not None:
            trainer.accelerator.free_memory()
        del trainer, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            row["leak_bytes"] = torch.cuda.memory_allocated()
            torch.cuda.set_per_process_memory_fraction(1.0, local_rank)
    return row


def measure(job: dict) -> int:
    import torch.distributed as dist

    rank, local_rank, world = rank_info()
    cuda = torch.cuda.is_available()
    idx = nvml_index(local_rank)
    os.environ["QFIT_NVML_INDEX"] = str(idx)  # measure.nvml_used reads this rank's GPU
    env = {**stack.library_versions(), "date": time.strftime("%Y-%m-%d"), "gpu_name": "cpu", "gpu_total_bytes": 0,
           "driver": "", "nvml_baseline_bytes": 0, "context_bytes": 0, "nvml_index": idx,
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    if cuda:
        torch.cuda.set_device(local_rank)
        env["nvml_baseline_bytes"], env["gpu_name"], env["driver"] = nvml_used()
        torch.zeros(1, device="cuda")
        env["gpu_total_bytes"] = torch.cuda.get_device_properties(local_rank).total_memory
        env["context_bytes"] = nvml_used()[0] - env["nvml_baseline_bytes"] - torch.cuda.memory_reserved()
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"rank{rank}.csv"
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=DIST_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for i, cfg in enumerate(job["configs"]):
            row = measure_one(job, cfg, env, str(out / f"trainer-{rank}-{i}"))
            writer.writerow(row)
            fh.flush()
            print(f"[dist rank {rank}/{world}] {row['run_id']}: {row['status']} load_peak={row.get('load_peak_allocated_bytes')} "
                  f"after_load={row.get('after_load_allocated_bytes')} peak_alloc={row.get('peak_allocated_bytes')} "
                  f"reserved={row.get('peak_reserved_bytes')} nvml={row.get('nvml_used_bytes')} "
                  f"tok/s={row.get('tokens_per_s')} {row.get('error', '')}", flush=True)
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
    return 0


# --------------------------------------------------------------------------- mode "train": one rank of qfit run

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
    from peft import get_peft_model
    from transformers import PrinterCallback, Trainer

    rank, local_rank, world = rank_info()
    cuda = torch.cuda.is_available()
    out = Path(job["out"])
    config = json.loads((out / RUN_CONFIG).read_text())
    lora, train = settings_from_dict(config["settings"], seq_len=config["seq_len"])
    strategy = config["strategy"]
    measured: dict = {"rank": rank, "local_rank": local_rank, "world_size": world}
    if cuda:
        torch.cuda.set_device(local_rank)
        os.environ["QFIT_NVML_INDEX"] = str(nvml_index(local_rank))
        if job.get("budget_bytes"):  # an emulated smaller card (QFIT_EMULATE_GPU): cap this rank's allocator
            total = torch.cuda.get_device_properties(local_rank).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, job["budget_bytes"] / total), local_rank)
        torch.cuda.reset_peak_memory_stats()

    tokenizer = load_tokenizer(config["tokenizer"])  # the parent loaded it already: no error is new here
    rows, fmt = qdata.load_rows(config["dataset"]["source"], config["format"])
    examples, _ = qdata.tokenize_rows(rows, fmt, tokenizer)
    examples, _ = qdata.truncate(examples, config["seq_len"])

    sharded = strategy == "fsdp" and config.get("loading") == "sharded"
    if sharded:  # LoRA is added on the meta model, before fully_shard: FSDP2 shards it and reduce-scatters its grads
        from planner.train.sharded_load import load_sharded

        stats: dict = {}
        model = load_sharded(config["model"], stack.lora_config(lora, lora.targets),
                             compute_dtype=stack.TORCH_DTYPES[train.compute_dtype], double_quant=train.double_quant,
                             cpu_offload=bool(config.get("cpu_offload")), gradient_checkpointing=train.gradient_checkpointing,
                             lora_seed=config["seed"], stats=stats)
        measured["loader_largest_read_bytes"] = stats["largest_read_bytes"]
    else:
        model = load_for_strategy(config["model"], strategy, train.compute_dtype, train.double_quant, local_rank,
                                  train.gradient_checkpointing)
    if cuda:
        measured["load_peak_allocated_bytes"] = peak_snapshot(sync=False)["peak_allocated_bytes"]
        measured["after_load_allocated_bytes"] = torch.cuda.memory_allocated()
    if not sharded:
        model = get_peft_model(model, stack.lora_config(lora, lora.targets))  # run_config holds the resolved names
    dataset, collator = dataset_and_collator(examples, tokenizer.pad_token_id, config)  # packed rows when config['packing']
    _, progress_cls = callback_classes()
    progress = progress_cls(collator, cuda, enabled=rank == 0 and job.get("progress", True))
    stop = StopFlag()
    stop.install()
    # the sharded loader turned checkpointing on before fully_shard; the Trainer must not wrap the layers again
    args = training_args(
        str(out), replace(train, gradient_checkpointing=False) if sharded else train, strategy, max_steps=config["max_steps"], learning_rate=config["learning_rate"],
        lr_scheduler_type=SCHEDULER_TYPES[config.get("scheduler", "cosine")],
        warmup_steps=config["warmup"], max_grad_norm=job["max_grad_norm"],
        save_strategy="steps", save_steps=config["save_steps"], save_total_limit=job["save_total_limit"],
        logging_strategy="steps", logging_steps=max(1, config["max_steps"] // LOG_POINTS), report_to=[],
        seed=config["seed"], disable_tqdm=True, include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
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
                                                "message": one_line(exc)}))
        progress.close()
        os._exit(EXIT_OOM)  # the other ranks are stuck in a collective: the launcher tears them down
    progress.close()
    if cuda:
        measured.update(peak_snapshot(nvml=True))  # NVML is a measurement extra: left out when unreadable
    history = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    measured.update(steps=trainer.state.global_step, steps_run=progress.steps_run, train_seconds=progress.train_seconds,
                    tokens=progress.train_tokens, padded_tokens=progress.train_padded_tokens,
                    wrapper=type(trainer.model_wrapped).__name__, stopped_by=stop.name or None, loss=history)
    completed = trainer.state.global_step >= config["max_steps"]
    if completed and sharded:
        from planner.train.sharded_load import save_adapter

        save_adapter(trainer.model_wrapped, out, rank)  # gathers the LoRA weights only, never the 4-bit base
        if rank == 0:
            tokenizer.save_pretrained(str(out))
    elif completed:
        if getattr(trainer, "is_fsdp_enabled", False):  # gather the adapter whole (peft's FSDP-QLoRA example does this)
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(out))  # rank 0 writes; under FSDP every rank takes part in gathering the state
        if rank == 0:
            tokenizer.save_pretrained(str(out))
    (out / RANK_FILE.format(rank=rank)).write_text(json.dumps(measured, indent=1))
    stop.restore()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", required=True, help="the job file (JSON) written by the launcher")
    args = ap.parse_args(argv)
    job = json.loads(Path(args.job).read_text())
    if job["mode"] not in ("measure", "train"):
        raise SystemExit(f"unknown mode {job['mode']!r}")
    try:
        if job["mode"] == "measure":
            return measure(job)
        return train_rank(job)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # without it a rank can abort at exit
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
