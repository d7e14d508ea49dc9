"""What partial checkpointing buys: measured tokens/s and peak memory against the planner's estimates.

The data is one harness sweep per model on one GPU, each in its own process:

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python -m planner.train.harness \
        --grid speed-partial:mistral-7b --out benchmarks/results/partial-ckpt-h200-mistral.csv

(and --grid speed-partial:llama-3.1-8b): the same micro-batch (8 x 1024 tokens, LoRA r16 on all linears,
paged_adamw_32bit, bf16, expandable segments) with 0, 4, 8, 16 and 31 of the last decoder layers left
uncheckpointed, and with checkpointing off, each configuration twice in one process. Speed is the harness's:
the fastest optimizer step after the first (2 micro-batches of 8 x 1024 tokens).

    python benchmarks/partial_ckpt_speed.py benchmarks/results/partial-ckpt-h200-*.csv

prints one table per model: uncheckpointed layers, measured tokens/s (both repeats), speed-up over
checkpointing every layer (mean of the repeats), the planner's estimated speed-up on the same GPU, and the
measured vs predicted peak allocated memory.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys

from tabulate import tabulate

from planner.coefficients import load_coefficients
from planner.fit import _row_settings, row_int
from planner.memory import estimate
from planner.profiles import load_gpu, load_model
from planner.speed import tokens_per_second
from planner.units import GiB


def summarize(rows: list[dict], coeffs, gpu) -> dict[str, list[list]]:
    out: dict[str, list[list]] = {}
    by_model: dict[str, dict[tuple, list[dict]]] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        key = (r["gradient_checkpointing"] == "True", row_int(r, "uncheckpointed_layers"))
        by_model.setdefault(r["model"], {}).setdefault(key, []).append(r)
    for name, groups in by_model.items():
        model = load_model(name)
        base = groups.get((True, 0))
        if not base:
            continue
        lora, train0 = _row_settings(base[0])
        base_speed = statistics.mean(float(r["tokens_per_s"]) for r in base)
        base_pred = tokens_per_second(model, lora, train0, gpu, coeffs)
        table = []
        for (ckpt, n), rs in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
            lora, train = _row_settings(rs[0])
            speeds = [float(r["tokens_per_s"]) for r in rs]
            pred_speed = tokens_per_second(model, lora, train, gpu, coeffs)
            alloc = statistics.mean(int(r["peak_allocated_bytes"]) - int(r["after_load_allocated_bytes"]) for r in rs)
            # measured peak above the loaded model vs the model's peak less its static weights
            mem = estimate(model, lora, train, coeffs)
            pred_alloc = mem.peak_allocated_bytes
            weights = mem.quantized_weights + mem.quant_constants + mem.unquantized_weights
            label = "off" if not ckpt else f"{n} of {model.num_hidden_layers}"
            table.append([label, " / ".join(f"{s:,.0f}" for s in speeds), f"{statistics.mean(speeds) / base_speed:.3f}x",
                          f"{pred_speed / base_pred:.3f}x", f"{alloc / GiB:.2f}", f"{(pred_alloc - weights) / GiB:.2f}"])
        out[model.display_name] = table
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--gpu", default="h200", help="catalog GPU the speed estimate is made for (default h200)")
    args = ap.parse_args(argv)
    rows = [r for path in args.csv for r in csv.DictReader(open(path, newline=""))]
    coeffs, gpu = load_coefficients(), load_gpu(args.gpu)
    for name, table in summarize(rows, coeffs, gpu).items():
        print(f"\n{name}: micro-batch 8 x 1024 tokens, LoRA r16 all-linear, paged_adamw_32bit, bf16")
        print(tabulate(table, headers=["uncheckpointed layers", "tokens/s (2 runs)", "measured speed-up",
                                       "planner's estimate", "peak allocated above the weights GiB", "predicted GiB"],
                       tablefmt="github", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
