"""Calibration sweep on several GPUs: DDP and FSDP, measured per rank (the multi-GPU issue's data).

For each group (one model, one strategy) this builds the architecture with random weights (saved to
--workdir, as planner.train.harness does), writes a job file, and launches one process per GPU with
`accelerate launch` and the configuration planner.launch generates (exactly what `qfit run --num-gpus`
uses). Each rank appends its rows to <out>/<group>/rank<r>.csv (planner.train.distributed). A group that
hangs or crashes is killed after --group-timeout seconds; the other groups still run.

Run (on a machine with 2 GPUs):  python -m planner.train.dist_sweep --out runs-x2 --groups mistral-ddp,mistral-fsdp
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from planner.coefficients import load_coefficients
from planner.launch import accelerate_config, launch_argv, write_config
from planner.memory import cuda_context_bytes
from planner.multigpu import nccl_buffer_bytes, plan_multi
from planner.profiles import load_gpu, load_model
from planner.search import Request

A, L = "attn", "all-linear"


def _c(batch, seq, ckpt, rank, targets, optim, **kw) -> dict:
    return {"batch": batch, "seq": seq, "ckpt": ckpt, "rank": rank, "targets": targets, "optim": optim, **kw}


def capped_plan(model: str, gpu: str, n: int, seq: int, loading: str = "full") -> dict:
    """qfit's FSDP plan for n x gpu, as a configuration capped to that card's budget per rank
    (card memory - calibrated CUDA context - NCCL buffers, the convention of planner.train.validate), loaded by
    `loading` (the rank loads that way too: planner.train.distributed.measure_one)."""
    coeffs = load_coefficients(None)
    g = load_gpu(gpu)
    p = plan_multi(load_model(model), g, Request(seq_len=seq), coeffs, n, "fsdp", loading=loading)[0]
    budget = g.memory_bytes - cuda_context_bytes(coeffs) - nccl_buffer_bytes(coeffs)
    extra = {"loading": loading} if loading != "full" else {}
    return _c(p.train.batch_size, seq, p.train.gradient_checkpointing, p.lora.rank, p.lora.targets[0], p.train.optim,
              dtype=p.train.compute_dtype, accum=min(p.train.grad_accum, 2), budget=budget,
              plan=f"{n} x {gpu}: needs {p.memory.needs_bytes} B per GPU (load {p.memory.load_needs_bytes}), "
                   f"fits={p.fits}", **extra)


def groups(n: int) -> dict[str, tuple[str, str, list[dict]]]:
    """name -> (model, strategy, configurations)."""
    return {
        "tiny-ddp": ("tiny-llama", "ddp", [_c(2, 32, False, 8, A, "adamw_torch"), _c(2, 32, True, 4, L, "paged_adamw_8bit")]),
        "mistral-ddp": ("mistral-7b", "ddp", [_c(4, 1024, True, 16, L, "adamw_torch"),
                                              _c(2, 2048, False, 16, A, "paged_adamw_32bit"),
                                              _c(8, 512, True, 64, L, "paged_adamw_8bit")]),
        "mistral-fsdp": ("mistral-7b", "fsdp", [_c(4, 1024, True, 16, L, "adamw_torch"),
                                                _c(2, 2048, False, 16, A, "adamw_torch"),
                                                _c(8, 512, True, 64, L, "adamw_torch"),
                                                _c(2, 512, True, 16, L, "paged_adamw_32bit")]),  # expected to fail
        # accelerate's fsdp_cpu_ram_efficient_loading (rank 0 loads, the others start on the meta device): does it
        # change the load peak of a quantized model, and does training still run? (qfit run leaves it off)
        "mistral-fsdp-resident": ("mistral-7b", "fsdp", [_c(4, 1024, True, 16, L, "adamw_torch")]),
        "mistral-fsdp-ramload": ("mistral-7b", "fsdp", [_c(4, 1024, True, 16, L, "adamw_torch", ram_efficient=True)]),
        "llama13-ddp": ("llama-2-13b", "ddp", [_c(4, 1024, True, 16, L, "adamw_torch")]),
        "llama13-fsdp": ("llama-2-13b", "fsdp", [_c(4, 1024, True, 16, L, "adamw_torch"),
                                                 _c(1, 4096, True, 64, L, "adamw_torch")]),
        "qwen14-fsdp-24gb-s4096": ("qwen2.5-14b", "fsdp", [capped_plan("qwen2.5-14b", "rtx4090", n, 4096)]),
        "qwen32-fsdp-24gb": ("qwen2.5-32b", "fsdp", [capped_plan("qwen2.5-32b", "rtx4090", n, 512)]),
        # issue #16: the sharded loader (planner.train.sharded_load), its load peak against the planner's load phase
        "mistral-fsdp-sharded": ("mistral-7b", "fsdp", [_c(4, 1024, True, 16, L, "adamw_torch", loading="sharded"),
                                                        _c(8, 512, True, 64, L, "adamw_torch", loading="sharded")]),
        "llama13-fsdp-sharded": ("llama-2-13b", "fsdp", [_c(4, 1024, True, 16, L, "adamw_torch", loading="sharded")]),
        "qwen32-fsdp-24gb-sharded": ("qwen2.5-32b", "fsdp", [capped_plan("qwen2.5-32b", "rtx4090", n, 512, "sharded")]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--groups", required=True, help="comma list of group names (see groups())")
    ap.add_argument("--num-gpus", type=int, default=2)
    ap.add_argument("--workdir", default="/dev/shm/qfit-models")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--group-timeout", type=float, default=300)
    ap.add_argument("--keep-models", action="store_true", help="keep the saved random checkpoints")
    ap.add_argument("--cpu", action="store_true", help="2 CPU processes with gloo (tests)")
    args = ap.parse_args(argv)
    known = groups(args.num_gpus)
    names = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = [g for g in names if g not in known]
    if unknown:
        raise SystemExit(f"unknown group(s) {', '.join(unknown)}; known: {', '.join(known)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    if not args.cpu:
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    for name in names:
        model, strategy, configs = known[name]
        t0 = time.time()
        path = _build(model, args.workdir, args.cpu)
        gdir = out / name
        gdir.mkdir(parents=True, exist_ok=True)
        job = {"mode": "measure", "strategy": strategy, "model": model, "model_path": path, "steps": args.steps,
               "out": str(gdir), "configs": configs}
        (gdir / "job.json").write_text(json.dumps(job, indent=1))
        cfg = accelerate_config(strategy, args.num_gpus, compute_dtype=configs[0].get("dtype", "bf16"),
                                model_type=load_model(model).model_type, cpu=args.cpu,
                                # off as qfit run (planner.train.dist_run) launches, unless the group asks
                                cpu_ram_efficient_loading=bool(configs[0].get("ram_efficient")))
        write_config(gdir / "accelerate_config.json", cfg)
        argv_ = launch_argv(str(gdir / "accelerate_config.json"), "planner.train.distributed", ["--job", str(gdir / "job.json")])
        print(f"[dist-sweep] {name}: {' '.join(argv_)}", flush=True)
        try:
            code = subprocess.run(argv_, env=env, timeout=args.group_timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        print(f"[dist-sweep] {name}: exit {code} after {time.time() - t0:.0f} s", flush=True)
        if not args.keep_models and not args.cpu and model != "tiny-llama":
            later = [known[g][0] for g in names[names.index(name) + 1:]]
            if model not in later:
                shutil.rmtree(path, ignore_errors=True)
    return 0


def _build(model: str, workdir: str, cpu: bool) -> str:
    """A random-weight checkpoint of the architecture in bf16 (harness.model_path, built on GPU 0), in a
    child process so that this one never holds a CUDA context on a GPU the ranks measure."""
    if model == "tiny-llama" and cpu:
        from planner import demo

        return str(demo.prepare())
    code = ("import sys; from pathlib import Path; from planner.train.harness import model_path, profile_fields; "
            f"print(model_path({model!r}, profile_fields({model!r}), 'bf16', Path({workdir!r}), None))")
    res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return res.stdout.strip().splitlines()[-1]


if __name__ == "__main__":
    sys.exit(main())
