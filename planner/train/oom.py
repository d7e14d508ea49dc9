"""Out of memory: the one detector (is_cuda_oom) and the one back-off policy (next_settings), shared by the
single-GPU session (planner.train.session) and the multi-GPU relaunch loop (planner.train.dist_run).

The policy is a pure function: the settings in effect and where the OOM happened in, the settings to retry
with and the event's record out. In order:
  1. partial checkpointing (some decoder layers uncheckpointed): checkpoint every layer, micro-batch kept;
  2. otherwise the micro-batch is divided by its smallest prime factor (halved when even) and gradient
     accumulation multiplied by it, so the effective batch never changes;
  3. at micro-batch 1 with every layer checkpointed there is nothing left: NoSmallerSettings.
Standard library only (the detector recognises torch's error by its name, without importing torch).
"""

from __future__ import annotations

import os
from dataclasses import replace

from planner.specs import TrainSettings

OOM_MESSAGE = "CUDA out of memory."


class NoSmallerSettings(ValueError):
    """Out of memory at micro-batch 1 with every layer checkpointed: the policy has nothing left to give."""


def is_cuda_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError, or a RuntimeError carrying the CUDA allocator's message."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and OOM_MESSAGE in str(exc)


def backoff(batch_size: int, grad_accum: int) -> tuple[int, int]:
    """After an OOM: the micro-batch divided by its smallest prime factor (halved when even) and the
    accumulation multiplied by it, so batch_size * grad_accum (the effective batch) is unchanged."""
    if batch_size < 2:
        raise ValueError("micro-batch 1 cannot be reduced")
    p = next(d for d in range(2, batch_size + 1) if batch_size % d == 0)
    return batch_size // p, grad_accum * p


def next_settings(train: TrainSettings, event: dict) -> tuple[TrainSettings, dict]:
    """The settings to retry with after an OOM, and the event's record (run_report.json's oom_events).

    event: where it happened: "phase" ("probe"/"train", one GPU) or "rank" (several), "step" (1-based: the
    step that failed), "message", "resumed_from" (the checkpoint the retry starts from, or None).
    The record keeps those keys and adds micro_batch/grad_accum before and after (and, when partial
    checkpointing is given back, uncheckpointed_layers before and after). Raises NoSmallerSettings."""
    where = {k: v for k, v in event.items() if k != "resumed_from"}
    before = {"micro_batch_before": train.batch_size, "grad_accum_before": train.grad_accum}
    if train.gradient_checkpointing and train.uncheckpointed_layers:
        record = {**where, **before, "micro_batch_after": train.batch_size, "grad_accum_after": train.grad_accum,
                  "uncheckpointed_layers_before": train.uncheckpointed_layers, "uncheckpointed_layers_after": 0,
                  "resumed_from": event.get("resumed_from")}
        return replace(train, uncheckpointed_layers=0), record
    if train.batch_size < 2:
        raise NoSmallerSettings(f"out of memory at micro-batch 1 x {train.seq_len} tokens")
    mb, accum = backoff(train.batch_size, train.grad_accum)
    record = {**where, **before, "micro_batch_after": mb, "grad_accum_after": accum,
              "resumed_from": event.get("resumed_from")}
    return replace(train, batch_size=mb, grad_accum=accum), record


def explain(record: dict) -> str:
    """The line printed for an OOM event record (one GPU: by phase; several: by rank)."""
    ckpt = record.get("resumed_from")
    where = f"resuming from {os.path.basename(ckpt)}" if ckpt else "starting from step 1"
    mb, accum = record["micro_batch_after"], record["grad_accum_after"]
    if "rank" in record:
        return (f"out of memory on rank {record['rank']} (step {record['step']}): now micro-batch {mb} x accumulation "
                f"{accum} per GPU (global batch unchanged), {where}; no step lost")
    if "uncheckpointed_layers_before" in record:
        return (f"out of memory ({record['phase']}, step {record['step']}) with {record['uncheckpointed_layers_before']} "
                f"layers uncheckpointed: now every layer is checkpointed (micro-batch {mb} kept), {where}; no step lost")
    return (f"out of memory ({record['phase']}, step {record['step']}) at micro-batch {record['micro_batch_before']}: "
            f"now micro-batch {mb} x accumulation {accum} (effective batch {mb * accum} unchanged), {where}; no step lost")
