"""Throughput sweep: time QLoRA training steps on a CUDA GPU across models and shapes, for the speed model.

Each configuration trains with transformers' Trainer exactly as `qfit run` does (the base as its `method` holds
it: 4-bit NF4 by default, 16-bit or LLM.int8 8-bit (stack.load_base); k-bit preparation for the quantized bases;
LoRA, the planned checkpointing and optimizer) on one of three kinds of data:

  full    rows of exactly seq_len random tokens, attention mask all ones: sdpa runs causal without a mask
  packed  alpaca-like rows packed into rows of seq_len (planner/packing.py): no attention mask, position_ids
          restart per example, transformers builds a block-diagonal mask (sdpa with an explicit mask)
  padded  alpaca-like rows, each micro-batch padded to its longest row (what qfit run did before packing)

Every optimizer step is timed (synchronized). The first `warmup` steps are dropped, the rest kept; the row
gives their median, min and max, so the run-to-run spread is in the data. `--min-timed-seconds T` runs each
configuration long enough that its timed steps last about T seconds (steps_for), so short steps get many samples. Peak allocated and reserved
memory of the configuration are recorded too (raw bytes). One CSV row per configuration; an OOM is a row.

Each model group runs in a fresh child process (the same reason as harness.py: a model dropped earlier in a
process leaves memory behind).

Run on the GPU machine:  python -m planner.train.throughput --grid calibration/grids/speed.json --out speed.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from itertools import groupby
from pathlib import Path

import torch

from planner.codec import settings_from_dict
from planner.data import Example
from planner.memory import resolve_targets
from planner.packing import PackedCollator, PackedDataset, alpaca_like_lengths
from planner.profiles import load_model
from planner.specs import TrainSettings
from planner.train import stack
from planner.train.harness import release
from planner.train.trainer_glue import ExampleDataset, PadCollator

FIELDS = (
    "run_id", "model", "compute_dtype", "double_quant", "batch_size", "grad_accum", "seq_len", "gradient_checkpointing",
    "uncheckpointed_layers", "rank", "alpha", "lora_dropout", "targets", "optim", "data", "status", "error",
    "warmup_steps", "step_times_s", "step_time_s", "step_time_min_s", "step_time_max_s",
    "computed_tokens_per_step", "real_tokens_per_step", "tokens_per_s", "real_tokens_per_s",
    "after_load_allocated_bytes", "peak_allocated_bytes", "peak_reserved_bytes",
    "gpu_name", "gpu_total_bytes", "driver", "torch", "transformers", "peft", "bitsandbytes", "cuda", "alloc_conf", "date",
    "method",  # planner.specs.METHODS; absent in files written before it (read as qlora)
    "int8_outlier_columns", "int8_outlier_share",  # lora-8bit: LLM.int8's outlier columns (measure.Int8OutlierWatch)
)
DATA_KINDS = ("full", "packed", "padded")


def synthetic_examples(lengths: list[int], vocab_size: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in lengths:
        ids = torch.randint(3, vocab_size, (k,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def dataset_for(cfg: dict, vocab_size: int, rows_needed: int):
    """-> (dataset, collator or None). For packed and padded data the rows are alpaca-like."""
    kind = cfg["data"]
    if kind == "full":
        return stack.FixedLengthDataset(rows_needed, cfg["seq_len"], vocab_size), None
    lengths = [min(cfg["seq_len"], k) for k in alpaca_like_lengths(rows_needed * cfg["seq_len"] // 100 + 50, seed=1)]
    if kind == "padded":
        examples = [Example(tuple(e["input_ids"]), tuple(e["labels"])) for e in synthetic_examples(lengths[:rows_needed], vocab_size)]
        return ExampleDataset(examples), PadCollator(pad_id=0)
    ds = PackedDataset(synthetic_examples(lengths, vocab_size), cfg["seq_len"])
    ds.bins = ds.bins[:rows_needed]  # the first rows_needed packed rows (the fullest: FFD fills early bins best)
    return ds, PackedCollator(pad_id=0, seq_len=cfg["seq_len"])


def run_id(cfg: dict) -> str:
    return (f"{cfg['model']}|{cfg['compute_dtype']}|b{cfg['batch_size']}x{cfg['grad_accum']}|s{cfg['seq_len']}|"
            f"ckpt{int(cfg['gradient_checkpointing'])}" + (f"-u{cfg['uncheckpointed_layers']}" if cfg.get("uncheckpointed_layers") else "")
            + f"|r{cfg['rank']}|{cfg['targets']}|{cfg['optim']}|{cfg['data']}"
            + (f"|{cfg['method']}" if cfg.get("method", "qlora") != "qlora" else "") + f"|rep{cfg.get('repeat', 0)}")


def normalize(raw: dict) -> dict:
    """A grid entry with defaults filled in (the codec's keys)."""
    cfg = {"compute_dtype": "bf16", "double_quant": True, "grad_accum": 1, "gradient_checkpointing": True,
           "uncheckpointed_layers": 0, "targets": "all-linear", "optim": "paged_adamw_32bit", "data": "full",
           "steps": 5, "warmup": 1, "repeat": 0, "method": "qlora", **raw}
    cfg.setdefault("alpha", 2 * cfg["rank"])
    if cfg["data"] not in DATA_KINDS:
        raise SystemExit(f"data must be one of {DATA_KINDS}, got {cfg['data']!r}")
    return cfg


MAX_STEPS = 60  # no configuration runs more optimizer steps than this, whatever --min-timed-seconds asks


def steps_for(cfg: dict, spec, gpu_name: str, min_timed_s: float) -> int:
    """Optimizer steps for one configuration: the grid's `steps`, or more so that the timed steps (after the warmup)
    last about min_timed_s by the speed model's estimate for this GPU (short CPU-bound steps vary by 10-20% from
    step to step: a one-second window of them does not measure their median). Capped at MAX_STEPS."""
    if min_timed_s <= 0:
        return cfg["steps"]
    from planner.coefficients import load_coefficients
    from planner.profiles import match_gpu_name
    from planner.speed import features, has_speed_model, step_seconds

    gpu, coeffs = match_gpu_name(gpu_name), load_coefficients()
    if gpu is None or not has_speed_model(coeffs) or gpu.tflops(cfg["compute_dtype"]) <= 0:
        return cfg["steps"]
    lora, train = settings_from_dict(cfg, lora_dropout=0.05, packing=cfg["data"] != "full")
    predicted = step_seconds(features(spec, lora, train, gpu), coeffs)
    want = cfg["warmup"] + -(-min_timed_s // max(predicted, 1e-3))
    return int(min(MAX_STEPS, max(cfg["steps"], want)))


def measure(base, spec, cfg: dict, env: dict, after_load: int, outdir: str) -> dict:
    from peft import get_peft_model
    from transformers import Trainer

    cuda = torch.cuda.is_available()
    lora, train = settings_from_dict(cfg, lora_dropout=0.05)
    names = resolve_targets(spec, lora.targets)
    row = {**env, **cfg, "lora_dropout": lora.dropout, "status": "ok", "error": "", "run_id": run_id(cfg),
           "after_load_allocated_bytes": after_load, "warmup_steps": cfg["warmup"]}
    model = trainer = watch = None
    try:
        model = get_peft_model(base, stack.lora_config(lora, names))
        if train.method == "lora-8bit":
            from planner.train.measure import Int8OutlierWatch

            watch = Int8OutlierWatch(model)
        ds, collator = dataset_for(cfg, spec.vocab_size, train.batch_size * train.grad_accum * cfg["steps"])
        timer = stack.StepTimer()
        args = stack.training_arguments(outdir, train, max_steps=cfg["steps"], learning_rate=1e-4,
                                        lr_scheduler_type="constant", dataloader_drop_last=True)
        kw = {"data_collator": collator} if collator is not None else {}
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[timer, *stack.checkpoint_callbacks(train)], **kw)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
            row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        timed = timer.times[cfg["warmup"]:] or timer.times
        row["step_times_s"] = ";".join(f"{t:.4f}" for t in timer.times)
        row["step_time_s"] = round(statistics.median(timed), 4)
        row["step_time_min_s"], row["step_time_max_s"] = round(min(timed), 4), round(max(timed), 4)
        steps = len(timer.times)
        if collator is None:
            computed = real = train.tokens_per_micro_batch * train.grad_accum
        else:
            computed, real = collator.padded_tokens / steps, collator.tokens / steps
        row["computed_tokens_per_step"], row["real_tokens_per_step"] = round(computed, 1), round(real, 1)
        row["tokens_per_s"] = round(computed / row["step_time_s"], 1)
        row["real_tokens_per_s"] = round(real / row["step_time_s"], 1)
    except Exception as exc:  # an OOM or a failed configuration is a row too
        row["status"] = "oom" if isinstance(exc, torch.OutOfMemoryError) else "error"
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        if row["status"] == "error":
            traceback.print_exc()
    finally:
        if watch is not None:
            row["int8_outlier_columns"], row["int8_outlier_share"] = watch.columns, round(watch.share, 6)
            watch.remove()
        release(base, model, trainer)
        del model, trainer
    return row


def _environment() -> dict:
    from planner.train.measure import nvml_used

    versions = stack.library_versions()
    if not torch.cuda.is_available():
        return {**versions, "gpu_name": "cpu", "driver": "", "gpu_total_bytes": 0, "date": time.strftime("%Y-%m-%d")}
    torch.zeros(1, device="cuda")
    _, name, driver = nvml_used()
    return {**versions, "gpu_name": name, "driver": driver, "gpu_total_bytes": torch.cuda.get_device_properties(0).total_memory,
            "date": time.strftime("%Y-%m-%d")}


def sweep_group(configs: list[dict], out: Path, workdir: Path, deadline: float, min_timed_s: float = 0.0) -> None:
    from planner.train.harness import model_path, profile_fields

    env = _environment()
    mname, dtype, dq, method = _key(configs[0])
    spec = load_model(mname)
    t0 = time.time()
    path = model_path(mname, profile_fields(mname), dtype, workdir, None)
    cuda = torch.cuda.is_available()
    base = stack.load_base(path, TrainSettings(compute_dtype=dtype, double_quant=dq, method=method),
                           device_map={"": 0} if cuda else None)
    if cuda:
        torch.cuda.empty_cache()
    after_load = torch.cuda.memory_allocated() if cuda else 0
    print(f"[speed] loaded {mname} ({method}) in {time.time() - t0:.0f} s", flush=True)
    new = not out.exists()
    with out.open("a", newline="") as fh, tempfile.TemporaryDirectory() as tmp:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for cfg in configs:
            if time.time() > deadline:
                print("[speed] time limit reached", flush=True)
                break
            cfg = {**cfg, "steps": steps_for(cfg, spec, env["gpu_name"], min_timed_s)}
            row = measure(base, spec, cfg, env, after_load, tmp)
            w.writerow(row)
            fh.flush()
            print(f"[speed] {row['run_id']}: {row['status']} step {row.get('step_time_s')} s "
                  f"({row.get('step_time_min_s')}-{row.get('step_time_max_s')}) tok/s {row.get('tokens_per_s')} "
                  f"real {row.get('real_tokens_per_s')} peak {row.get('peak_allocated_bytes')} {row['error']}", flush=True)


def _key(c):
    return c["model"], c["compute_dtype"], c["double_quant"], c.get("method", "qlora")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", required=True, help="a JSON list of configurations")
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="/dev/shm/qfit-models")
    ap.add_argument("--time-limit", type=float, default=540.0, help="seconds; no configuration starts after it")
    ap.add_argument("--models", default="", help="comma-separated: only these model groups, in this order")
    ap.add_argument("--one-process", action="store_true")
    ap.add_argument("--min-timed-seconds", type=float, default=0.0,
                    help="run each configuration long enough that its timed steps last about this long (by the speed "
                         f"model's estimate; at most {MAX_STEPS} steps); 0: the grid's steps")
    args = ap.parse_args(argv)
    deadline = time.time() + args.time_limit
    configs = [normalize(c) for c in json.loads(Path(args.grid).read_text())]
    groups = {k: list(g) for k, g in groupby(sorted(configs, key=_key), key=_key)}
    order = list(groups)
    if args.models:
        want = args.models.split(",")
        order = sorted((k for k in groups if k[0] in want), key=lambda k: want.index(k[0]))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.one_process:
        for k in order:
            sweep_group(groups[k], Path(args.out), workdir, deadline, args.min_timed_seconds)
        return 0
    rc = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, k in enumerate(order):
            left = deadline - time.time()
            if left <= 20:
                print("[speed] time limit reached", flush=True)
                break
            path = Path(tmp) / f"g{i}.json"
            path.write_text(json.dumps(groups[k]))
            print(f"[speed] group {i + 1}/{len(order)}: {k} ({len(groups[k])} configurations)", flush=True)
            cmd = [sys.executable, "-m", "planner.train.throughput", "--grid", str(path), "--out", args.out,
                   "--workdir", args.workdir, "--time-limit", str(left), "--one-process",
                   "--min-timed-seconds", str(args.min_timed_seconds)]
            rc = subprocess.run(cmd, check=False, env=os.environ).returncode or rc
            if i + 1 < len(order) and order[i + 1][0] == k[0]:
                continue  # the next group (another method) reuses this model's checkpoint
            for p in workdir.glob(f"{k[0]}-*"):  # free /dev/shm for the next model
                subprocess.run(["rm", "-rf", str(p)], check=False)
    return rc


if __name__ == "__main__":
    sys.exit(main())
