"""The QLoRA lesson's recipe exactly as it trains, against `qfit run`, on one emulated 16 GB card (QFIT_EMULATE_GPU caps
torch's allocator on a bigger GPU): same model architecture, same alpaca-like data, real (non-padding) tokens/s.

  lesson        micro-batch 4 x accumulation 4, LoRA r8 (alpha 16) on q,k,v,o, gradient checkpointing on every layer,
                paged_adamw_32bit, fp16 compute (a T4 has no bf16), rows padded to the longest in each micro-batch
                (what TRL's SFTTrainer does with packing off): `qfit run --no-packing` with those settings fixed
  qfit          `qfit run` with nothing fixed but the packed row length (--seq-len 1024): its own plan, packing on
  qfit-lesson   the same with the lesson's LoRA (--rank 8 --alpha 16 --targets q_proj,k_proj,v_proj,o_proj)

The data: 3,000 rows whose token lengths follow Alpaca's under a Llama tokenizer (log-normal, median 114, p99 about
538, max 791: planner.packing.alpaca_like_lengths), cut from planner/demo's texts with the demo tokenizer.
The model is --model's architecture with random weights (speed and memory do not depend on the values), saved in
--workdir (/dev/shm when it has room) with planner/demo's tokenizer (byte-level BPE, ids < 512).

tokens/s is run_report.json's speed.tokens_per_s for every run: non-padding tokens of the micro-batches each optimizer
step trained on, over the summed optimizer-step wall time (every step, the first included; load, fit probe and
checkpoint saves excluded). The runs train different numbers of tokens (a packed step holds more rows); the
comparison is of rates.

Run on the GPU machine (about 3 minutes for Mistral-7B):
    python benchmarks/gpu_recipes.py --out /tmp/gpu-recipes
CPU smoke test of the whole pipeline (tests/test_gpu_recipes.py; tiny-llama, 2 steps, no emulation):
    python benchmarks/gpu_recipes.py --out /tmp/gpu-recipes-smoke --cpu-smoke
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

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the planner package is in the repo root
    sys.path.insert(0, str(ROOT))

from planner import data as qdata  # noqa: E402
from planner.profiles import ProfileError, load_gpu, load_model  # noqa: E402
from planner.report import gib_str  # noqa: E402

SEQ_LEN = 1024  # the packed row length of the qfit runs; the longest alpaca-like row (791 tokens) fits
EFFECTIVE_BATCH = 16
ROWS = 3000
TARGETS = {"qfit-lesson": 3.0, "qfit": 1.5}  # required speed-up over the lesson (issue: throughput)
DATASETS = ("alpaca-like",)
LESSON_LORA = ("--rank", "8", "--alpha", "16", "--targets", "q_proj,k_proj,v_proj,o_proj")
SHARED = ("--save-steps", "100000", "--effective-batch", str(EFFECTIVE_BATCH))
RECIPES = {
    "lesson": (*LESSON_LORA, "--batch-size", "4", "--gradient-checkpointing", "--uncheckpointed-layers", "0",
               "--optim", "paged_adamw_32bit", "--compute-dtype", "fp16", "--no-packing", "--seq-len", str(SEQ_LEN)),
    "qfit": ("--seq-len", str(SEQ_LEN)),
    "qfit-lesson": (*LESSON_LORA, "--seq-len", str(SEQ_LEN)),
}
BASELINE = "lesson"
SMOKE_SEQ_LEN = 256  # --cpu-smoke: tiny-llama takes 512 positions
MARKER = "qfit-bench.json"  # written last: a model directory without it is incomplete and rebuilt
RUN_TIMEOUT_S = 300  # one run is about 1.5 min for Mistral-7B on an H200 (most of it the 4-bit load)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------- model

def model_dir(workdir: Path, model: str, dtype: str, layers: int | None) -> Path:
    return workdir / (f"{model}-{dtype}" + (f"-{layers}layers" if layers else ""))


def default_workdir(out: Path, param_count: int, dtype_bytes: int = 2) -> Path:
    """/dev/shm (loads fastest) when it holds the checkpoint with 10% to spare, else under --out."""
    shm = Path("/dev/shm")
    need = param_count * dtype_bytes * 11 // 10
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > need:
        return shm / "qfit-bench"
    return out / "models"


def build_model(model: str, dtype: str, path: Path, layers: int | None) -> None:
    """Random weights of the profile's architecture (on the GPU when there is one, in a child process so that
    the benchmark process holds no GPU memory), then planner/demo's tokenizer beside them."""
    import torch

    from planner import demo
    from planner.train import harness, stack

    spec = load_model(model)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    stack.save_random_model(stack.hf_config(harness.profile_fields(spec.name), layers), str(path),
                            stack.TORCH_DTYPES[dtype], dev)
    tok = demo.build_tokenizer(512)  # ids 0..511; the demo model's vocabulary
    tok.model_max_length = spec.max_position_embeddings
    tok.save_pretrained(str(path))
    (path / MARKER).write_text(json.dumps({"model": spec.name, "dtype": dtype, "layers": layers}) + "\n")


def ensure_model(model: str, dtype: str, path: Path, layers: int | None, log: Path) -> float:
    """The model directory, built unless a complete one is there. -> seconds spent."""
    if (path / MARKER).is_file():
        return 0.0
    t0 = time.perf_counter()
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--build-model", str(path), "--model", model,
           "--dtype", dtype] + (["--layers", str(layers)] if layers else [])
    with log.open("w") as fh:
        code = subprocess.run(cmd, cwd=ROOT, env=child_env({}), stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0 or not (path / MARKER).is_file():
        last = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:] or ["no output"]
        raise RuntimeError(f"building {model} in {path} failed (exit {code}): {last[0][:200]} (log: {log})")
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- data

def alpaca_like_rows(tokenizer, count: int) -> list[dict]:
    """Text rows whose token counts (BOS and EOS included) follow alpaca_like_lengths: windows of a token stream made
    of the demo texts, decoded back to text. Deterministic."""
    from planner import demo
    from planner.packing import alpaca_like_lengths

    stream = tokenizer("\n\n".join(demo.training_texts()), add_special_tokens=False)["input_ids"]
    rows, at = [], 0
    for n in alpaca_like_lengths(count, seed=7):
        k = max(1, n - 2)  # qfit adds BOS and EOS
        if at + k > len(stream):
            at = 0
        rows.append({"text": tokenizer.decode(stream[at:at + k])})
        at += k
    return rows


def write_datasets(data_dir: Path, tokenizer, rows_needed: int) -> dict[str, Path]:
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {"alpaca-like": data_dir / "alpaca-like.jsonl"}
    rows = alpaca_like_rows(tokenizer, max(rows_needed, ROWS))
    paths["alpaca-like"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def data_stats(path: Path, tokenizer) -> dict:
    """Token lengths as `qfit run` tokenizes the rows (BOS + EOS included), and what padding every row to SEQ_LEN costs."""
    rows, fmt = qdata.load_rows(str(path))
    examples, _ = qdata.tokenize_rows(rows, fmt, tokenizer)
    lengths = [len(e) for e in examples]
    cut = [min(n, SEQ_LEN) for n in lengths]
    return {"file": str(path), "format": fmt, "rows": len(rows), "lengths": qdata.length_stats(lengths).as_dict(),
            "mean_tokens": round(sum(lengths) / len(lengths), 1),
            "truncation_rate": round(qdata.truncation_rate(lengths, SEQ_LEN), 4),
            # tokens a max-length recipe computes that are padding: 1 - real / (rows x SEQ_LEN)
            "padding_share_at_max_length": round(1 - sum(cut) / (len(cut) * SEQ_LEN), 4)}


# --------------------------------------------------------------------------- runs

def child_env(extra: dict) -> dict:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")  # local model directory: never ask the Hub
    return env


def run_one(name: str, model_path: Path, data: Path, out: Path, recipe: str, steps: int, env: dict,
            timeout_s: float = RUN_TIMEOUT_S, extra: tuple = ()) -> dict:
    """One `qfit run` process. -> its row (report figures, or status "failed" with the log's last line)."""
    run_dir, log = out / "runs" / name, out / "logs" / f"{name}.log"
    shutil.rmtree(run_dir, ignore_errors=True)  # ours: a previous invocation's run
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "planner.cli", "run", str(model_path), "--dataset", str(data),
           "--output", str(run_dir), "--max-steps", str(steps), *SHARED, *RECIPES[recipe]]
    if extra:
        cmd += list(extra)
    t0 = time.perf_counter()
    with log.open("w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = -1
    wall = time.perf_counter() - t0
    report_path = run_dir / "run_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    row = {"name": name, "recipe": recipe, "exit_code": code, "wall_s": round(wall, 1), "log": str(log),
           "command": cmd}
    if code != 0 or report is None or report.get("status") != "completed":
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        row.update(status="failed", error="timed out" if code == -1 else (lines[-1] if lines else "no output"))
        return row
    return {**row, **report_row(report)}


def report_row(report: dict) -> dict:
    """The figures of one run_report.json (planner.train.run_report.single_report) that the table shows; bytes stay ints."""
    e, speed, measured = report["in_effect"], report["speed"], report["memory"]["measured"]
    emulation = report["device"].get("emulation") or {}
    nvml, base = measured.get("nvml_used_bytes") or 0, measured.get("nvml_baseline_bytes") or 0
    return {
        "status": report["status"], "device": report["device"]["name"],
        "batch_size": e["batch_size"], "grad_accum": e["grad_accum"], "effective_batch": e["effective_batch"],
        "gradient_checkpointing": e["gradient_checkpointing"], "optim": e["optim"], "compute_dtype": e["compute_dtype"],
        "padding": e.get("padding", "longest"), "seq_len": e["seq_len"], "rank": e["rank"], "targets": e["targets"],
        "tokens_per_s": speed["tokens_per_s"], "padded_tokens_per_s": speed["padded_tokens_per_s"],
        "predicted_tokens_per_s": speed["predicted_tokens_per_s"], "train_seconds": speed["train_seconds"],
        "train_tokens": speed.get("train_tokens"), "train_padded_tokens": speed.get("train_padded_tokens"),
        "steps": report["steps"]["completed"], "steps_planned": report["steps"]["planned"],
        "oom_backoffs": len(report["oom_events"]), "oom_events": report["oom_events"],
        "peak_allocated_bytes": measured.get("peak_allocated_bytes", 0),
        "peak_reserved_bytes": measured.get("peak_reserved_bytes", 0),
        "nvml_used_bytes": nvml, "nvml_baseline_bytes": base,
        "nvml_this_process_bytes": nvml - base if nvml and base else 0,  # at the end of training, GPU-wide delta
        "predicted_peak_reserved_bytes": report["memory"]["predicted"]["peak_reserved_bytes"],
        "budget_bytes": emulation.get("budget_bytes", 0), "emulation": emulation or None,
        "loss_first": report["loss"]["first"], "loss_last": report["loss"]["last"],
        "library_versions": report.get("library_versions", {}),
    }


# --------------------------------------------------------------------------- checks and table

def checks(rows: list[dict], steps: dict[str, int], card_bytes: int = 0) -> dict:
    """Per dataset and qfit recipe: completed its steps, no OOM back-off, within the allocator budget (and, by NVML,
    within the emulated card's card_bytes; None: not measured); its speed-up over the lesson and whether it meets
    TARGETS[recipe]."""
    out = {}
    for ds in DATASETS:
        by = {r["recipe"]: r for r in rows if r["dataset"] == ds}
        base = by.get(BASELINE)
        res = {}
        for recipe in RECIPES:
            if recipe == BASELINE:
                continue
            r = by.get(recipe)
            ok = all(x and x.get("status") == "completed" for x in (base, r))
            c = {"completed": ok}
            if ok:
                c["steps_done"] = base["steps"] == steps[BASELINE] and r["steps"] == steps[recipe]
                c["no_oom"] = base["oom_backoffs"] == 0 and r["oom_backoffs"] == 0
                c["within_budget"] = all(not x["budget_bytes"] or x["peak_reserved_bytes"] <= x["budget_bytes"] for x in (base, r))
                used = [x["nvml_this_process_bytes"] for x in (base, r)]
                c["nvml_within_card"] = all(u <= card_bytes for u in used) if card_bytes and all(used) else None
                c["speedup"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3) if base["tokens_per_s"] else None
                pb, pr = base["predicted_tokens_per_s"], r["predicted_tokens_per_s"]
                c["predicted_speedup"] = round(pr / pb, 3) if pb and pr else None  # the speed model, computed tokens
                c["target"] = TARGETS.get(recipe)
                c["target_met"] = bool(c["speedup"] and c["target"] and c["speedup"] >= c["target"] and c["no_oom"])
            res[recipe] = c
        out[ds] = res
    return out


def settings_str(r: dict) -> str:
    return (f"{r['batch_size']}x{r['grad_accum']} · r{r['rank']} {','.join(r['targets']) if isinstance(r['targets'], list) else r['targets']} · "
            f"ckpt {'on' if r['gradient_checkpointing'] else 'off'} · {r['optim']} · {r['compute_dtype']} · {r['padding']}")


def padding_share(r: dict) -> float | None:
    t, p = r.get("train_tokens"), r.get("train_padded_tokens")
    return 1 - t / p if t and p else None


def table(rows: list[dict], result: dict) -> str:
    head = ("| dataset | recipe | settings (micro-batch x accum, LoRA, checkpointing, optimizer, dtype, padding) | tokens/s "
            "| speed-up | padding computed | peak alloc / reserved GiB | NVML GiB** | OOM back-offs | steps |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        ds = r["dataset"]
        if r.get("status") != "completed":
            lines.append(f"| {ds} | {r['recipe']} | FAILED (exit {r['exit_code']}): {r.get('error', '')[:80]} | | | | | | | |")
            continue
        chk = result[ds].get(r["recipe"], {})
        speed = "1.00x" if r["recipe"] == BASELINE else (f"{chk['speedup']:.2f}x" if chk.get("speedup") else "-")
        nvml = gib_str(r["nvml_this_process_bytes"]) if r["nvml_this_process_bytes"] else "-"
        pad = padding_share(r)
        lines.append(f"| {ds} | {r['recipe']} | {settings_str(r)} | {r['tokens_per_s']:,.0f} | {speed} "
                     f"| {'-' if pad is None else f'{pad:.0%}'} | {gib_str(r['peak_allocated_bytes'])} / "
                     f"{gib_str(r['peak_reserved_bytes'])} | {nvml} | {r['oom_backoffs']} | {r['steps']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="directory for the datasets, runs, logs and gpu_recipes.json")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps of the lesson's run (default 12: 12 x 16 rows; --cpu-smoke: 2); the qfit runs "
                         "take --qfit-steps (default 6: each holds 16 packed rows of 1,024 tokens)")
    ap.add_argument("--qfit-steps", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gpu", default="t4", help="catalog GPU to emulate (QFIT_EMULATE_GPU), default t4")
    ap.add_argument("--model", default=None, help="model profile whose architecture is built (default mistral-7b; "
                                                   "--cpu-smoke: tiny-llama)")
    ap.add_argument("--workdir", default=None, help="where the random-weight model is saved "
                                                    "(default /dev/shm/qfit-bench when it has room, else OUT/models)")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (a quick check, not a benchmark)")
    ap.add_argument("--run-timeout", type=float, default=RUN_TIMEOUT_S,
                    help=f"seconds before one `qfit run` is stopped and recorded as failed (default {RUN_TIMEOUT_S})")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="for tests: the whole pipeline on the CPU with tiny-llama, 2 steps, no emulation")
    ap.add_argument("--build-model", metavar="DIR", help=argparse.SUPPRESS)  # internal: the child that builds the model
    ap.add_argument("--dtype", default="fp16", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    model = args.model or ("tiny-llama" if args.cpu_smoke else "mistral-7b")
    if args.build_model:
        build_model(model, args.dtype, Path(args.build_model), args.layers)
        return 0
    if not args.out:
        return fail("--out DIR is required")
    steps = args.steps if args.steps is not None else (2 if args.cpu_smoke else 12)
    if steps < 1:
        return fail(f"--steps must be a positive integer, got {steps}")
    qsteps = args.qfit_steps or (2 if args.cpu_smoke else 6)
    steps_by = {r: (steps if r == BASELINE else qsteps) for r in RECIPES}
    try:
        spec = load_model(model)
        gpu = load_gpu(args.gpu)
    except ProfileError as exc:
        return fail(str(exc))
    seq = SMOKE_SEQ_LEN if args.cpu_smoke else SEQ_LEN
    if seq > spec.max_position_embeddings:
        return fail(f"{spec.display_name} takes at most {spec.max_position_embeddings} tokens, the benchmark needs {seq}")
    if spec.vocab_size < 512:  # the demo tokenizer's ids go up to 511
        return fail(f"{spec.display_name} has a vocabulary of {spec.vocab_size}; the demo tokenizer needs 512")
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        return fail("no CUDA GPU: this benchmark emulates a GPU on a bigger one (use --cpu-smoke to test the pipeline)")

    t_start = time.perf_counter()
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    # the compute dtype the emulated card uses (a T4: fp16) is the dtype the checkpoint is saved in
    dtype = "bf16" if args.cpu_smoke or gpu.bf16 else "fp16"
    workdir = Path(args.workdir).expanduser().resolve() if args.workdir else default_workdir(out, spec.total_param_count)
    mpath = model_dir(workdir, spec.name, dtype, args.layers)
    try:
        build_s = ensure_model(spec.name, dtype, mpath, args.layers, out / "logs" / "build-model.log")
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"[gpu_recipes] model: {spec.display_name} architecture, random weights ({dtype}) in {mpath} "
          + (f"(built in {build_s:.0f} s)" if build_s else "(reused)"), flush=True)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # rows longer than the tiny model's 512 positions: expected here, cut to 512
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(mpath))
    paths = write_datasets(out / "data", tokenizer, 0 if not args.cpu_smoke else 200)
    stats = {name: data_stats(p, tokenizer) for name, p in paths.items()}
    for name, s in stats.items():
        ln = s["lengths"]
        print(f"[gpu_recipes] data {name}: {s['rows']} {s['format']} rows, tokens per row min {ln['min']} / median "
              f"{ln['median']} / mean {s['mean_tokens']} / p95 {ln['p95']} / max {ln['max']}; "
              f"{s['truncation_rate']:.0%} cut to {SEQ_LEN}; padding share at max-length {s['padding_share_at_max_length']:.0%}",
              flush=True)
    data_s = time.perf_counter() - t0

    env = child_env({"QFIT_CACHE": str(out / "qfit-cache")})  # runs.csv etc. stay out of the user's cache
    if args.cpu_smoke:
        env.pop("QFIT_EMULATE_GPU", None)
    else:
        env["QFIT_EMULATE_GPU"] = args.gpu

    def save(rows: list[dict]) -> tuple[dict, dict]:
        """gpu_recipes.json from the rows so far. -> (the document, the checks)."""
        result = checks(rows, steps_by, 0 if args.cpu_smoke else gpu.memory_bytes)
        total_s = time.perf_counter() - t_start
        versions = next((r["library_versions"] for r in rows if r.get("library_versions")), {})
        doc = {
            "benchmark": "the QLoRA lesson's recipe vs qfit run (issue: throughput)",
            "model": spec.name, "model_dir": str(mpath), "layers": args.layers or spec.num_hidden_layers,
            "emulated_gpu": None if args.cpu_smoke else gpu.name, "cpu_smoke": args.cpu_smoke,
            "device": next((r["device"] for r in rows if r.get("device")), ""),
            "steps": steps_by, "seq_len": SEQ_LEN, "effective_batch": EFFECTIVE_BATCH, "shared_options": list(SHARED),
            "recipes": {k: list(v) for k, v in RECIPES.items()}, "target_speedups": TARGETS,
            "datasets": stats, "runs": rows, "checks": result,
            "tokens_per_s_method": ("run_report.json speed.tokens_per_s: non-padding tokens of the micro-batches each "
                                    "optimizer step trained on / summed optimizer-step wall time, every step included (the "
                                    "first too); load, fit probe and checkpoint saves excluded; identical for every recipe"),
            "timings_s": {"model_build": round(build_s, 1), "datasets": round(data_s, 1),
                          "runs": {r["name"]: r["wall_s"] for r in rows}, "total": round(total_s, 1)},
            "library_versions": versions,
        }
        (out / "gpu_recipes.json").write_text(json.dumps(doc, indent=1) + "\n")
        return doc, result

    rows = []
    for ds in DATASETS:
        for recipe in RECIPES:
            name = f"{ds}-{recipe}"
            print(f"[gpu_recipes] run {name} ...", flush=True)
            row = {"dataset": ds, **run_one(name, mpath, paths[ds], out, recipe, steps_by[recipe], env, args.run_timeout,
                                            extra=("--seq-len", str(seq)) if args.cpu_smoke else ())}
            rows.append(row)
            save(rows)  # after every run: what ran survives if the whole command is stopped
            if row["status"] == "completed":
                print(f"[gpu_recipes] run {name}: {row['wall_s']:.0f} s wall, {row['train_seconds']:.1f} s training, "
                      f"{settings_str(row)}, {row['tokens_per_s']:,.0f} tokens/s", flush=True)
            else:
                print(f"[gpu_recipes] run {name} FAILED after {row['wall_s']:.0f} s: {row['error']} (log: {row['log']})",
                      flush=True)

    doc, result = save(rows)
    total_s = doc["timings_s"]["total"]

    where = ("CPU smoke test (no emulation)" if args.cpu_smoke
             else f"{doc['device']}: memory capped to the {gpu.display_name}'s, speed is the real GPU's")
    print()
    print(f"## The lesson's recipe vs qfit run: {spec.display_name} architecture ({doc['layers']} layers, random weights), {where}")
    print(f"{stats['alpaca-like']['rows']} alpaca-like rows; lesson {steps} steps, qfit {qsteps} steps; seed 42")
    print()
    print(table(rows, result))
    print()
    print("tokens/s: non-padding tokens / summed optimizer-step time (every step, the first included; load, fit "
          "probe and saves excluded), the same method for every run. ** NVML used at the end minus before the run.")
    for ds, per in result.items():
        for recipe, chk in per.items():
            if not chk["completed"]:
                print(f"{ds} {recipe}: a run failed (see the logs in {out / 'logs'})")
                continue
            flags = [k for k in ("steps_done", "no_oom", "within_budget", "nvml_within_card") if chk[k] is False]
            pred = f" (speed model: {chk['predicted_speedup']:.2f}x in computed tokens)" if chk["predicted_speedup"] else ""
            print(f"{ds}: {recipe} {chk['speedup']:.2f}x the lesson{pred}; target >= {chk['target']}x with no OOM: "
                  f"{'met' if chk['target_met'] else 'NOT met'}" + (f"; CHECK FAILED: {', '.join(flags)}" if flags else ""))
    print(f"timings: model {build_s:.0f} s, data {data_s:.0f} s, runs "
          + ", ".join(f"{r['name']} {r['wall_s']:.0f} s" for r in rows) + f"; total {total_s:.0f} s")
    print(f"written: {out / 'gpu_recipes.json'}")
    bad = any(not c["completed"] or not c["steps_done"] for per in result.values() for c in per.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
