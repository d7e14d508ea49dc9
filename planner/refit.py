"""`qfit calibrate`: refit the coefficients from the committed runs (writes calibration/coefficients.json and,
through planner.calibration_report, REPORT.md), sweep a user's own GPU, or refit from a user's `qfit run`s.

The fit and the cross-validation live in planner/fit.py; the report's sections in planner/calibration_report.py.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from planner.calibration_report import (
    PLOT_FILE,
    REPORT_FILE,
    _environment,
    _multigpu_runs,
    _with_values,
    contamination_effect,
    exact_budget_rows,
    exact_mode_rows,
    heldout_rows,
    method_section,
    render_report,
    write_plot,
)
from planner.coefficients import DEFAULTS_FILE, FITTED_FILE, user_cache_dir, user_coefficients_file
from planner.errors import QfitError
from planner.fit import (
    cross_validate,
    error_summary,
    fit,
    fit_multigpu,
    method_bands,
    per_measurement,
    predict_rows,
    prepare_rows,
    qlora_only,
    qlora_preds,
    read_runs,
)
from planner.specs import Coefficients


def expand_runs(pattern: str) -> list[str]:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise QfitError(f"no run files match {pattern!r}")
    return paths


def coefficients_document(coeffs, df, cv_model, cv_family, name: str) -> dict:
    env = _environment(df)
    ok = df[(df["status"] == "ok") & (df["budget_bytes"].astype(int) == 0)]
    return {
        "name": name,
        "description": "fitted by `qfit calibrate --refit` from calibration/runs/*.csv",
        "measured_on": {"gpu": env["gpu_name"], "runs": error_summary(cv_model)["runs"], "models": sorted(set(ok["model"])),
                        "stack": f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
                                 f"bitsandbytes {env['bitsandbytes']}, CUDA {env['cuda']}, driver {env['driver']}",
                        "date": env["date"]},
        "cross_validation": {"leave_one_model_out": error_summary(cv_model),
                             "leave_one_family_out": error_summary(cv_family),
                             "leave_one_model_out_every_measurement": error_summary(per_measurement(cv_model)),
                             "leave_one_family_out_every_measurement": error_summary(per_measurement(cv_family))},
        "values": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in coeffs.values.items()},
    }


SPEED_DIR = Path(FITTED_FILE).parent / "speed"
# The throughput fit: the sweeps whose every configuration was timed for about 2 s (--min-timed-seconds 2, step-to-step
# spread within a few percent): QLoRA's grid c and the methods grids (lora, lora-8bit and QLoRA rows beside them), in one
# fit. Every other sweep in SPEED_DIR is a check on another machine (calibration/REPORT.md, "Throughput");
# h100-speed-a/b timed 5 steps (10-20% spread on short steps).
SPEED_FIT_FILES = ("h100-speed-c.csv", "h100-methods-speed.csv", "h100-methods-speed-b.csv")
METHODS_DIR = Path(FITTED_FILE).parent / "methods"  # harness rows of lora / lora-8bit (calibration/grids/methods-*.json)


def speed_section(speed_dir: Path = SPEED_DIR) -> tuple[dict, dict]:
    """(speed_* coefficients, the throughput validation for the report): one fit on SPEED_FIT_FILES, every method's
    rows in it; leave one configuration out, leave one model out, for QLoRA and for each method; the methods' rows
    also predicted by a fit on the QLoRA rows alone (their own terms falling back to QLoRA's: what the terms add);
    the other sweeps predicted as they are and with one CPU factor fitted on their other configurations; the
    padded rows."""
    from planner import guard
    from planner import speed_fit as sf
    from planner.speed import CPU_TERMS

    fit_files = [speed_dir / f for f in SPEED_FIT_FILES]
    rows = sf.read_rows(fit_files)
    co = sf.fit(rows)
    loo = sf.held_out(rows, lambda r: r.config_id, co)
    lomo = sf.held_out(rows, lambda r: r.model, co)
    q = [i for i, r in enumerate(rows) if sf.row_method(r) == "qlora"]
    qlora_only = sf.fit([rows[i] for i in q], Coefficients("start", "", co))
    structural = sf.errors_pct(rows, sf.predict(rows, qlora_only))
    doc = {"fitted_on": [p.name for p in fit_files], "configurations": len({r.config_id for r in rows}), "rows": len(rows),
           "models": sorted({r.model for r in rows}), "gpus": sorted({r.gpu for r in rows}),
           "leave_one_configuration_out": sf.summary([loo[i] for i in q]),
           "leave_one_model_out": sf.summary([lomo[i] for i in q]),
           "by_method": {"rows": {m: sum(sf.row_method(r) == m for r in rows) for m in sorted({sf.row_method(r) for r in rows})},
                         "models": {m: sorted({r.model for r in rows if sf.row_method(r) == m})
                                    for m in sorted({sf.row_method(r) for r in rows})},
                         "leave_one_configuration_out": sf.by_method(rows, loo),
                         "leave_one_model_out": sf.by_method(rows, lomo),
                         "structural": sf.by_method(rows, structural),
                         "against_qlora": sf.method_ratios(rows),
                         "fit_step_iqr_pct": round(statistics.median(sf.step_iqr_pct(p) for p in fit_files), 2)},
           "per_row": [{"run_id": r.run_id, "measured_s": r.step_time_s, "loo_error_pct": round(e, 2)}
                       for r, e in zip(rows, loo)], "other_sweeps": []}
    for path in sorted(speed_dir.glob("*.csv")):
        if path.name in SPEED_FIT_FILES:
            continue
        other = sf.read_rows([path])
        if not other:
            continue
        scale = sf.fit_scale(other, co, CPU_TERMS)
        if len({sf.row_method(r) for r in other}) > 1:  # a methods sweep on another machine: by method, in "Methods"
            doc["by_method"].setdefault("other_machines", []).append({
                "file": path.name, "rows": len(other), "models": sorted({r.model for r in other}),
                "step_iqr_pct": sf.step_iqr_pct(path), "cpu_scale": round(scale, 3),
                "as_shipped": sf.by_method(other, sf.errors_pct(other, sf.predict(other, co))),
                "with_cpu_scale_held_out": sf.by_method(other, sf.held_out_scale(other, co, CPU_TERMS))})
            continue
        # `qfit calibrate --gpu auto` replayed on this machine's data: the guard sees only the default sweep model's
        # rows; the other models' rows are held out
        mine = [r for r in other if r.model == DEFAULT_SWEEP_MODEL]
        rest = [r for r in other if r.model != DEFAULT_SWEEP_MODEL]
        guarded, decisions = guard.guard_speed(co, mine)
        doc["other_sweeps"].append({
            "replay": {"sweep_model": DEFAULT_SWEEP_MODEL, "sweep_rows": len(mine), "held_out_rows": len(rest),
                       "decisions": [d.line() for d in decisions],
                       "held_out_before": sf.summary(sf.errors_pct(rest, sf.predict(rest, co))),
                       "held_out_after": sf.summary(sf.errors_pct(rest, sf.predict(rest, guarded)))},
            "file": path.name, "rows": len(other), "gpus": sorted({r.gpu for r in other}),
            "as_shipped": sf.summary(sf.errors_pct(other, sf.predict(other, co))),
            "cpu_scale": round(scale, 3), "with_cpu_scale_held_out": sf.summary(sf.held_out_scale(other, co, CPU_TERMS))})
    padded = sf.read_rows(sorted(speed_dir.glob("*.csv")), padded=True)
    doc["padded"] = [{"run_id": r.run_id, "measured_s": r.step_time_s, "error_pct": round(e, 1)}
                     for r, e in zip(padded, sf.errors_pct(padded, sf.predict(padded, co)))]
    return co, doc


def refit_and_report(paths: list[str], out_path: str | None = None, report_path: str | None = None) -> str:
    """Fit on every run, cross-validate (never on fitted points), write coefficients and the report."""
    from planner.coefficients import _read

    df = read_runs(paths)
    base = _read(str(DEFAULTS_FILE))
    coeffs = fit(df, base)
    multi = _multigpu_runs()
    if multi is not None:  # several GPUs: NCCL buffers and the FSDP margin (planner.fit.fit_multigpu)
        coeffs = _with_values(coeffs, **fit_multigpu(multi, coeffs))
    method_paths = sorted(str(p) for p in METHODS_DIR.glob("*.csv")) if METHODS_DIR.is_dir() else []
    df_all, n_unmeasured = df, 0
    if method_paths:  # lora / lora-8bit rows: predicted only, beside (never in) the runs the coefficients come from
        import pandas as pd

        dm = read_runs(method_paths)
        # lora-8bit keeps the outlier columns of its inputs (planner.memory.int8_outlier_bytes_per_token), a share
        # measured per run since the harness records it: rows from before (no share) are left out of the band
        share = dm["int8_outlier_share"] if "int8_outlier_share" in dm.columns else pd.Series(float("nan"), index=dm.index)
        unmeasured = (dm["method"] == "lora-8bit") & pd.to_numeric(share, errors="coerce").isna()
        n_unmeasured = int(unmeasured.sum())
        df_all = pd.concat([df, dm[~unmeasured]], ignore_index=True)
    cv_all = cross_validate(df_all, "model", base)  # every method's rows, predicted by fits on QLoRA rows only
    cv_model = qlora_preds(cv_all)
    cv_family = qlora_preds(cross_validate(df, "family", base))
    speed_coeffs, speed = speed_section()
    coeffs = _with_values(coeffs, **speed_coeffs)
    doc = coefficients_document(coeffs, df, cv_model, cv_family, f"h200-{_environment(df)['date']}")
    doc["cross_validation"]["speed"] = {k: v for k, v in speed.items() if k not in ("per_row", "padded")}
    bands = method_bands(cv_all)
    if set(bands) != {"qlora"}:  # rows of calibration/grids/methods.json: each method's own band
        doc["cross_validation"]["leave_one_model_out_by_method"] = bands
    doc["values"]["speed_cv_error_pct"] = speed["leave_one_configuration_out"]["median"]
    doc["values"]["speed_calibrated_on"] = ",".join(speed["gpus"])
    out = Path(out_path) if out_path else FITTED_FILE
    out.write_text(json.dumps(doc, indent=2) + "\n")
    items = prepare_rows(qlora_only(df), base)
    doc["contaminated"] = contamination_effect(df, base, items)
    fitted_preds = predict_rows(items, coeffs)
    exact = exact_mode_rows(items, paths)
    heldout = heldout_rows(coeffs)
    report = render_report(doc, cv_model, fitted_preds, df, coeffs, exact, heldout, exact_budget_rows(df, coeffs), speed)
    speed_by_method = speed["by_method"]
    measured_on = ", ".join(sorted({str(g) for g in df_all[df_all["source_file"].isin(method_paths)]["gpu_name"]}))
    report = report.rstrip("\n") + "\n\n" + "\n".join(method_section(bands, speed_by_method, measured_on, n_unmeasured)) + "\n"
    rpath = Path(report_path) if report_path else REPORT_FILE
    rpath.write_text(report)
    plot = write_plot(cv_model, rpath.parent / PLOT_FILE.name)
    s = doc["cross_validation"]["leave_one_model_out"]
    return (f"fitted {s['runs']} runs of {', '.join(s['models'])}: leave-one-model-out peak reserved "
            f"median {s['reserved']['median_abs_pct']}% / max {s['reserved']['max_abs_pct']}%; "
            f"peak allocated median {s['allocated']['median_abs_pct']}% / max {s['allocated']['max_abs_pct']}%\n"
            f"wrote {out} and {rpath}" + (f" and {plot}" if plot else " (no plot: pip install matplotlib)"))

# --------------------------------------------------------------------------- a user's own GPU

DEFAULT_SWEEP_MODEL = "mistral-7b"  # a common size class, built locally with random weights
MEMORY_SHARE = 0.4  # of --minutes: the memory sweep (harness, both allocators); the rest times steps
USER_SWEEP_TIMED_S = 2.0  # each speed configuration timed for about this long: short steps vary 10-20% step to step


def calibrate_this_gpu(target_model: str | None, echo=print, minutes: float = 10.0) -> Path:
    """Sweep this machine's GPU within `minutes`, then change only what the sweep can identify and what passes the
    guard (planner.guard): write user coefficients for this GPU and print the before/after table."""
    from planner.hardware import detect_gpu
    from planner.profiles import load_model, match_gpu_name

    if not minutes > 0:
        raise QfitError(f"--minutes must be positive, got {minutes}")
    if target_model:
        load_model(target_model)  # an unknown model is a one-line error before any GPU work
    found = detect_gpu()
    if found is None:
        raise QfitError("no NVIDIA GPU found: `qfit calibrate --gpu auto` runs on a CUDA machine "
                         "(on a CPU, `qfit calibrate --refit` refits the committed data)")
    name, total = found
    spec = match_gpu_name(name)
    key = spec.name if spec else f"{total}B"
    cache = user_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    t_end = time.time() + minutes * 60
    grid = _user_grid(target_model)
    grid_file = cache / "calibrate-grid.json"
    grid_file.write_text(json.dumps(grid))
    runs = cache / f"calibrate-{key}-{stamp}.csv"
    mem_s = minutes * 60 * MEMORY_SHARE
    for alloc in ("expandable_segments:True", ""):
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=alloc)
        echo(f"[1/3] memory: {len(grid)} configurations (PYTORCH_CUDA_ALLOC_CONF={alloc or 'default'}), "
             f"at most {mem_s / 2 / 60:.1f} min ...")
        subprocess.run([sys.executable, "-m", "planner.train.harness", "--grid", str(grid_file), "--out", str(runs),
                        "--workdir", str(cache / "models"), "--time-limit", str(mem_s / 2)], env=env, check=True)
    speed_grid = cache / "calibrate-speed-grid.json"
    speed_grid.write_text(json.dumps(user_speed_grid(target_model or DEFAULT_SWEEP_MODEL)))
    speed_csv = cache / f"calibrate-speed-{key}-{stamp}.csv"
    left = max(60.0, t_end - time.time())
    echo(f"[2/3] speed: timing steps of {target_model or DEFAULT_SWEEP_MODEL} (random weights), at most {left / 60:.1f} min ...")
    subprocess.run([sys.executable, "-m", "planner.train.throughput", "--grid", str(speed_grid), "--out", str(speed_csv),
                    "--workdir", str(cache / "models"), "--time-limit", str(left - 30),
                    "--min-timed-seconds", str(USER_SWEEP_TIMED_S)],
                   env=dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True"), check=True)
    echo("[3/3] fitting what the sweep can identify, each change held out configuration by configuration ...")
    from planner import guard
    from planner import speed_fit as sf
    from planner.coefficients import load_coefficients

    shipped = load_coefficients(None)
    memory, mem_decisions = guard.guard_memory(shipped, read_runs([str(runs)]))
    speed_rows = sf.read_rows([speed_csv]) if speed_csv.is_file() else []
    speed_values, speed_decisions = guard.guard_speed({k: v for k, v in shipped.values.items() if k.startswith("speed_")
                                                       and isinstance(v, float)}, speed_rows)
    values = {**memory.values, **speed_values}
    echo("before (shipped) / after (candidate), median abs error on the sweep's configurations, each held out:")
    echo(guard.decision_table(mem_decisions + speed_decisions))
    out = user_coefficients_file(key)
    out.write_text(json.dumps({"name": f"user-{key}", "description": f"your calibration of {name} ({runs.name}, {speed_csv.name})",
                               "measured_on": {"gpu": name, "runs": len(speed_rows), "date": time.strftime('%Y-%m-%d')},
                               "guard": [d.line() for d in mem_decisions + speed_decisions],
                               "values": values}, indent=2))
    return out


def user_speed_grid(model: str) -> list[dict]:
    """Configurations that let a sweep see both halves of the speed model on this machine: small micro-batches
    (the CPU's launch overheads) and large packed ones (the GPU's rates), two of them twice for the noise."""
    A, L = "attn", "all-linear"
    rows = [
        {"model": model, "batch_size": 1, "seq_len": 512, "rank": 8, "targets": A, "optim": "adamw_torch", "data": "full"},
        {"model": model, "batch_size": 1, "seq_len": 1024, "rank": 16, "targets": L, "data": "packed"},
        {"model": model, "batch_size": 8, "seq_len": 1024, "rank": 16, "targets": L, "data": "packed"},
        {"model": model, "batch_size": 2, "seq_len": 4096, "rank": 16, "targets": A, "optim": "adamw_torch", "data": "full"},
        {"model": model, "batch_size": 4, "seq_len": 1024, "rank": 8, "targets": A, "data": "packed", "grad_accum": 4, "steps": 3},
        {"model": model, "batch_size": 2, "seq_len": 2048, "rank": 16, "targets": A, "data": "packed", "gradient_checkpointing": False},
    ]
    return rows + [{**rows[0], "repeat": 1}, {**rows[2], "repeat": 1}]


def _user_grid(target_model: str | None) -> list[dict]:
    """The memory sweep: a small model and one of the size the user trains (--model, else the 7B class), so that the
    guard can hold one model out and see whether the allocator's coefficients carry over (planner.guard)."""
    models = ["qwen2.5-0.5b", target_model or DEFAULT_SWEEP_MODEL]
    rows = []
    for m in models:
        for batch, seq, ckpt, rank, targets, optim in ((1, 512, True, 16, "all-linear", "paged_adamw_32bit"),
                                                        (4, 512, False, 16, "attn", "adamw_torch"),
                                                        (4, 1024, True, 16, "all-linear", "paged_adamw_32bit"),
                                                        (2, 2048, True, 64, "all-linear", "paged_adamw_8bit")):
            rows.append({"model": m, "batch": batch, "seq": seq, "ckpt": ckpt, "rank": rank, "targets": targets,
                         "optim": optim, "bisect": batch == 4 and ckpt})
    return rows


def refit_from_user_runs(echo=print) -> Path:
    """Refit for this GPU from `qfit run` measurements appended to the user's runs.csv."""
    path = user_cache_dir() / "runs.csv"
    if not path.is_file():
        raise QfitError(f"no measured runs yet ({path} does not exist): train with `qfit run` first")
    df = read_runs([str(path)])
    if (df["status"] == "ok").sum() < 3:
        raise QfitError(f"{path} has fewer than 3 completed runs: too few to refit")
    gpu = str(df.iloc[-1]["gpu_name"])
    from planner.profiles import match_gpu_name

    spec = match_gpu_name(gpu)
    key = spec.name if spec else gpu.replace(" ", "-")
    from planner import guard
    from planner.coefficients import load_coefficients

    shipped = load_coefficients(None)
    coeffs, decisions = guard.guard_memory(shipped, df)
    echo(guard.decision_table(decisions))
    out = user_coefficients_file(key)
    out.write_text(json.dumps({"name": f"user-runs-{key}", "description": f"refit from your runs on {gpu}",
                               "measured_on": {"gpu": gpu, "runs": int((df['status'] == 'ok').sum())},
                               "guard": [d.line() for d in decisions], "values": coeffs.values}, indent=2))
    echo(f"refit {len(df)} runs on {gpu}")
    return out
