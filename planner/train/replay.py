"""Exact mode against the calibration runs: trace every measured configuration at its whole depth on
fake tensors (planner/train/exact.py), replay the allocation log through the simulated caching
allocator (planner/allocsim.py), and write what it predicts beside what the GPU measured.

    python -m planner.train.replay --out calibration/simulated.csv [--jobs 2]

One row per distinct configuration and allocator setting (run_id without the cap); rows already in
--out are kept, so an interrupted run resumes. `qfit calibrate --refit` reads the file into
calibration/REPORT.md ("Exact mode"). Nothing here is fitted: every prediction is out of sample.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

FIELDS = ("config_id", "model", "alloc_conf", "input_requires_grad", "simulated_allocated_bytes",
          "simulated_reserved_bytes", "traced_layers", "trace_seconds", "torch", "transformers", "peft", "bitsandbytes")
# files measured before harness.run_one disabled the enable_input_require_grads hook a checkpointed
# configuration leaves on the loaded model (commit ed7d96c): later non-checkpointed rows of the same
# model group ran with the embedding output requiring grad
HOOK_LEFT_FILES = ("h200-a-expandable.csv", "h200-alloc-default.csv", "h200-b-expandable.csv", "h200-c-expandable.csv")


def config_id(run_id: str) -> str:
    return run_id.rsplit("|cap", 1)[0]


def rows_with_hooks(path: str):
    """(row, hook) for every row of a measured CSV: hook is whether the enable_input_require_grads hook an
    earlier checkpointed configuration of the same model group left on was still on for this row."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    ckpt_ran = set()
    for row in rows:
        group = (row["model"], row["compute_dtype"], row["double_quant"])
        yield row, Path(path).name in HOOK_LEFT_FILES and group in ckpt_ran and row["gradient_checkpointing"] != "True"
        if row["gradient_checkpointing"] == "True":
            ckpt_ran.add(group)


def traceable(row: dict) -> bool:
    """Replayed: qlora and lora rows, not lora-8bit. Exact mode traces lora-8bit at LLM.int8 threshold 0 and adds
    its outlier columns afterwards (planner.exact.int8_outlier_bytes), outside the allocation log this module
    replays; the measured lora-8bit rows held outlier shares up to 0.37 (random weights), so a replay without
    them would not be the configuration that was measured."""
    return (row.get("method") or "qlora") != "lora-8bit"


def configurations(paths: list[str]) -> list[dict]:
    """Each measured configuration once (completed, uncapped rows), with whether the input-grad hook was on."""
    out, seen = [], set()
    for path in paths:
        for row, hook in rows_with_hooks(path):
            key = (config_id(row["run_id"]), hook)
            if row["status"] != "ok" or int(row["budget_bytes"]) != 0 or key in seen or not traceable(row):
                continue
            seen.add(key)
            out.append({"row": row, "hook": hook})
    return out


def simulate_one(row: dict, hook: bool, budget: bool = False) -> dict:
    import dataclasses

    from planner.codec import settings_from_dict
    from planner.exact import resolve
    from planner.train import exact as heavy
    from planner.train import stack

    lora, train = settings_from_dict(row)
    spec, cfg = resolve(row["model"])
    t0 = time.perf_counter()
    raw = heavy.trace(cfg, dataclasses.replace(spec, num_hidden_layers=spec.num_hidden_layers), lora, train,
                      spec.num_hidden_layers, input_requires_grad=hook, simulate=True, simulate_budget=budget)
    versions = stack.library_versions()
    return {"config_id": config_id(row["run_id"]), "model": row["model"], "alloc_conf": row["alloc_conf"],
            "input_requires_grad": hook, "simulated_allocated_bytes": raw.simulated_allocated,
            "simulated_reserved_bytes": raw.simulated_reserved, "traced_layers": raw.layers,
            **({"simulated_required_bytes": raw.simulated_required} if budget else {}),
            "trace_seconds": round(time.perf_counter() - t0, 1),
            **{k: versions.get(k, "") for k in ("torch", "transformers", "peft", "bitsandbytes")}}


def grid_rows(name: str, alloc_conf: str) -> list[dict]:
    """A harness grid's configurations as measured-row dicts (run_id as the harness writes it), to predict
    before they are measured."""
    from planner.train.harness import grid, grid_from_json, run_id

    out = []
    for c in (grid_from_json(name) if name.endswith(".json") else grid(name)):
        if not traceable(c):
            continue
        row = {**c, "alpha": 2 * c["rank"], "lora_dropout": 0.05, "alloc_conf": alloc_conf,
               "gradient_checkpointing": str(c["gradient_checkpointing"]), "double_quant": str(c["double_quant"])}
        row["run_id"] = run_id(c, alloc_conf)
        out.append({"row": row, "hook": False})
    return out


def analytic(row: dict) -> dict:
    """The analytic plan's prediction with the published coefficients (calibration/coefficients.json)."""
    from planner.codec import settings_from_dict
    from planner.coefficients import load_coefficients
    from planner.fit import row_model
    from planner.memory import estimate

    lora, train = settings_from_dict(row)
    coeffs = load_coefficients()
    bd = estimate(row_model(row), lora, train, coeffs)
    return {"analytic_allocated_bytes": bd.peak_allocated_bytes, "analytic_reserved_bytes": bd.peak_reserved_bytes,
            "analytic_required_bytes": bd.required_bytes, "coefficients": coeffs.name}


def bisected(paths: list[str]) -> set[str]:
    """Configurations measured again under allocator caps (the harness's bisection rows)."""
    out = set()
    for path in paths:
        with open(path, newline="") as fh:
            out |= {config_id(r["run_id"]) for r in csv.DictReader(fh) if int(r["budget_bytes"]) != 0}
    return out


def read_simulated(path: str) -> dict[tuple[str, bool], dict]:
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as fh:
        return {(r["config_id"], r["input_requires_grad"] == "True"): r for r in csv.DictReader(fh)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="calibration/runs/*.csv")
    ap.add_argument("--out", default="calibration/simulated.csv")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--only", default="", help="only configurations whose id contains this")
    ap.add_argument("--grid", default="", help="predict a harness grid (planner/train/harness.py) instead of measured runs, "
                                               "with the analytic plan's prediction beside exact mode's")
    ap.add_argument("--alloc-conf", default="expandable_segments:True", help="with --grid: the allocator setting to predict")
    ap.add_argument("--budget", action="store_true",
                    help="the configurations measured under allocator caps only, with the smallest cap each runs under")
    args = ap.parse_args(argv)
    if os.path.exists(args.out):
        with open(args.out, newline="") as fh:
            header = fh.readline().rstrip("\r\n").split(",")
        if header[:len(FIELDS)] != list(FIELDS):
            ap.error(f"{args.out} was written with other columns: give a new --out file")
    done = read_simulated(args.out)
    paths = sorted(glob.glob(args.runs))
    if not args.grid and not paths:
        ap.error(f"no measured runs match --runs {args.runs!r}")
    try:
        configs = grid_rows(args.grid, args.alloc_conf) if args.grid else configurations(paths)
    except (SystemExit, OSError, ValueError, KeyError) as exc:
        ap.error(f"cannot read grid {args.grid!r}: {exc}")
    if args.budget:
        configs = [c for c in configs if config_id(c["row"]["run_id"]) in bisected(paths)]
    todo = [c for c in configs
            if (config_id(c["row"]["run_id"]), c["hook"]) not in done and args.only in c["row"]["run_id"]]
    fields = FIELDS + (("analytic_allocated_bytes", "analytic_reserved_bytes", "analytic_required_bytes", "coefficients")
                       if args.grid else ()) + (("simulated_required_bytes",) if args.budget else ())
    print(f"{len(todo)} configurations to trace ({len(done)} already in {args.out})", flush=True)
    new = not os.path.exists(args.out)
    with open(args.out, "a", newline="") as fh, ProcessPoolExecutor(max(1, args.jobs)) as pool:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()
        futures = [pool.submit(simulate_one, c["row"], c["hook"], args.budget) for c in todo]
        for c, fut in zip(todo, futures):
            r = fut.result()
            if args.grid:
                r.update(analytic(c["row"]))
            writer.writerow(r)
            fh.flush()
            print(f"{r['config_id']}: reserved {r['simulated_reserved_bytes']} allocated {r['simulated_allocated_bytes']} "
                  f"({r['trace_seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
