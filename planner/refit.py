"""`qfit calibrate`: refit the coefficients from the committed runs (writes calibration/coefficients.json and,
through planner.calibration_report, REPORT.md), sweep a user's own GPU, or refit from a user's `qfit run`s.

The fit and the cross-validation live in planner/fit.py; the report's sections in planner/calibration_report.py.
"""

from __future__ import annotations

import glob
import json
import os
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
    per_measurement,
    predict_rows,
    prepare_rows,
    read_runs,
)
from planner.report import gib_str


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
# The throughput fit uses this sweep (the most configurations and timed steps); every other sweep in SPEED_DIR is
# a check on another machine (calibration/REPORT.md, "Throughput").
SPEED_FIT_FILES = ("h100-speed-b.csv",)


def speed_section(speed_dir: Path = SPEED_DIR) -> tuple[dict, dict]:
    """(speed_* coefficients, the throughput validation for the report): fit on SPEED_FIT_FILES; leave one
    configuration out, leave one model out; the other sweeps predicted as they are and with one CPU factor fitted
    on their other configurations; the padded rows."""
    from planner import speed_fit as sf

    fit_files = [speed_dir / f for f in SPEED_FIT_FILES]
    rows = sf.read_rows(fit_files)
    co = sf.fit(rows)
    loo = sf.held_out(rows, lambda r: r.config_id, co)
    lomo = sf.held_out(rows, lambda r: r.model, co)
    doc = {"fitted_on": [p.name for p in fit_files], "configurations": len({r.config_id for r in rows}), "rows": len(rows),
           "models": sorted({r.model for r in rows}), "gpus": sorted({r.gpu for r in rows}),
           "leave_one_configuration_out": sf.summary(loo), "leave_one_model_out": sf.summary(lomo),
           "per_row": [{"run_id": r.run_id, "measured_s": r.step_time_s, "loo_error_pct": round(e, 2)}
                       for r, e in zip(rows, loo)], "other_sweeps": []}
    for path in sorted(speed_dir.glob("*.csv")):
        if path.name in SPEED_FIT_FILES:
            continue
        other = sf.read_rows([path])
        if not other:
            continue
        scale = sf.fit_cpu_scale(other, co)
        doc["other_sweeps"].append({
            "file": path.name, "rows": len(other), "gpus": sorted({r.gpu for r in other}),
            "as_shipped": sf.summary(sf.errors_pct(other, sf.predict(other, co))),
            "cpu_scale": round(scale, 3), "with_cpu_scale_held_out": sf.summary(sf.held_out_cpu_scale(other, co))})
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
    cv_model = cross_validate(df, "model", base)
    cv_family = cross_validate(df, "family", base)
    speed_coeffs, speed = speed_section()
    coeffs = _with_values(coeffs, **speed_coeffs)
    doc = coefficients_document(coeffs, df, cv_model, cv_family, f"h200-{_environment(df)['date']}")
    doc["cross_validation"]["speed"] = {k: v for k, v in speed.items() if k not in ("per_row", "padded")}
    doc["values"]["speed_cv_error_pct"] = speed["leave_one_configuration_out"]["median"]
    doc["values"]["speed_calibrated_on"] = ",".join(speed["gpus"])
    out = Path(out_path) if out_path else FITTED_FILE
    out.write_text(json.dumps(doc, indent=2) + "\n")
    items = prepare_rows(df, base)
    doc["contaminated"] = contamination_effect(df, base, items)
    fitted_preds = predict_rows(items, coeffs)
    exact = exact_mode_rows(items, paths)
    heldout = heldout_rows(coeffs)
    report = render_report(doc, cv_model, fitted_preds, df, coeffs, exact, heldout, exact_budget_rows(df, coeffs), speed)
    rpath = Path(report_path) if report_path else REPORT_FILE
    rpath.write_text(report)
    plot = write_plot(cv_model, rpath.parent / PLOT_FILE.name)
    s = doc["cross_validation"]["leave_one_model_out"]
    return (f"fitted {s['runs']} runs of {', '.join(s['models'])}: leave-one-model-out peak reserved "
            f"median {s['reserved']['median_abs_pct']}% / max {s['reserved']['max_abs_pct']}%; "
            f"peak allocated median {s['allocated']['median_abs_pct']}% / max {s['allocated']['max_abs_pct']}%\n"
            f"wrote {out} and {rpath}" + (f" and {plot}" if plot else " (no plot: pip install matplotlib)"))

# --------------------------------------------------------------------------- a user's own GPU

def calibrate_this_gpu(target_model: str | None, echo=print) -> Path:
    """Sweep this machine's GPU (a few minutes), fit, and write user coefficients for it."""
    from planner.hardware import detect_gpu
    from planner.profiles import match_gpu_name

    found = detect_gpu()
    if found is None:
        raise QfitError("no NVIDIA GPU found: `qfit calibrate --gpu auto` runs on a CUDA machine "
                         "(on a CPU, `qfit calibrate --refit` refits the committed data)")
    name, total = found
    spec = match_gpu_name(name)
    key = spec.name if spec else f"{total}B"
    cache = user_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    grid = _user_grid(target_model)
    grid_file = cache / "calibrate-grid.json"
    grid_file.write_text(json.dumps(grid))
    runs = cache / f"calibrate-{key}-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    for alloc in ("expandable_segments:True", ""):
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=alloc)
        echo(f"sweeping {len(grid)} configurations (PYTORCH_CUDA_ALLOC_CONF={alloc or 'default'}) ...")
        subprocess.run([sys.executable, "-m", "planner.train.harness", "--grid", str(grid_file), "--out", str(runs),
                        "--workdir", str(cache / "models")], env=env, check=True)
    df = read_runs([str(runs)])
    # the shipped calibration is the prior: a few minutes of runs on one or two models refine it (the ridge pulls
    # what they cannot identify back to it) instead of replacing a 64-run fit
    from planner.coefficients import load_coefficients

    shipped = load_coefficients(None)
    coeffs = fit(df, base=shipped)
    errs = error_summary(predict_rows(prepare_rows(df, shipped), coeffs))
    echo(f"fitted on {errs['runs']} runs of {', '.join(errs['models'])} (in-sample): peak reserved median "
         f"{errs['reserved']['median_abs_pct']}% / max {errs['reserved']['max_abs_pct']}% error; "
         f"CUDA context {gib_str(int(coeffs.get('cuda_context_bytes')))} GiB")
    out = user_coefficients_file(key)
    out.write_text(json.dumps({"name": f"user-{key}", "description": f"your calibration of {name} ({runs.name})",
                               "measured_on": {"gpu": name, "runs": int((df['status'] == 'ok').sum()), "date": time.strftime('%Y-%m-%d')},
                               "values": coeffs.values}, indent=2))
    return out


def _user_grid(target_model: str | None) -> list[dict]:
    models = ["qwen2.5-0.5b"] + ([target_model] if target_model else [])
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
    coeffs = fit(df)
    out = user_coefficients_file(key)
    out.write_text(json.dumps({"name": f"user-runs-{key}", "description": f"refit from your runs on {gpu}",
                               "measured_on": {"gpu": gpu, "runs": int((df['status'] == 'ok').sum())},
                               "values": coeffs.values}, indent=2))
    echo(f"refit {len(df)} runs on {gpu}")
    return out
