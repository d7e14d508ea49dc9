"""One rank of a multi-GPU QLoRA job: DDP or FSDP2, through accelerate, on the real stack.

Launched once per GPU by `accelerate launch --config_file <planner.launch config> -m planner.train.distributed
--job JOB.json` (planner.launch builds both). accelerate sets the process group up (NCCL on GPUs, gloo on
the CPU) and the environment that makes transformers' Trainer wrap the model in DDP or FSDP2.

The two loading recipes differ, and the difference is part of what is measured:
  ddp   every rank loads the whole model as on one GPU: from_pretrained(BitsAndBytesConfig) on its own GPU,
        prepare_model_for_kbit_training (fp32 upcast of embeddings, norms, lm_head), LoRA.
  fsdp  the FSDP-QLoRA recipe (bitsandbytes docs, fsdp_qlora.md): bnb_4bit_quant_storage = the compute
        dtype and dtype = the compute dtype, so the 4-bit weights flatten and shard with the rest; no
        fp32 upcast. transformers loads a quantized model whole on each rank's GPU before FSDP shards it.

mode "measure" (calibration): for each configuration of the job, load, wrap, train `steps` optimizer
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
from pathlib import Path

import torch

from planner.memory import resolve_targets
from planner.profiles import load_model
from planner.specs import LoraSettings, TrainSettings
from planner.train import stack
from planner.train.harness import FIELDS, record_failure, record_success

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


def _settings(cfg: dict) -> tuple[LoraSettings, TrainSettings]:
    lora = LoraSettings(rank=cfg["rank"], alpha=2 * cfg["rank"], dropout=0.05, targets=(cfg["targets"],))
    train = TrainSettings(batch_size=cfg["batch"], grad_accum=cfg.get("accum", 2), seq_len=cfg["seq"],
                          gradient_checkpointing=cfg["ckpt"], optim=cfg["optim"], compute_dtype=cfg.get("dtype", "bf16"),
                          double_quant=cfg.get("dq", True),
                          expandable_segments="expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    return lora, train


def measure_one(job: dict, cfg: dict, env: dict, outdir: str) -> dict:
    """Load, wrap, train a few steps; this rank's memory and speed. Never raises for an OOM or a failure."""
    from peft import get_peft_model
    from transformers import Trainer


    rank, local_rank, world = rank_info()
    cuda = torch.cuda.is_available()
    spec = load_model(job["model"])
    lora, train = _settings(cfg)
    strategy = job["strategy"]
    row = {**env, "model": job["model"], "compute_dtype": train.compute_dtype, "double_quant": train.double_quant,
           "batch_size": train.batch_size, "grad_accum": train.grad_accum, "seq_len": train.seq_len,
           "gradient_checkpointing": train.gradient_checkpointing, "rank": lora.rank, "alpha": lora.alpha,
           "lora_dropout": lora.dropout, "targets": cfg["targets"], "optim": train.optim, "status": "ok", "error": "",
           "budget_bytes": int(cfg.get("budget", 0)), "strategy": strategy, "world_size": world, "rank_index": rank}
    row["run_id"] = (f"{strategy}{world}|{job['model']}|{train.compute_dtype}|dq{int(train.double_quant)}|"
                     f"b{train.batch_size}x{train.grad_accum}|s{train.seq_len}|ckpt{int(train.gradient_checkpointing)}|"
                     f"r{lora.rank}|{cfg['targets']}|{train.optim}|{env['alloc_conf'] or 'default'}|cap{row['budget_bytes']}"
                     + ("|ramload" if cfg.get("ram_efficient") else ""))
    if cuda:
        total = torch.cuda.get_device_properties(local_rank).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, row["budget_bytes"] / total) if row["budget_bytes"] else 1.0,
                                                   local_rank)
        torch.cuda.reset_peak_memory_stats()
    model = trainer = None
    try:
        model = load_for_strategy(job["model_path"], strategy, train.compute_dtype, train.double_quant, local_rank,
                                  train.gradient_checkpointing)
        if cuda:
            row["load_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            row["after_load_allocated_bytes"] = torch.cuda.memory_allocated()
        model = get_peft_model(model, stack.lora_config(lora, resolve_targets(spec, lora.targets)))
        if cuda:
            row["after_wrap_allocated_bytes"] = torch.cuda.memory_allocated()
        steps = int(job.get("steps", 2))
        ds = stack.FixedLengthDataset(train.batch_size * train.grad_accum * steps * world, train.seq_len,
                                      spec.vocab_size, seed=rank)
        timer = stack.StepTimer()
        args = training_args(outdir, train, strategy, max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant")
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

    from planner.train.harness import nvml_used

    rank, local_rank, world = rank_info()
    cuda = torch.cuda.is_available()
    idx = nvml_index(local_rank)
    os.environ["QFIT_NVML_INDEX"] = str(idx)  # harness.nvml_used reads this rank's GPU
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
        from planner.train.dist_run import train_rank

        return train_rank(job)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # without it a rank can abort at exit
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
