"""Verify the fit promise on the GPU: emulate smaller cards with set_per_process_memory_fraction,
run qfit's recommended plan on each, and record whether it ran and how much of the card it used.

Each (model, compute dtype) group runs in a fresh process (planner.train.harness with a JSON grid),
so no memory from an earlier configuration can eat into an emulated budget.

Run (on the GPU machine):  python -m planner.train.validate --out validate.csv --coefficients coeffs.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from planner.coefficients import load_coefficients
from planner.profiles import load_gpu, load_model
from planner.search import Request, next_larger_batch, search

EMULATED = ("t4", "rtx4090", "a100-40gb")  # 16 GB, 24 GB, 40 GB
MODELS = ("mistral-7b", "llama-3.1-8b")
SEQS = (512, 2048)


def planned_runs(coeffs, effective_batch: int = 16, gpus=EMULATED, models=MODELS) -> list[dict]:
    rows = []
    for gpu_name in gpus:
        gpu = load_gpu(gpu_name)
        for model_name in models:
            model = load_model(model_name)
            for seq in SEQS:
                res = search(model, gpu, Request(seq_len=seq, effective_batch=effective_batch), coeffs)
                if res.best is None:
                    rows.append({"gpu": gpu_name, "model": model_name, "seq": seq, "fits": False})
                    continue
                p = res.best
                bigger = next_larger_batch(p, coeffs)
                budget = gpu.memory_bytes - p.memory.cuda_context - p.memory.paged_optimizer_state
                rows.append({
                    "gpu": gpu_name, "model": model_name, "seq": seq, "fits": True,
                    "gpu_memory_bytes": gpu.memory_bytes, "budget_bytes": budget,
                    "predicted_needs_bytes": p.memory.needs_bytes,
                    "predicted_reserved_bytes": p.memory.peak_reserved_bytes,
                    "next_batch_fits": bool(bigger and bigger.fits),
                    "next_batch_needs_bytes": bigger.memory.needs_bytes if bigger else 0,
                    "cfg": {"model": model_name, "batch": p.train.batch_size, "accum": p.train.grad_accum,
                            "seq": seq, "ckpt": p.train.gradient_checkpointing,
                            "unckpt": p.train.uncheckpointed_layers, "rank": p.lora.rank,
                            "targets": p.lora.targets[0], "optim": p.train.optim,
                            "dtype": p.train.compute_dtype, "dq": p.train.double_quant, "budget": budget},
                })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--coefficients", default=None)
    ap.add_argument("--plans-only", action="store_true")
    ap.add_argument("--effective-batch", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=1e9, help="start no configuration after this many seconds")
    ap.add_argument("--gpus", default=",".join(EMULATED), help="comma list of the emulated cards")
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of models")
    ap.add_argument("--workdir", default="/dev/shm/qfit-models", help="where random checkpoints are saved (one per process)")
    args = ap.parse_args(argv)
    t0 = time.time()
    coeffs = load_coefficients(path=args.coefficients)
    plans = planned_runs(coeffs, args.effective_batch, tuple(args.gpus.split(",")), tuple(args.models.split(",")))
    Path(args.out).with_suffix(".plans.json").write_text(json.dumps(plans, indent=1))
    for p in plans:
        print(json.dumps({k: v for k, v in p.items() if k != "cfg"} | {"cfg": p.get("cfg")}), flush=True)
    if args.plans_only:
        return 0
    groups: dict[tuple, list] = {}
    for p in plans:
        if p["fits"]:
            c = p["cfg"]
            groups.setdefault((c["model"], c["dtype"]), []).append(c)
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    for cfgs in groups.values():
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump([{"model": c["model"], "batch": c["batch"], "seq": c["seq"], "ckpt": c["ckpt"],
                        "unckpt": c.get("unckpt", 0), "rank": c["rank"],
                        "targets": c["targets"], "optim": c["optim"], "dtype": c["dtype"], "dq": c["dq"],
                        # memory is the same for any accumulation >= 2 (gradients persist between micro-batches),
                        # so the run measures 2 accumulated micro-batches per step: a 40-step accumulation
                        # at effective batch 120 is what ran out the first session's GPU time
                        "accum": min(c["accum"], 2), "budget": c["budget"]} for c in cfgs], fh)
        left = args.time_limit - (time.time() - t0)
        if left <= 0:
            break
        subprocess.run([sys.executable, "-m", "planner.train.harness", "--grid", fh.name, "--out", args.out,
                        "--time-limit", str(left), "--workdir", args.workdir], env=env, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
