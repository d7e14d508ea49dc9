"""qfit's tokens/s estimate against throughput figures published for GPUs that cannot be lent here.

Run: python benchmarks/published_speed.py [--json benchmarks/results/published_speed.json]

Each published figure comes with the settings its source states; what the source leaves unstated (the A100's
memory size, whether padding counts as tokens, gradient checkpointing) is spanned by computing qfit's estimate
under each reading, so the error is a range, not one number. The estimate is planner.speed.tokens_per_second with
the shipped coefficients (calibrated on H100 runs), scaled to the card by its datasheet TFLOP/s and bandwidth.

Readings of "tokens/s" for a dataset of short rows trained without packing:
  full   every row as long as the cutoff (no padding): the upper bound of what a padded run computes;
  padded rows of an Alpaca-like length distribution (planner.packing.alpaca_like_lengths, cut at the cutoff),
         shuffled, padded to the longest row of each micro-batch (DataCollatorForSeq2Seq): qfit's speed model
         for the mean padded micro-batch (the way planner.speed_fit treats padded rows), reported as computed
         tokens/s and as non-padding tokens/s. calibration/REPORT.md shows padded rows measured 20% to 8.2x
         slower than this model on the H100, so this reading's estimate is known to be optimistic.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from planner.coefficients import load_coefficients
from planner.packing import alpaca_like_lengths
from planner.profiles import load_gpu, load_model
from planner.specs import LoraSettings, TrainSettings
from planner.speed import tokens_per_second


@dataclass(frozen=True)
class Published:
    source: str
    what: str
    model: str
    gpus: tuple[str, ...]  # catalog profiles the source's card may be
    figure: float  # tokens/s per GPU, as published
    batch_size: int
    grad_accum: int
    seq_len: int
    rank: int
    targets: tuple[str, ...]
    optim: str
    checkpointing: tuple[bool, ...]  # the readings: stated, or both when unstated


FIGURES = (
    Published(
        source="LLaMA-Factory wiki, 'Performance comparison' (as quoted in qfit issue #14)",
        what="Llama-2-7B, HF transformers + bitsandbytes 4-bit QLoRA, one A100",
        model="llama-2-7b", gpus=("a100-40gb", "a100-80gb"), figure=2415.0,
        batch_size=4, grad_accum=2, seq_len=1024, rank=8, targets=("all-linear",), optim="adamw_torch",
        checkpointing=(True, False),
    ),
)


def padded_shape(batch_size: int, cutoff: int, rows: int = 4000, seed: int = 0) -> tuple[int, float]:
    """(mean padded micro-batch length, non-padding share) of Alpaca-like rows cut at `cutoff`, shuffled and padded
    to the longest row of each micro-batch of `batch_size`."""
    lengths = [min(cutoff, n) for n in alpaca_like_lengths(rows, seed=seed)]
    random.Random(seed + 1).shuffle(lengths)
    groups = [lengths[i:i + batch_size] for i in range(0, len(lengths) - batch_size + 1, batch_size)]
    padded = [max(g) for g in groups]
    real = sum(sum(g) for g in groups)
    return round(statistics.mean(padded)), real / (batch_size * sum(padded))


def estimates(p: Published, coeffs) -> list[dict]:
    model = load_model(p.model)
    lora = LoraSettings(rank=p.rank, alpha=2 * p.rank, targets=p.targets)
    mean_len, real_share = padded_shape(p.batch_size, p.seq_len)
    out = []
    for gpu_name in p.gpus:
        gpu = load_gpu(gpu_name)
        dtype = "bf16" if gpu.bf16 else "fp16"
        for ckpt in p.checkpointing:
            train = TrainSettings(batch_size=p.batch_size, grad_accum=p.grad_accum, seq_len=p.seq_len,
                                  gradient_checkpointing=ckpt, optim=p.optim, compute_dtype=dtype, packing=False)
            full = tokens_per_second(model, lora, train, gpu, coeffs)
            computed = tokens_per_second(model, lora, replace(train, seq_len=mean_len, packing=True), gpu, coeffs)
            for reading, value in (("full rows", full), ("padded, computed tokens", computed),
                                   ("padded, non-padding tokens", computed * real_share)):
                out.append({"gpu": gpu_name, "checkpointing": ckpt, "reading": reading,
                            "estimate_tokens_per_s": round(value, 1),
                            "error_pct": round(100.0 * (value / p.figure - 1.0), 1)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="Write the table as JSON here.")
    args = ap.parse_args(argv)
    coeffs = load_coefficients()
    doc = []
    for p in FIGURES:
        rows = estimates(p, coeffs)
        mean_len, share = padded_shape(p.batch_size, p.seq_len)
        doc.append({"source": p.source, "what": p.what, "published_tokens_per_s": p.figure,
                    "settings": {"batch_size": p.batch_size, "grad_accum": p.grad_accum, "seq_len": p.seq_len,
                                 "rank": p.rank, "targets": list(p.targets), "optim": p.optim},
                    "padded_mean_micro_batch_len": mean_len, "padded_non_padding_share": round(share, 3),
                    "coefficients": coeffs.name, "speed_calibrated_on": coeffs.values.get("speed_calibrated_on"), "estimates": rows})
        print(f"{p.what}: published {p.figure:,.0f} tokens/s ({p.source})")
        print(f"  micro-batch {p.batch_size} x accumulation {p.grad_accum}, cutoff {p.seq_len}, r{p.rank} "
              f"{','.join(p.targets)}, {p.optim}; padded reading: mean micro-batch length {mean_len}, "
              f"{100 * share:.0f}% non-padding")
        for r in rows:
            print(f"  {r['gpu']:<10} ckpt {'on ' if r['checkpointing'] else 'off'} {r['reading']:<27} "
                  f"qfit {r['estimate_tokens_per_s']:>8,.0f}  ({r['error_pct']:+.1f}%)")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
