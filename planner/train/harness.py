"""The profiling harness behind `qfit calibrate`: sweep QLoRA configurations on a CUDA GPU and
write one CSV row per configuration (raw integer bytes; an OOM is a row, not a lost run).

The base model is loaded once per (model, compute dtype, double quant, method) and reused for that
group's configurations: after each the LoRA layers are unloaded and the allocator emptied, and the
row records whether allocated memory came back to the post-load level (`leak_bytes`). Each group
runs in a fresh child process: a model loaded and dropped earlier in the same process leaves
memory behind (after_load_allocated_bytes shows it) and holes in the allocator's address space,
which change peak reserved memory (calibration/REPORT.md, "Contaminated rows").

Run (on the GPU machine):  python -m planner.train.harness --grid h200-a --out runs.csv
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from itertools import groupby
from pathlib import Path

import torch

from planner.codec import settings_from_dict
from planner.memory import resolve_targets
from planner.profiles import PROFILES_DIR, load_model
from planner.specs import TrainSettings
from planner.train import stack
from planner.train.measure import Int8OutlierWatch, nvml_used, peak_snapshot
from planner.train.oom import is_cuda_oom
from planner.units import CUBLAS_WORKSPACES_BYTES

FIELDS = (
    "run_id", "model", "compute_dtype", "double_quant", "alloc_conf", "batch_size", "grad_accum", "seq_len",
    "gradient_checkpointing", "uncheckpointed_layers", "rank", "alpha", "lora_dropout", "targets", "optim", "status", "budget_bytes",
    "load_peak_allocated_bytes", "after_load_allocated_bytes", "after_wrap_allocated_bytes",
    "peak_allocated_bytes", "peak_reserved_bytes", "nvml_used_bytes", "nvml_baseline_bytes",
    "context_bytes", "leak_bytes", "step_time_s", "tokens_per_s", "steps", "error",
    "gpu_name", "gpu_total_bytes", "driver", "torch", "transformers", "peft", "bitsandbytes", "cuda", "date",
    "method",  # planner.specs.METHODS; absent in files written before it (read as qlora)
    # lora-8bit: LLM.int8's outlier columns (measure.Int8OutlierWatch), a share of the int8 linears' input width
    "int8_outlier_columns", "int8_outlier_share",
)


def _cfg(model, batch, seq, ckpt, rank, targets, optim, dtype="bf16", dq=True, accum=2, budget=0, bisect=False,
         unckpt=0, method="qlora"):
    return dict(model=model, compute_dtype=dtype, double_quant=dq, batch_size=batch, seq_len=seq,
                gradient_checkpointing=ckpt, uncheckpointed_layers=unckpt if ckpt else 0, rank=rank, targets=targets,
                optim=optim, grad_accum=accum, budget_bytes=budget, bisect=bisect, method=method)


def grid(name: str) -> list[dict]:
    """A named sweep: calibration/grids/<name>.json (grid_from_json's format), each sized to finish inside one
    10-minute GPU command. `speed-partial:<model>` is generated: benchmarks/partial_ckpt_speed.py's settings
    for one model, each measured twice."""
    if name.startswith("speed-partial:"):
        m, L = name.split(":", 1)[1], "all-linear"
        once = [_cfg(m, 8, 1024, True, 16, L, "paged_adamw_32bit", unckpt=u) for u in (0, 4, 8, 16, 31)]
        return (once + [_cfg(m, 8, 1024, False, 16, L, "paged_adamw_32bit")]) * 2
    from planner.coefficients import CALIBRATION_DIR

    path = CALIBRATION_DIR / "grids" / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.json")))
        raise SystemExit(f"unknown grid {name!r} (calibration/grids/ has {known}; or speed-partial:<model>)")
    return grid_from_json(str(path))


def grid_from_json(path: str) -> list[dict]:
    """A JSON list of {model, batch, seq, ckpt, rank, targets, optim[, dtype, dq, accum, budget, bisect, unckpt, method]},
    or an object {"description": ..., "configs": [that list]} (calibration/grids/*.json)."""
    doc = json.loads(Path(path).read_text())
    return [_cfg(**row) for row in (doc["configs"] if isinstance(doc, dict) else doc)]


def model_path(spec_name: str, config_fields: dict, dtype: str, workdir: Path, layers: int | None) -> str:
    """A random-weight checkpoint of the architecture in workdir (saved on first use). -> its directory."""
    path = workdir / f"{spec_name}-{dtype}"
    if not (path / "config.json").is_file():
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        stack.save_random_model(stack.hf_config(config_fields, layers), str(path), stack.TORCH_DTYPES[dtype], dev)
    return str(path)


def profile_fields(name: str) -> dict:
    """The [config] table of a model profile (Hugging Face config.json field names)."""
    import tomllib

    path = Path(name) if name.endswith(".toml") else PROFILES_DIR / "models" / f"{name}.toml"
    with path.open("rb") as fh:
        return tomllib.load(fh)["config"]


def run_one(base, spec, cfg: dict, env: dict, after_load: int, outdir: str) -> dict:
    from peft import get_peft_model
    from transformers import Trainer

    cuda = torch.cuda.is_available()
    lora, train = settings_from_dict(cfg, alpha=2 * cfg["rank"], lora_dropout=0.05, targets=(cfg["targets"],))
    names = resolve_targets(spec, lora.targets)
    row = {**env, **cfg, "alpha": lora.alpha, "lora_dropout": lora.dropout, "status": "ok", "error": "",
           "after_load_allocated_bytes": after_load}
    if cuda and cfg["budget_bytes"]:
        torch.cuda.set_per_process_memory_fraction(cfg["budget_bytes"] / env["gpu_total_bytes"])
    model = trainer = watch = None
    steps = 2
    try:
        model = get_peft_model(base, stack.lora_config(lora, names))
        if train.method == "lora-8bit":
            watch = Int8OutlierWatch(model)
        row["after_wrap_allocated_bytes"] = torch.cuda.memory_allocated() if cuda else 0
        ds = stack.FixedLengthDataset(train.batch_size * train.grad_accum * steps, train.seq_len, spec.vocab_size)
        timer = stack.StepTimer()
        args = stack.training_arguments(outdir, train, max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant")
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[timer, *stack.checkpoint_callbacks(train)])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        record_success(row, timer, train, cuda)
    except Exception as exc:  # an OOM or a failed configuration is a data row too
        record_failure(row, exc, cuda)
    finally:
        if watch is not None:
            row["int8_outlier_columns"], row["int8_outlier_share"] = watch.columns, round(watch.share, 6)
            watch.remove()
        release(base, model, trainer)
        del model, trainer
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
            row["leak_bytes"] = torch.cuda.memory_allocated() - after_load
    return row


def release(base, model, trainer) -> None:
    """After one configuration on a shared 4-bit base: free the Trainer, unload the LoRA layers, turn checkpointing
    and the input-grad hook off, and empty the allocator, so that the next configuration starts from the base alone."""
    if trainer is not None:
        trainer.accelerator.free_memory()
    if model is not None:
        try:
            model.unload()
        except Exception:
            traceback.print_exc()
    if hasattr(base, "gradient_checkpointing_disable"):
        base.gradient_checkpointing_disable()
    if hasattr(base, "disable_input_require_grads"):
        # the checkpointing setup registers a hook making the embeddings' output require grad; left in
        # place it makes the next non-checkpointed configuration keep +28,672 B/token (seen in exact mode)
        try:
            base.disable_input_require_grads()
        except (AttributeError, RuntimeError):
            pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def record_success(row: dict, timer, train: TrainSettings, cuda: bool) -> None:
    """A configuration that trained: peaks (NVML while paged optimizer state is still resident) and speed."""
    if cuda:
        row.update(peak_snapshot())
        row["nvml_used_bytes"] = nvml_used()[0]  # strict here: a calibration row without NVML is an error row
    step = min(timer.times[1:] or timer.times)
    row["step_time_s"] = round(step, 4)
    row["tokens_per_s"] = round(train.tokens_per_micro_batch * train.grad_accum / step, 1)  # one process's
    row["steps"] = len(timer.times)


def record_failure(row: dict, exc: BaseException, cuda: bool) -> None:
    """An OOM (status oom, with the peaks reached) or any other failure (status error): a row, not a lost sweep."""
    if is_cuda_oom(exc):
        row["status"] = "oom"
        row["error"] = str(exc).splitlines()[0][:200]
        if cuda:
            row.update(peak_snapshot(sync=False))
        return
    row["status"] = "error"
    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    traceback.print_exc()


def run_id(cfg: dict, alloc_conf: str) -> str:
    """A row's id: every setting that changes memory, the allocator setting and the cap."""
    return (f"{cfg['model']}|{cfg['compute_dtype']}|dq{int(cfg['double_quant'])}|b{cfg['batch_size']}x{cfg['grad_accum']}|"
            f"s{cfg['seq_len']}|ckpt{int(cfg['gradient_checkpointing'])}"
            + (f"-u{cfg['uncheckpointed_layers']}" if cfg.get("uncheckpointed_layers") else "")
            + f"|r{cfg['rank']}|{cfg['targets']}|{cfg['optim']}|{alloc_conf or 'default'}"
            + (f"|{cfg['method']}" if cfg.get("method", "qlora") != "qlora" else "")  # QLoRA ids as before
            + f"|cap{cfg['budget_bytes']}")


def _record(writer, fh, row: dict, cfg: dict, env: dict, load_peak: int) -> dict:
    row["load_peak_allocated_bytes"] = load_peak
    row["run_id"] = run_id(cfg, env["alloc_conf"])
    writer.writerow(row)
    fh.flush()
    print(f"[harness] {row['run_id']}: {row['status']} peak_alloc={row.get('peak_allocated_bytes')} "
          f"reserved={row.get('peak_reserved_bytes')} nvml={row.get('nvml_used_bytes')} tok/s={row.get('tokens_per_s')} "
          f"leak={row.get('leak_bytes')} {row.get('error', '')}", flush=True)
    return row


def _group_key(c: dict):
    return c["model"], c["compute_dtype"], c["double_quant"], c.get("method", "qlora")


def _json_row(c: dict) -> dict:
    """A config as grid_from_json reads it back."""
    return {"model": c["model"], "batch": c["batch_size"], "seq": c["seq_len"], "ckpt": c["gradient_checkpointing"],
            "rank": c["rank"], "targets": c["targets"], "optim": c["optim"], "dtype": c["compute_dtype"],
            "dq": c["double_quant"], "accum": c["grad_accum"], "budget": c["budget_bytes"], "bisect": c["bisect"],
            "unckpt": c["uncheckpointed_layers"], "method": c.get("method", "qlora")}


def _per_group_processes(groups: list[list[dict]], args, t_start: float) -> int:
    """Run each model group in its own child process (same options, appending to the same CSV)."""
    import subprocess

    rc = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, group in enumerate(groups):
            left = args.time_limit - (time.time() - t_start)
            if left <= 0:
                print("[harness] time limit reached", flush=True)
                break
            path = Path(tmp) / f"group{i}.json"
            path.write_text(json.dumps([_json_row(c) for c in group]))
            cmd = [sys.executable, "-m", "planner.train.harness", "--grid", str(path), "--out", args.out,
                   "--workdir", args.workdir, "--bisect-steps", str(args.bisect_steps), "--time-limit", str(left),
                   "--one-process"] + (["--layers", str(args.layers)] if args.layers else [])
            print(f"[harness] group {i + 1}/{len(groups)}: {_group_key(group[0])} in a fresh process", flush=True)
            rc = subprocess.run(cmd, check=False).returncode or rc
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="tiny", help="a named grid (tiny, h200-a, h200-b) or a JSON file of configs")
    ap.add_argument("--out", required=True, help="CSV file to append rows to")
    ap.add_argument("--workdir", default="/dev/shm/qfit-models", help="where random checkpoints are saved")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (smoke tests)")
    ap.add_argument("--bisect-steps", type=int, default=3, help="allocator-cap bisection steps for configs marked bisect")
    ap.add_argument("--time-limit", type=float, default=1e9, help="stop starting new configurations after this many seconds")
    ap.add_argument("--one-process", action="store_true",
                    help="sweep every model group in this process (default: a fresh child process per group)")
    args = ap.parse_args(argv)
    t_start = time.time()
    configs = grid_from_json(args.grid) if args.grid.endswith(".json") else grid(args.grid)
    groups = [list(g) for _, g in groupby(sorted(configs, key=_group_key), key=_group_key)]
    if len(groups) > 1 and not args.one_process:
        return _per_group_processes(groups, args, t_start)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    env = {**stack.library_versions(), "date": time.strftime("%Y-%m-%d"), "gpu_name": platform.processor() or "cpu",
           "gpu_total_bytes": 0, "driver": "", "nvml_baseline_bytes": 0, "context_bytes": 0}
    if cuda:
        env["nvml_baseline_bytes"], env["gpu_name"], env["driver"] = nvml_used()
        torch.zeros(1, device="cuda")
        env["gpu_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
        env["context_bytes"] = nvml_used()[0] - env["nvml_baseline_bytes"] - torch.cuda.memory_reserved()
    env["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    env.pop("cuda", None)
    env["cuda"] = torch.version.cuda or ""
    out = Path(args.out)
    new = not out.exists()
    if not new and out.open().readline().rstrip("\r\n").split(",") != list(FIELDS):
        raise SystemExit(f"{out} was written with other columns: give a new --out file")
    with out.open("a", newline="") as fh, tempfile.TemporaryDirectory() as tmp:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for (mname, dtype, dq, method), group in groupby(sorted(configs, key=_group_key), key=_group_key):
            group = list(group)
            if time.time() - t_start > args.time_limit:
                break
            spec = load_model(mname)
            fields = profile_fields(mname)
            path = model_path(mname, fields, dtype, workdir, args.layers)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            base = stack.load_base(path, TrainSettings(compute_dtype=dtype, double_quant=dq, method=method),
                                   device_map={"": 0} if cuda else None)
            if cuda:
                torch.cuda.empty_cache()
            after_load = torch.cuda.memory_allocated() if cuda else 0
            load_peak = peak_snapshot(sync=False)["peak_allocated_bytes"] if cuda else 0
            print(f"[harness] loaded {mname} {dtype} dq={dq} {method}: {after_load} B allocated, load peak {load_peak} B", flush=True)
            for cfg in group:
                if time.time() - t_start > args.time_limit:
                    print("[harness] time limit reached", flush=True)
                    break
                row = _record(writer, fh, run_one(base, spec, cfg, env, after_load, tmp), cfg, env, load_peak)
                if cfg.get("bisect") and row["status"] == "ok" and cuda:
                    # the smallest budget that runs: bisect the allocator cap between peak allocated and reserved
                    lo, hi = row["peak_allocated_bytes"], row["peak_reserved_bytes"] + CUBLAS_WORKSPACES_BYTES
                    for _ in range(args.bisect_steps):
                        mid = (lo + hi) // 2
                        capped = _record(writer, fh, run_one(base, spec, {**cfg, "budget_bytes": mid}, env, after_load, tmp),
                                         cfg | {"budget_bytes": mid}, env, load_peak)
                        lo, hi = (lo, mid) if capped["status"] == "ok" else (mid, hi)
            del base
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
