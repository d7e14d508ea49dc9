"""calibration/REPORT.md: one job, the report `qfit calibrate --refit` writes beside the coefficients. Each
section is a function over the measured rows (calibration/runs, multigpu, heldout, validation) and the fitted
coefficients, returning markdown lines; render_report joins them. Also the predicted-vs-measured plot.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

from planner.coefficients import CALIBRATION_DIR
from planner.fit import CONTAMINATION_BYTES, error_summary, prepare_rows, read_runs, row_model
from planner.report import gib_str
from planner.units import CUBLAS_WORKSPACES_BYTES as CUBLAS_WORKSPACES  # two handles' workspaces, traced in every step

REPORT_FILE = CALIBRATION_DIR / "REPORT.md"
PLOT_FILE = CALIBRATION_DIR / "predicted_vs_measured.png"
VALIDATION_GLOB = str(CALIBRATION_DIR / "validation" / "*.csv")


def _environment(df) -> dict:
    """The stack of the measured rows; a field the rows disagree on lists every value."""
    out = {}
    for k in ("gpu_name", "driver", "torch", "transformers", "peft", "bitsandbytes", "cuda", "date"):
        values = sorted({str(v) for v in df[k] if str(v)})
        out[k] = (f"{values[0]} to {values[-1]}" if k == "date" else ", ".join(values)) if len(values) > 1 else values[0]
    return out


def _families(models: list[str]) -> dict[str, list[str]]:
    from planner.profiles import load_model

    out: dict[str, list[str]] = {}
    for name in sorted(models):
        out.setdefault(load_model(name).model_type, []).append(name)
    return out


def _pct(p: dict, kind: str) -> float:
    return (p[f"predicted_{kind}"] - p[f"measured_{kind}"]) / p[f"measured_{kind}"] * 100


def contamination_effect(df, base, clean_items: list[dict]) -> dict:
    """Contaminated rows against the clean re-measurement of the same configuration: |difference| in %."""
    clean = {it["row"]["run_id"].rsplit("|cap", 1)[0]: it for it in clean_items}
    every = prepare_rows(df, base, keep_contaminated=True, per_configuration=False)
    dirty = [it for it in every if it["offset"] > CONTAMINATION_BYTES]
    pairs = [(it, clean[k]) for it in dirty if (k := it["row"]["run_id"].rsplit("|cap", 1)[0]) in clean]

    def stat(kind):
        d = sorted(abs(a[kind] - b[kind]) / b[kind] * 100 for a, b in pairs) or [0.0]
        return round(d[len(d) // 2], 2), round(d[-1], 2)

    (am, ax), (rm, rx) = stat("alloc"), stat("reserved")
    return {"rows": len(dirty), "remeasured": len(pairs), "allocated_median_pct": am, "allocated_max_pct": ax,
            "reserved_median_pct": rm, "reserved_max_pct": rx}


SIMULATED_FILE = CALIBRATION_DIR / "simulated.csv"


def row_hooks(paths: list[str]) -> dict[tuple[str, str], bool]:
    """(source file, run_id) -> whether enable_input_require_grads was left on (planner.train.replay)."""
    from planner.train.replay import rows_with_hooks

    return {(str(path), row["run_id"]): hook for path in paths for row, hook in rows_with_hooks(path)}


def exact_mode_rows(items: list[dict], paths: list[str], simulated_path: Path = SIMULATED_FILE) -> list[dict]:
    """Exact mode's predictions (calibration/simulated.csv, `python -m planner.train.replay`) against the
    same measured targets the analytic model is judged on. Where the cuBLAS workspaces were allocated
    before the model loaded (a second model group of an older one-process sweep) they are part of the
    subtracted offset, so they come off the traced peaks too."""
    import csv

    if not simulated_path.exists():
        return []
    with simulated_path.open(newline="") as fh:
        sims = {(r["config_id"], r["input_requires_grad"] == "True"): r for r in csv.DictReader(fh)}
    hooks = row_hooks(paths)
    out = []
    for it in items:
        r = it["row"]
        sim = sims.get((r["run_id"].rsplit("|cap", 1)[0], hooks.get((r["source_file"], r["run_id"]), False)))
        if sim is None:
            continue
        ws = CUBLAS_WORKSPACES if it["offset"] >= CUBLAS_WORKSPACES else 0
        out.append({"model": r["model"], "run_id": r["run_id"], "alloc_conf": r["alloc_conf"] or "default",
                    "measured_allocated": it["alloc"], "predicted_allocated": int(sim["simulated_allocated_bytes"]) - ws,
                    "measured_reserved": it["reserved"], "predicted_reserved": int(sim["simulated_reserved_bytes"]) - ws,
                    "phase": "", "tokens_per_s": 0.0})
    return out


SIMULATED_BUDGET_FILE = CALIBRATION_DIR / "simulated-budget.csv"


def exact_budget_rows(df, coeffs) -> list[dict]:
    """Exact mode's smallest allocator budget (calibration/simulated-budget.csv, `python -m
    planner.train.replay --budget`) beside each cap bisection's largest failing and smallest running budget."""
    import csv

    from planner.fit import bisection_groups

    if not SIMULATED_BUDGET_FILE.exists():
        return []
    with SIMULATED_BUDGET_FILE.open(newline="") as fh:
        sims = {r["config_id"]: int(r["simulated_required_bytes"]) for r in csv.DictReader(fh)}
    out = []
    for mode, groups in bisection_groups(df, coeffs).items():
        for g in groups:
            if g["key"] in sims:
                ws = CUBLAS_WORKSPACES if g["offset"] >= CUBLAS_WORKSPACES else 0
                out.append({**g, "mode": mode, "simulated": sims[g["key"]] - ws})
    return out


def exact_budget_section(rows: list[dict]) -> list[str]:
    inside = [r for r in rows if (r["oom_max"] is None or r["simulated"] > r["oom_max"])
              and (r["ok_min"] is None or r["simulated"] <= r["ok_min"])]
    safe = [r for r in rows if r["oom_max"] is None or r["simulated"] > r["oom_max"]]
    over = sorted((r["simulated"] - r["ok_min"]) / r["ok_min"] * 100 for r in rows if r["ok_min"])
    lines = ["", "### Exact mode's smallest budget against the cap bisections", "",
             "The simulator replays the step again under caps (`planner.allocsim.smallest_budget`: with no cached block "
             "to reuse, a request may grow reserved memory only while reserved plus its whole segment size stays under the "
             "cap; otherwise every cached block is released and it is retried once, as PyTorch does). "
             f"{len(rows)} bisected configurations: the simulated smallest budget is above the largest budget that failed in "
             f"{len(safe)} of {len(rows)} and inside the measured bracket (above the largest failing, at most the smallest "
             f"running) in {len(inside)}; against the smallest budget that ran it is "
             f"{over[len(over) // 2]:+.1f}% at the median ({over[0]:+.1f}% to {over[-1]:+.1f}%).", "",
             "| configuration | largest failing budget GiB | smallest budget that ran GiB | exact mode GiB |", "|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["key"]):
        lines.append(f"| {r['key']} | {gib_str(r['oom_max']) if r['oom_max'] is not None else '-'} | "
                     f"{gib_str(r['ok_min']) if r['ok_min'] is not None else '-'} | {gib_str(r['simulated'])} |")
    return lines


def exact_section(rows: list[dict]) -> list[str]:
    s = error_summary(rows)
    lines = ["", "## Exact mode: the caching allocator simulated (no fitted coefficient)", "",
             "`qfit plan --exact` traces the whole training step on fake tensors at full depth (planner/train/exact.py) and",
             "replays every allocation and free through a simulation of PyTorch's CUDA caching allocator (planner/allocsim.py:",
             "best fit, block splitting and merging, the small and large pools, expandable segments' 20 MiB pages, empty_cache).",
             "Nothing in it is fitted to these runs, so every prediction below is out of sample. Produced by",
             "`python -m planner.train.replay` into `calibration/simulated.csv`; the tracing stack was "
             + _sim_stack() + ".", "",
             "| | runs | median abs error | max abs error | under-predicted runs | worst under-prediction |",
             "|---|---|---|---|---|---|"]
    for kind in ("reserved", "allocated"):
        k = s[kind]
        lines.append(f"| peak {kind}, exact mode | {s['runs']} | {k['median_abs_pct']}% | {k['max_abs_pct']}% | "
                     f"{k['under_prediction_rate'] * 100:.1f}% | {k['worst_under_pct']}% |")
    for mode, m in s.get("by_allocator", {}).items():
        k = m["reserved"]
        lines.append(f"| peak reserved, exact mode, allocator `{mode}` | {m['runs']} | {k['median_abs_pct']}% | "
                     f"{k['max_abs_pct']}% | {k['under_prediction_rate'] * 100:.1f}% | {k['worst_under_pct']}% |")
    lines += ["", "| run | measured reserved GiB | exact mode | err | measured allocated GiB | exact mode | err |",
              "|---|---|---|---|---|---|---|"]
    for p in sorted(rows, key=lambda p: -abs(_pct(p, "reserved"))):
        lines.append(f"| {p['run_id'].rsplit('|cap', 1)[0]} | {gib_str(p['measured_reserved'])} | {gib_str(p['predicted_reserved'])} | "
                     f"{_pct(p, 'reserved'):+.1f}% | {gib_str(p['measured_allocated'])} | {gib_str(p['predicted_allocated'])} | "
                     f"{_pct(p, 'allocated'):+.1f}% |")
    return lines


def repeatability_section(preds: list[dict]) -> list[str]:
    """Configurations measured in more than one fresh process: how far apart their peaks were."""
    rows = [p for p in preds if len(p["measurements"]) > 1]
    if not rows:
        return []
    lines = ["", "## Repeatability: the same configuration in different processes", "",
             "Peak allocated memory repeats to the byte; peak reserved memory does not: it depends on where earlier work "
             "in the process left blocks in the allocator's address space (here: the configurations that ran before it "
             "on the same loaded model). No model, analytic or simulated, can be closer to every measurement than "
             "they are to each other, so the figures above use each configuration's mean.", "",
             "| configuration | peak reserved GiB, each measurement | spread | peak allocated spread MiB |", "|---|---|---|---|"]
    for p in sorted(rows, key=lambda p: p["run_id"]):
        res = [r for _, r in p["measurements"]]
        al = [a for a, _ in p["measurements"]]
        lines.append(f"| {p['run_id'].rsplit('|cap', 1)[0]} | {', '.join(gib_str(r) for r in res)} | "
                     f"{(max(res) - min(res)) / min(res) * 100:.1f}% | {(max(al) - min(al)) / 2**20:.0f} |")
    return lines


def _sim_stack() -> str:
    import csv

    with SIMULATED_FILE.open(newline="") as fh:
        vs = {(r["torch"], r["transformers"], r["peft"], r["bitsandbytes"]) for r in csv.DictReader(fh)}
    return "; ".join(f"torch {t}, transformers {tf}, peft {p}, bitsandbytes {b} (CPU)" for t, tf, p, b in sorted(vs))


HELDOUT_DIR = CALIBRATION_DIR / "heldout"


def heldout_rows(coeffs) -> list[dict]:
    """Models the fit never sees (calibration/heldout/h200-*.csv, grid h200-heldout): measured against the
    published coefficients and against exact mode's predictions, which were written before the measurement
    (calibration/heldout/predicted.csv, `python -m planner.train.replay --grid h200-heldout`)."""
    import csv

    from planner.memory import estimate

    paths = sorted(glob.glob(str(HELDOUT_DIR / "h200-*.csv")))
    pred_path = HELDOUT_DIR / "predicted.csv"
    if not paths or not pred_path.exists():
        return []
    with pred_path.open(newline="") as fh:
        preds = {r["config_id"]: r for r in csv.DictReader(fh)}
    out = []
    for it in prepare_rows(read_runs(paths), coeffs):
        r = it["row"]
        p = preds.get(r["run_id"].rsplit("|cap", 1)[0])
        if p is None:
            continue
        bd = estimate(it["model"], it["lora"], it["train"], coeffs)
        out.append({"model": r["model"], "run_id": r["run_id"], "alloc_conf": r["alloc_conf"] or "default",
                    "measured_allocated": it["alloc"], "measured_reserved": it["reserved"],
                    "analytic_allocated": bd.peak_allocated_bytes, "analytic_reserved": bd.peak_reserved_bytes,
                    "exact_allocated": int(p["simulated_allocated_bytes"]),
                    "exact_reserved": int(p["simulated_reserved_bytes"])})
    return out


def _as_preds(rows: list[dict], kind: str) -> list[dict]:
    """Held-out rows as error_summary's predictions, from the analytic plan or exact mode."""
    return [{"model": r["model"], "alloc_conf": r["alloc_conf"], "measured_allocated": r["measured_allocated"],
             "predicted_allocated": r[f"{kind}_allocated"], "measured_reserved": r["measured_reserved"],
             "predicted_reserved": r[f"{kind}_reserved"]} for r in rows]


def heldout_section(rows: list[dict]) -> list[str]:
    models = sorted({r["model"] for r in rows})
    lines = ["", "## Held-out models: never fitted", "",
             f"{len(rows)} configurations of {', '.join(models)} (grid `h200-heldout`, one fresh process per model, "
             "expandable segments), in `calibration/heldout/`. The fit never reads that folder. Exact mode's predictions "
             "(`predicted.csv`, `python -m planner.train.replay --grid h200-heldout --out calibration/heldout/predicted.csv`) "
             "come from the code committed before the GPU run (a3b39e8) and are deterministic. The analytic figures use the "
             "published coefficients and one fix these runs prompted: Gemma-2's final logit softcapping keeps one extra "
             "compute-dtype copy of the logits alive at the loss, not two (exact mode traced one; planner.memory.logits_bytes). "
             "Before that fix the analytic plan over-predicted the four Gemma-2-2B runs by 5-10% (reserved: median 2.26%, "
             "max 10.08% over the 16 runs; allocated max 11.11%).", "",
             "| | median abs error | max abs error | under-predicted runs | worst under-prediction |", "|---|---|---|---|---|"]
    for kind, label in (("analytic", "analytic plan"), ("exact", "exact mode")):
        s = error_summary(_as_preds(rows, kind))
        for q in ("reserved", "allocated"):
            k = s[q]
            lines.append(f"| peak {q}, {label} | {k['median_abs_pct']}% | {k['max_abs_pct']}% | "
                         f"{k['under_prediction_rate'] * 100:.1f}% | {k['worst_under_pct']}% |")
    lines += ["", "| run | measured reserved GiB | analytic | err | exact mode | err | measured allocated GiB | analytic | err | exact mode | err |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]

    def e(r, kind, q):
        return f"{(r[f'{kind}_{q}'] - r[f'measured_{q}']) / r[f'measured_{q}'] * 100:+.1f}%"

    for r in rows:
        lines.append(f"| {r['run_id'].rsplit('|cap', 1)[0]} | {gib_str(r['measured_reserved'])} | {gib_str(r['analytic_reserved'])} | "
                     f"{e(r, 'analytic', 'reserved')} | {gib_str(r['exact_reserved'])} | {e(r, 'exact', 'reserved')} | "
                     f"{gib_str(r['measured_allocated'])} | {gib_str(r['analytic_allocated'])} | {e(r, 'analytic', 'allocated')} | "
                     f"{gib_str(r['exact_allocated'])} | {e(r, 'exact', 'allocated')} |")
    return lines


def method_section(bands: dict[str, dict], speed: dict[str, dict] | None = None, measured_on: str = "",
                   unmeasured_int8: int = 0) -> list[str]:
    """## Methods: leave-one-model-out peak allocated / reserved per method (planner.fit.method_bands). Only QLoRA
    rows are fitted; lora and lora-8bit rows (calibration/grids/methods.json) are predicted by their structural terms
    with those coefficients."""
    lines = ["## Methods (LoRA on a 16-bit and on an 8-bit base)", ""]
    if set(bands) <= {"qlora"}:
        return lines + [
            "Not yet measured: every row above is QLoRA (a 4-bit NF4 base). `qfit plan --method lora|lora-8bit|auto` "
            "prices LoRA on a 16-bit base and on an LLM.int8 8-bit base with structural terms (planner/memory.py, "
            "\"the base, by method\") and the QLoRA-fitted coefficients, and says so in every such plan. The sweeps "
            "that would give them their own leave-one-model-out band are prepared (calibration/grids/methods-a.json, "
            "methods-b.json; step times: methods-speed.json; commands in the README, \"Calibrating your own GPU\"); "
            "once their rows are in calibration/methods/, this section shows each method's error beside QLoRA's."]
    lines += ["Coefficients are fitted on QLoRA rows only; the lora (16-bit base) and lora-8bit (LLM.int8 base) rows are "
             "predicted with them and each method's own structural terms (planner/memory.py, \"the base, by method\"), "
             "leave-one-model-out." + (f" The lora and lora-8bit rows (calibration/methods/) were measured on {measured_on}; "
                                       "the coefficients come from the QLoRA runs above." if measured_on else ""), "",
             "| method | runs | models | peak reserved median / max abs error | peak allocated median / max abs error "
             "| under-predicted (reserved) |", "|---|---|---|---|---|---|"]
    for m, s in bands.items():
        r, a = s["reserved"], s["allocated"]
        lines.append(f"| {m} | {s['runs']} | {', '.join(s['models'])} | {r['median_abs_pct']}% / {r['max_abs_pct']}% | "
                     f"{a['median_abs_pct']}% / {a['max_abs_pct']}% | {r['under_prediction_rate']:.0%} |")
    if "lora-8bit" in bands:
        lines += ["", "lora-8bit rows are predicted with the share of input columns LLM.int8 treated as outliers in that "
                  "run (int8_outlier_share, recorded by the harness: planner.train.measure.Int8OutlierWatch), which "
                  "bitsandbytes keeps beside each int8 linear's input until backward (planner.memory."
                  "int8_outlier_bytes_per_token). These models have random weights, and in them every column of the "
                  "MLP down-projection's input holds an outlier somewhere in a micro-batch (shares up to 0.37); a trained "
                  "checkpoint has a handful (LLM.int8, section 4), and plans assume a share of "
                  "planner.memory.DEFAULT_INT8_OUTLIER_SHARE."
                  + (f" {unmeasured_int8} lora-8bit rows measured before the share was recorded are left out; the same "
                     "configurations were measured again with it (calibration/methods/h100-methods-a8-expandable.csv)."
                     if unmeasured_int8 else "")]
    if speed:  # the speed fit's rows by method (planner.refit.speed_section)
        lines += ["", "Step times (errors of tokens/s), from the one speed fit (calibration/speed/, \"Throughput\"), whose "
                  "rows include these methods': each method's own terms (planner/speed.py METHOD_TERMS: lora, factors on "
                  "its forward and backward CPU terms and its elementwise traffic, a multiple of its weight reads; "
                  "lora-8bit, the same two CPU factors, its own overlap exponent (its forward synchronises the GPU on every "
                  "int8 linear), a multiple of its weight-path bytes, the efficiencies of its int8 forward and fp32 "
                  "backward matmuls) are fitted with QLoRA's. Held out: every row of a configuration, or "
                  "of a model (all its methods), predicted by a fit without them. Structural: the fit on the QLoRA rows "
                  "alone, each method's own terms falling back to QLoRA's (planner.speed.coefficient).", "",
                  "| method | rows | models | leave one configuration out: median / p90 / max | leave one model out: "
                  "median / p90 / max | structural: median / p90 / max |", "|---|---|---|---|---|---|"]
        fmt = lambda e: f"{e['median']}% / {e['p90']}% / {e['max']}%"  # noqa: E731
        for m, n in speed["rows"].items():
            lines.append(f"| {m} | {n} | {len(speed['models'][m])} | {fmt(speed['leave_one_configuration_out'][m])} | "
                         f"{fmt(speed['leave_one_model_out'][m])} | "
                         + ("(fitted)" if m == "qlora" else fmt(speed["structural"][m])) + " |")
        for o in speed.get("other_machines", []):
            lines += ["", f"The same speed model on another machine: `{o['file']}` ({o['rows']} rows; models "
                      f"{', '.join(o['models'])}), whose timed steps varied more (interquartile range a median "
                      f"{o['step_iqr_pct']}% of the step, against {speed.get('fit_step_iqr_pct', '?')}% on the fit's "
                      f"machine); as shipped, and with one factor on the CPU terms (x {o['cpu_scale']} on all its rows) "
                      "fitted on its other configurations:", "",
                      "| method | rows | as shipped: median / p90 / max | CPU factor, held out: median / p90 / max |",
                      "|---|---|---|---|"]
            lines += [f"| {m} | {e['n']} | {fmt(e)} | {fmt(o['with_cpu_scale_held_out'][m])} |"
                      for m, e in o["as_shipped"].items()]
        ratios = speed.get("against_qlora", {})
        if ratios:
            lines += ["", "Measured step time over QLoRA's in the same configuration (model and shape):", "",
                      "| method | configurations | models | min | median | max |", "|---|---|---|---|---|---|"]
            lines += [f"| {m} | {r['configurations']} | {r['models']} | {r['min']}x | {r['median']}x | {r['max']}x |"
                      for m, r in ratios.items()]
    return lines


def render_report(doc: dict, cv: list[dict], fitted: list[dict], df, coeffs, exact: list[dict] | None = None,
                  heldout: list[dict] | None = None, exact_budget: list[dict] | None = None, speed: dict | None = None) -> str:
    cvm = doc["cross_validation"]["leave_one_model_out"]
    cvf = doc["cross_validation"]["leave_one_family_out"]
    m = doc["measured_on"]
    cvme = doc["cross_validation"]["leave_one_model_out_every_measurement"]
    lines = [
        "# Calibration report",
        "",
        "Generated by `qfit calibrate --refit` from the CSV files in `calibration/runs/` (raw integer bytes, one row per",
        "configuration, environment in every row). `tests/test_calibration.py` refits on the CPU and checks these figures.",
        "",
        f"- GPU: {m['gpu']}; stack: {m['stack']}; measured {m['date']}",
        f"- {cvm['runs']} completed configurations ({cvme['runs']} measurements: a configuration measured in more than one "
        f"process is one point, the mean of its measurements; see Repeatability), plus OOM rows and allocator-cap "
        f"bisection rows; models: {', '.join(m['models'])}",
        "- Measured by `python -m planner.train.harness` (one file per grid: `--grid NAME`, see planner/train/harness.py), "
        "2 optimizer steps of 2 accumulated micro-batches on full-length random sequences:",
        *[f"  - `{Path(f).name}`: {n} rows, PYTORCH_CUDA_ALLOC_CONF={conf or '(unset: the default allocator)'}"
          for (f, conf), n in df.groupby(["source_file", "alloc_conf"]).size().items()],
        f"- Left out of the fit and of every figure: {doc['contaminated']['rows']} contaminated rows, measured in a process "
        f"where an earlier model left more than {CONTAMINATION_BYTES // 2**20} MiB allocated (after_load_allocated_bytes "
        "minus the model's weights; the two 32 MiB cuBLAS workspaces explain 64 MiB). The allocator's address space then "
        "holds that model's leftovers and the holes around them. Each was measured again in a fresh process "
        "(`python -m planner.fit --out calibration/grids/clean-*.json`, files `h200-clean-*`). Against those, peak allocated "
        f"differed by median {doc['contaminated']['allocated_median_pct']}%, max {doc['contaminated']['allocated_max_pct']}% "
        "(the old one-process sweeps also left transformers' input-grad hook on for later uncheckpointed rows, "
        "planner/train/replay.py), peak reserved by median "
        f"{doc['contaminated']['reserved_median_pct']}%, max {doc['contaminated']['reserved_max_pct']}%. "
        "The harness now runs every model group in a child process of its own.",
        "",
        "## Accuracy (cross-validated: every prediction comes from a fit that did not see that model)",
        "",
        "| | median abs error | max abs error | under-predicted runs | worst under-prediction |",
        "|---|---|---|---|---|",
    ]
    cvme = doc["cross_validation"]["leave_one_model_out_every_measurement"]
    cvfe = doc["cross_validation"]["leave_one_family_out_every_measurement"]
    every = f"every measurement ({cvme['runs']}), not the configuration's mean"
    for title, s in (("peak reserved, leave-one-model-out", cvm["reserved"]), ("peak allocated, leave-one-model-out", cvm["allocated"]),
                     ("peak reserved, leave-one-family-out", cvf["reserved"]), ("peak allocated, leave-one-family-out", cvf["allocated"]),
                     (f"peak reserved, leave-one-model-out, {every}", cvme["reserved"]),
                     (f"peak reserved, leave-one-family-out, {every}", cvfe["reserved"])):
        lines.append(f"| {title} | {s['median_abs_pct']}% | {s['max_abs_pct']}% | {s['under_prediction_rate'] * 100:.1f}% | {s['worst_under_pct']}% |")
    for mode, s in cvm.get("by_allocator", {}).items():
        n = s["runs"]
        lines.append(f"| peak reserved, leave-one-model-out, allocator `{mode}` ({n} runs, models: {', '.join(s['models'])}) | "
                     f"{s['reserved']['median_abs_pct']}% | {s['reserved']['max_abs_pct']}% | "
                     f"{s['reserved']['under_prediction_rate'] * 100:.1f}% | {s['reserved']['worst_under_pct']}% |")
    partial = [p for p in cv if "-u" in p["run_id"].split("|")[5]]  # ckpt1-uN: the last N layers uncheckpointed
    if partial:
        ps = error_summary(partial)
        for kind in ("allocated", "reserved"):
            lines.append(f"| peak {kind}, leave-one-model-out, partial checkpointing ({ps['runs']} runs) | "
                         f"{ps[kind]['median_abs_pct']}% | {ps[kind]['max_abs_pct']}% | "
                         f"{ps[kind]['under_prediction_rate'] * 100:.1f}% | {ps[kind]['worst_under_pct']}% |")
    sp = doc["cross_validation"]["speed"]["leave_one_configuration_out"]
    lines += ["", f"Throughput model (tokens/s), leave-one-configuration-out: median {sp['median']}%, 90th percentile "
              f"{sp['p90']}%, max {sp['max']}% over {sp['n']} measured configurations (see Throughput).",
              "", "The families (model_type) are " + "; ".join(
                  f"{fam}: {', '.join(ms)}" for fam, ms in _families(m["models"]).items())
              + ". Leave-one-family-out holds out every model of a family together.",
              "", "![predicted vs measured](predicted_vs_measured.png)", "",
              "## Fitted coefficients", "", "| coefficient | value |", "|---|---|"]
    for k, v in doc["values"].items():
        lines.append(f"| {k} | {v} |")
    lines += ["", "## Every run: measured vs predicted (leave-one-model-out)", "",
              "| run | phase | measured allocated GiB | predicted | err | measured reserved GiB | predicted | err |",
              "|---|---|---|---|---|---|---|---|"]
    for p in cv:
        lines.append(f"| {p['run_id'].rsplit('|cap', 1)[0]} | {p['phase']} | {gib_str(p['measured_allocated'])} | "
                     f"{gib_str(p['predicted_allocated'])} | {_pct(p, 'allocated'):+.1f}% | {gib_str(p['measured_reserved'])} | "
                     f"{gib_str(p['predicted_reserved'])} | {_pct(p, 'reserved'):+.1f}% |")
    lines += repeatability_section(cv)
    if exact:
        lines += exact_section(exact)
    if heldout:
        lines += heldout_section(heldout)
    lines += required_section(df)
    if exact_budget:
        lines += exact_budget_section(exact_budget)
    lines += validation_section(coeffs)
    lines += multigpu_section(coeffs)
    if speed:
        lines += throughput_section(speed, coeffs)
    lines.append("")
    return "\n".join(lines)


def speed_memory_rows(coeffs, speed_dir: Path | None = None) -> list[dict]:
    """Peak allocated of the throughput sweeps' configurations (first measurement of each), predicted with the
    memory coefficients fitted above: held-out checks on another GPU kind, packed rows included."""
    import csv

    from planner.codec import settings_from_dict
    from planner.memory import estimate

    out = []
    for path in sorted((speed_dir or CALIBRATION_DIR / "speed").glob("*.csv")):
        with path.open(newline="") as fh:
            for r in csv.DictReader(fh):
                if (r["status"] != "ok" or r["data"] == "padded" or not r["run_id"].endswith("|rep0")
                        or (r.get("method") or "qlora") != "qlora"):  # other bases: in the Methods section
                    continue
                lora, train = settings_from_dict(r, packing=r["data"] == "packed",
                                                 expandable_segments="expandable_segments:True" in r["alloc_conf"])
                pred = estimate(row_model(r), lora, train, coeffs).peak_allocated_bytes
                out.append({"file": path.name, "run_id": r["run_id"], "data": r["data"],
                            "measured": int(r["peak_allocated_bytes"]), "predicted": pred,
                            "error_pct": (pred / int(r["peak_allocated_bytes"]) - 1) * 100})
    return out


def throughput_section(speed: dict, coeffs) -> list[str]:
    import statistics

    def row(title, s):
        return f"| {title} | {s['n']} | {s['median']}% | {s['p90']}% | {s['max']}% |"

    lines = ["", "## Throughput", "",
             "Measured by `python -m planner.train.throughput --grid calibration/grids/speed.json` (one child process per model; "
             "every optimizer step timed with a CUDA synchronize, the first dropped, the median of the rest kept; "
             "`full`: rows of seq_len random tokens, no padding, sdpa's causal kernel; `packed`: alpaca-like rows packed by "
             "planner/packing.py, sdpa with transformers' block mask; `padded`: alpaca-like rows padded to the longest of "
             "each micro-batch). The model is planner/speed.py; the fit planner/speed_fit.py, on "
             f"{', '.join(speed['fitted_on'])} ({speed['configurations']} configurations, {speed['rows']} rows, "
             f"GPU {', '.join(speed['gpus'])}; models {', '.join(speed['models'])}). Errors are of tokens/s.", "",
             "| check | rows | median abs error | 90th percentile | max |", "|---|---|---|---|---|",
             row("leave one configuration out (its repeat with it)", speed["leave_one_configuration_out"]),
             row("leave one model out", speed["leave_one_model_out"])]
    for o in speed["other_sweeps"]:
        if "as_shipped" not in o:  # a methods sweep: in the Methods section
            continue
        lines.append(row(f"`{o['file']}` (another machine, {', '.join(o['gpus'])}), the shipped coefficients", o["as_shipped"]))
        lines.append(row(f"`{o['file']}`, the CPU terms x {o['cpu_scale']} fitted on its other configurations",
                         o["with_cpu_scale_held_out"]))
        rp = o.get("replay")
        if rp:
            lines.append(row(f"`{o['file']}`, the other models' rows, before `qfit calibrate --gpu auto`'s guard", rp["held_out_before"]))
            lines.append(row(f"`{o['file']}`, the same rows after the guard saw only its {rp['sweep_model']} rows "
                             f"({rp['sweep_rows']}): " + "; ".join(rp["decisions"]), rp["held_out_after"]))
    lines += ["", "The CPU terms (launch and Python overheads per layer pass, per 4-bit linear, per LoRA module) dominate small "
              "micro-batches of small models, and they differ between two hosts with the same GPU: the same configuration "
              "(Mistral-7B, micro-batch 1 x 512) took 0.527 s on one H100 machine and 0.352 s on the other. One factor on "
              "the CPU terms, fitted on the machine itself, removes most of that.",
              "", "Padded micro-batches (each a new shape) are not in the fit; predicted from their mean shape they run slower "
              "than the model says, most steps several times slower (the first use of a shape is slow): "
              + ", ".join(f"{p['run_id'].split('|')[0]} {p['error_pct']:+.0f}%" for p in speed["padded"]) + ". "
              "Packing gives every micro-batch the same shape.",
              "", "Leave-one-configuration-out errors per row (the fit sweep):", "",
              "| configuration | measured s/step | error |", "|---|---|---|"]
    lines += [f"| {p['run_id']} | {p['measured_s']} | {p['loo_error_pct']:+.1f}% |" for p in speed["per_row"]]
    mem = speed_memory_rows(coeffs)
    if mem:
        lines += ["", "### Peak allocated of the throughput sweeps (memory coefficients above; these runs are not in the memory fit)", "",
                  "| data | configurations | median abs error | max abs error |", "|---|---|---|---|"]
        for kind in ("full", "packed"):
            e = [abs(m["error_pct"]) for m in mem if m["data"] == kind]
            if e:
                lines.append(f"| {kind} | {len(e)} | {statistics.median(e):.2f}% | {max(e):.2f}% |")
        lines += ["", "| sweep | configuration | measured GiB | predicted GiB | error |", "|---|---|---|---|---|"]
        lines += [f"| {m['file']} | {m['run_id']} | {gib_str(m['measured'])} | {gib_str(m['predicted'])} | {m['error_pct']:+.2f}% |"
                  for m in mem]
    return lines


MULTIGPU_DIR = CALIBRATION_DIR / "multigpu"


def _multigpu_runs():
    paths = sorted(str(p) for p in MULTIGPU_DIR.glob("*.csv")) if MULTIGPU_DIR.is_dir() else []
    return read_runs(paths) if paths else None


def _with_values(coeffs, **values):
    from planner.specs import Coefficients

    return Coefficients(name=coeffs.name, description=coeffs.description, values={**coeffs.values, **values})


def multigpu_section(coeffs) -> list[str]:
    """Per-rank measured vs predicted on several GPUs (calibration/multigpu/*.csv, planner.train.dist_sweep),
    and the `qfit run --num-gpus 2` reports beside them."""
    df = _multigpu_runs()
    if df is None:
        return []
    from planner.fit import predict_multigpu

    preds = predict_multigpu(df, coeffs)
    env = _environment(df)
    lines = ["", "## Several GPUs: per-rank memory (`calibration/multigpu/`)", "",
             f"Measured by `python -m planner.train.dist_sweep` on 2 x {env['gpu_name']} (one process per GPU, launched by "
             "`accelerate launch` with the configuration `qfit run --num-gpus` generates; PYTORCH_CUDA_ALLOC_CONF="
             "expandable_segments:True), 2 optimizer steps of 2 accumulated micro-batches per rank.",
             "",
             "- DDP: every rank holds the single-GPU breakdown plus DDP's gradient buckets (no fitted term).",
             "- FSDP2: the FSDP-QLoRA recipe (4-bit weights stored in the compute dtype, no fp32 upcast), sharded; the "
             "predicted allocated below is the structural sum with no fitted term. Its worst per-rank under-prediction "
             f"is kept as a margin in every FSDP plan's needs: fsdp_margin_frac = {coeffs.get('fsdp_margin_frac'):.4f} "
             "(fitted on these rows, so FSDP's needs are in-sample here).",
             f"- NCCL and the process group: NVML used minus torch's reserved pool, the CUDA context and paged state, "
             f"at most {gib_str(int(coeffs.get('nccl_buffer_bytes')))} GiB per rank (nccl_buffer_bytes).",
             "- Load: each rank's peak while loading, before FSDP shards the model (every rank loads the whole "
             "4-bit model; with accelerate's fsdp_cpu_ram_efficient_loading the same).",
             "", "| run | rank | measured allocated GiB | predicted | err | measured reserved GiB | from_pretrained peak GiB (predicted: the whole model) | "
                 "outside the allocator GiB |", "|---|---|---|---|---|---|---|---|"]
    for p in preds:
        err = (p["predicted_allocated"] - p["measured_allocated"]) / p["measured_allocated"] * 100
        lines.append(f"| {p['run_id']} | {p['rank']} | {gib_str(p['measured_allocated'])} | {gib_str(p['predicted_allocated'])} "
                     f"| {err:+.1f}% | {gib_str(p['measured_reserved'])} | {gib_str(p['measured_load'])} "
                     f"({gib_str(p['predicted_load'])}) | {gib_str(p['outside_allocator'])} |")
    capped = df[(df["budget_bytes"].astype(str) != "0") & (df["rank_index"].astype(str) == "0")]
    if len(capped):
        lines += ["", "Plans that need two cards, run on two ranks each capped to one smaller card's memory "
                  "(`torch.cuda.set_per_process_memory_fraction` per rank; budget = card - CUDA context - NCCL buffers):", "",
                  "| run | allocator budget per rank GiB | status | measured allocated / reserved GiB | NVML per GPU GiB | "
                  "qfit's needs per GPU now, of the card GiB |",
                  "|---|---|---|---|---|---|"]
        from planner.fit import _row_settings
        from planner.memory import cuda_context_bytes
        from planner.multigpu import fsdp_per_gpu, nccl_buffer_bytes
        from planner.profiles import load_model

        for _, r in capped.iterrows():
            ok = r["status"] == "ok"
            lora, train = _row_settings(r)
            needs = fsdp_per_gpu(row_model(r), lora, train, coeffs, int(r["world_size"])).needs_bytes
            card = int(r["budget_bytes"]) + cuda_context_bytes(coeffs) + nccl_buffer_bytes(coeffs)
            lines.append(f"| {r['run_id']} | {gib_str(int(r['budget_bytes']))} | {r['status']} | "
                         f"{gib_str(int(r['peak_allocated_bytes']))} / {gib_str(int(r['peak_reserved_bytes']))} | "
                         f"{gib_str(int(r['nvml_used_bytes'])) if ok and str(r['nvml_used_bytes']) else '-'} | "
                         f"{gib_str(needs)} of {gib_str(card)} ({'fits' if needs <= card else 'does not fit'}) |")
        lines += ["", "The Qwen2.5-32B run was planned before FSDP's wrap peak (the whole 4-bit model plus its new shards) was "
                  "in the model; it ran out of memory at the wrap, which is how that peak was found. With it modelled, qfit "
                  "says that plan does not fit two 24 GB cards; the Qwen2.5-14B plan at seq 4096 (one 24 GB card cannot "
                  "hold it) ran on both capped ranks."]
    for strat in ("ddp", "fsdp"):
        errs = sorted(abs(p["predicted_allocated"] - p["measured_allocated"]) / p["measured_allocated"] * 100
                      for p in preds if p["strategy"] == strat)
        if errs:
            lines.append("")
            lines.append(f"{strat.upper()}: {len(errs)} rank rows, per-rank peak allocated error median "
                         f"{errs[len(errs) // 2]:.1f}% / max {errs[-1]:.1f}% (absolute).")
    from planner.codec import settings_from_dict
    from planner.multigpu import peak_allocated_per_gpu, per_gpu

    for path in sorted(MULTIGPU_DIR.glob("*.report.json")):
        rep = json.loads(path.read_text())
        pred = rep["memory"]["predicted_per_gpu"]
        st = rep["planned"]
        lora, train = settings_from_dict(st)
        model = load_model("mistral-7b" if rep["model"]["name"].startswith("mistral-7b") else rep["model"]["name"])
        # the loading the run used: runs before --loading sharded loaded the whole model first ("full")
        how = {"loading": pred.get("loading", "full")} if rep["strategy"] == "fsdp" else {}
        now = peak_allocated_per_gpu(per_gpu(rep["strategy"], model, lora, train, coeffs, rep["num_gpus"], **how))
        meas0 = rep["memory"]["measured_per_rank"][0]["peak_allocated_bytes"]
        ranks = ", ".join(f"rank {r['rank']} {gib_str(r['peak_allocated_bytes'])} GiB" for r in rep["memory"]["measured_per_rank"])
        lines.append("")
        lines.append(f"`{path.name}`: `qfit run --num-gpus {rep['num_gpus']} --strategy {rep['strategy']}` "
                     f"({rep['model']['name']}, micro-batch {rep['planned']['batch_size']} x {rep['planned']['grad_accum']}, "
                     f"seq {rep['planned']['seq_len']}): {rep['status']}, measured peak allocated {ranks}; predicted "
                     f"{gib_str(pred['peak_allocated_bytes'])} GiB at the time (before this calibration), "
                     f"{gib_str(now)} GiB now ({(now - meas0) / meas0 * 100:+.1f}%; this configuration is not in the sweep), "
                     f"{rep['speed']['tokens_per_s']:,.0f} tokens/s.")
    return lines


def required_section(df) -> list[str]:
    """The smallest allocator budget, cross-validated on the cap bisections."""
    from planner.fit import cross_validate_required

    groups = cross_validate_required(df)
    if not groups:
        return []
    lines = ["", "## Smallest budget (allocator-cap bisections, leave-one-model-out)", "",
             "Each configuration below was run again under `set_per_process_memory_fraction` caps between its peak "
             "allocated and peak reserved. `required` (memory.required_budget_bytes) comes from a fit that did not see "
             "the model; it must lie above the largest budget that ran out of memory.", "",
             "| configuration | largest failing budget GiB | smallest budget that ran GiB | required (predicted) GiB | above the smallest that ran | safe |",
             "|---|---|---|---|---|---|"]
    over, unsafe = [], 0
    for g in groups:
        safe = g["oom_max"] is None or g["required"] > g["oom_max"]
        unsafe += not safe
        rel = (g["required"] - g["ok_min"]) / g["ok_min"] * 100 if g["ok_min"] else None
        if rel is not None:
            over.append(rel)
        lines.append(f"| {g['key']} | {gib_str(g['oom_max']) if g['oom_max'] is not None else '-'} | "
                     f"{gib_str(g['ok_min']) if g['ok_min'] is not None else '-'} | {gib_str(g['required'])} | "
                     f"{f'{rel:+.1f}%' if rel is not None else '-'} | {'yes' if safe else 'NO'} |")
    over.sort()
    lines += ["", f"{len(groups)} bisected configurations: the held-out required budget is above the largest failing "
                  f"budget in {len(groups) - unsafe} of {len(groups)}; above the smallest budget that ran by median "
                  f"{over[len(over) // 2]:.1f}%, max {over[-1]:.1f}%."]
    return lines


def validation_section(coeffs) -> list[str]:
    """The emulated-budget runs (planner/train/validate.py), if present. They were not used by the fit:
    their measured peak reserved is also a held-out test of the model (predicted with `coeffs`)."""
    import csv

    from planner.fit import _row_settings, row_int
    from planner.memory import estimate
    from planner.profiles import load_model

    lines = []
    errs: list[float] = []
    statuses: list[str] = []
    uses: list[float] = []
    roomy: list[tuple] = []  # plans whose next micro-batch was predicted to fit: (budget use, uncheckpointed layers)
    for path in sorted(glob.glob(VALIDATION_GLOB)):
        plans_path = Path(path).with_suffix(".plans.json")
        plans = json.loads(plans_path.read_text()) if plans_path.is_file() else []
        rows = list(csv.DictReader(open(path)))
        lines += ["", f"## Emulated smaller GPUs: `{Path(path).name}`", "",
                  "qfit's recommended plan run on the H200 under `torch.cuda.set_per_process_memory_fraction` "
                  "(budget = card memory - fitted CUDA context - predicted paged optimizer state).", "",
                  "| card | model | seq | plan | budget GiB | ran | peak reserved GiB (predicted, error) | budget used (peak reserved / budget) | card used (reserved + context) | next micro-batch predicted |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for p in plans:
            if not p.get("fits"):
                lines.append(f"| {p['gpu']} | {p['model']} | {p['seq']} | predicted not to fit | | | | | | |")
                continue
            c = p["cfg"]
            match = [r for r in rows if r["model"] == c["model"] and int(r["batch_size"]) == c["batch"]
                     and int(r["seq_len"]) == c["seq"] and int(r["budget_bytes"]) == c["budget"]
                     and row_int(r, "uncheckpointed_layers") == c.get("unckpt", 0)]
            layers = load_model(c["model"]).num_hidden_layers
            ckpt = ("off" if not c["ckpt"] else "on" if not c.get("unckpt")
                    else f"on {layers - c['unckpt']}/{layers} layers")
            plan_s = f"{c['batch']}x{c['accum']} ckpt {ckpt} r{c['rank']} {c['targets']} {c['optim']} {c['dtype']}"
            nxt = ("fits" if p["next_batch_fits"] else f"does not fit ({gib_str(p['next_batch_needs_bytes'])} GiB)"
                   if p["next_batch_needs_bytes"] else "none (micro-batch = effective batch)")
            if not match:
                lines.append(f"| {p['gpu']} | {p['model']} | {p['seq']} | {plan_s} | {gib_str(c['budget'])} | not run | | | | {nxt} |")
                continue
            r = match[0]
            lora, train = _row_settings(r)
            pred = estimate(row_model(r), lora, train, coeffs).peak_reserved_bytes
            meas = int(r["peak_reserved_bytes"] or 0)
            errs.append(abs(pred - meas) / meas * 100)
            statuses.append(r["status"])
            used = int(r["peak_reserved_bytes"] or 0) + int(r["context_bytes"] or 0) + int(r["nvml_baseline_bytes"] or 0)
            util = used / p["gpu_memory_bytes"] * 100
            budget_use = meas / c["budget"] * 100
            uses.append(budget_use if r["status"] == "ok" else 0.0)
            if p["next_batch_fits"]:
                roomy.append((budget_use, c.get("unckpt", 0)))
            lines.append(f"| {p['gpu']} | {p['model']} | {p['seq']} | {plan_s} | {gib_str(c['budget'])} | {r['status']} | "
                         f"{gib_str(meas)} ({gib_str(pred)}, {(pred - meas) / meas * 100:+.1f}%) | {budget_use:.0f}% | "
                         f"{gib_str(used)} GiB = {util:.0f}% | {nxt} |")
    if errs:
        errs.sort()
        lines += ["", f"Held-out check: these {len(errs)} runs were never used by the fit; predicted vs measured peak "
                      f"reserved: median {errs[len(errs) // 2]:.1f}%, max {errs[-1]:.1f}% absolute error. "
                      f"{sum(st == 'oom' for st in statuses)} of {len(statuses)} runs OOMed; "
                      f"{sum(u >= 85 for u in uses)} of {len(uses)} used at least 85% of their budget "
                      f"(lowest {min(uses):.0f}%)."]
        if roomy:
            lines.append(f"In {len(roomy)} of them the next larger micro-batch was predicted to fit: the planner ranks by "
                         "estimated speed and spent the memory on fewer recomputed layers instead "
                         f"({min(u for _, u in roomy)}-{max(u for _, u in roomy)} layers left uncheckpointed); those runs "
                         f"used {min(b for b, _ in roomy):.0f}-{max(b for b, _ in roomy):.0f}% of their budget.")
    earlier = sorted(glob.glob(str(Path(VALIDATION_GLOB).parent / "earlier" / "*.csv")))
    if earlier:
        rows = [r for path in earlier for r in csv.DictReader(open(path))]
        lines += ["", f"Earlier validation runs (`calibration/validation/earlier/`: the plans of earlier versions of "
                      f"the planner and its coefficients): {len(rows)} runs, {sum(r['status'] == 'oom' for r in rows)} OOM."]
    return lines


def write_plot(preds: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, kind in zip(axes, ("allocated", "reserved")):
        for model in sorted({p["model"] for p in preds}):
            pts = [p for p in preds if p["model"] == model]
            ax.scatter([p[f"measured_{kind}"] / 2**30 for p in pts], [p[f"predicted_{kind}"] / 2**30 for p in pts],
                       label=model, s=18)
        hi = max(max(p[f"measured_{kind}"], p[f"predicted_{kind}"]) for p in preds) / 2**30 * 1.05
        ax.plot([0, hi], [0, hi], "k-", lw=0.8)
        ax.plot([0, hi], [0, hi * 1.08], "k:", lw=0.6)
        ax.plot([0, hi], [0, hi * 0.92], "k:", lw=0.6)
        ax.set_xlabel(f"measured peak {kind} (GiB)")
        ax.set_ylabel(f"predicted peak {kind} (GiB)")
        ax.set_title(f"peak {kind}, leave-one-model-out (dotted: ±8%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
