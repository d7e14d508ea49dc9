"""Fitting the coefficients to measured runs, and cross-validating them (numpy/pandas inside functions).

Used by `qfit calibrate`; kept apart from coefficients.py so that `qfit plan` does not compile it.
"""

from __future__ import annotations

from planner.coefficients import DEFAULTS_FILE, _read
from planner.memory import RESERVE_TERMS as RESERVE_FEATURES
from planner.specs import Coefficients, ModelSpec

ALLOC_KEYS = ("act_scale", "bwd_temp_factor", "logits_fwd_bytes", "logits_bwd_bytes")
# memory an earlier model of the same harness process left allocated, beyond its two 32 MiB cuBLAS
# workspaces: above this a row is "contaminated" (the allocator's address space is not a fresh
# process's, so its peak reserved is not what a user's run sees) and is left out of the fit
CONTAMINATION_BYTES = 96 * 2**20
RIDGE = 1e-2  # pulls coefficients the data cannot identify back to their first-principles defaults


def read_runs(paths):
    """Measured runs (calibration/runs/*.csv) -> one DataFrame; bytes stay int64."""
    import pandas as pd

    frames = [pd.read_csv(p, dtype={"alloc_conf": str, "error": str}, keep_default_na=False) for p in paths]
    df = pd.concat(frames, ignore_index=True)
    df["source_file"] = [str(p) for p, f in zip(paths, frames) for _ in range(len(f))]
    return df


def row_int(row, key: str, default: int = 0) -> int:
    """An integer column that older CSV files do not have (absent, empty or NaN after a concat: default)."""
    v = row.get(key, default) if hasattr(row, "get") else default
    if v is None or v == "" or v != v:
        return default
    return int(float(v))


def _row_settings(row):
    """A measured row's settings, through the one settings codec (planner.codec). Cells an older CSV lacks
    (NaN after a concat) take the dataclass defaults."""
    from planner.codec import settings_from_dict

    return settings_from_dict({k: v for k, v in row.items() if v == v})


def row_model(row) -> ModelSpec:
    """A measured row's ModelSpec as the transformers that measured it built the model (the row's `transformers`
    column decides Gemma-2's attention: planner.architectures.default_attn_implementation). A row without the
    column (an older CSV, a grid row not yet measured): the installed transformers."""
    from planner.profiles import load_model

    v = row.get("transformers", "") if hasattr(row, "get") else ""
    return load_model(str(row["model"]), transformers_version=None if v is None or v == "" or v != v else str(v))


def row_method(row) -> str:
    """A row's method (planner.specs.METHODS): rows written before the column existed are QLoRA."""
    v = row.get("method", "") if hasattr(row, "get") else ""
    return "qlora" if v is None or v == "" or v != v else str(v)


def qlora_only(df):
    """The rows the coefficients are fitted on: QLoRA. lora / lora-8bit rows (calibration/grids/methods.json) are
    predicted with those coefficients and their own structural terms, never fitted: their error is out of sample."""
    if "method" not in df.columns:
        return df
    return df[[row_method(r) == "qlora" for _, r in df.iterrows()]]


def row_offset(row, model=None, double_quant: bool | None = None) -> int:
    """Bytes allocated after the load beyond the model's predicted static weights: what earlier
    configurations or models of the same harness process left behind."""
    from planner.memory import (
        base_constants_bytes,
        base_weights_bytes,
        quant_constants_bytes,
        quantized_weights_bytes,
        unquantized_weights_bytes,
    )
    from planner.specs import TrainSettings

    model = model or row_model(row)
    dq = str(row["double_quant"]) == "True" if double_quant is None else double_quant
    method = row_method(row)
    if method == "qlora":
        static = quantized_weights_bytes(model) + quant_constants_bytes(model, dq) + unquantized_weights_bytes(model)
    else:
        train = TrainSettings(compute_dtype=str(row["compute_dtype"]), double_quant=dq, method=method)
        static = (base_weights_bytes(model, train) + base_constants_bytes(model, train)
                  + unquantized_weights_bytes(model, train))
    return int(row["after_load_allocated_bytes"]) - static


def contaminated(row) -> bool:
    return row_offset(row) > CONTAMINATION_BYTES


def _with(coeffs: Coefficients, **values) -> Coefficients:
    return Coefficients(name=coeffs.name, description=coeffs.description, values={**coeffs.values, **values})


def prepare_rows(df, base: Coefficients, keep_contaminated: bool = False, per_configuration: bool = True) -> list[dict]:
    """Per measured configuration: the model's phase sums at the base coefficients and their exact
    derivatives with respect to ALLOC_KEYS (every phase is linear in them), plus the measured
    targets corrected for memory that earlier configurations of the same process left behind
    (after_load_allocated minus the predicted static weights). Contaminated rows (see
    CONTAMINATION_BYTES) are left out unless keep_contaminated. A configuration measured in
    several processes is one point, the mean of its measurements (per_configuration; "repeats"
    counts them): peak reserved depends on what ran earlier in the process (calibration/REPORT.md,
    "Repeatability"), and one configuration should not weigh twice."""
    from planner.memory import phases

    out = []
    for _, row in df.iterrows():
        if row["status"] != "ok" or int(row["budget_bytes"]) != 0 or not str(row["peak_allocated_bytes"]):
            continue
        model = row_model(row)
        offset = row_offset(row, model)
        if offset > CONTAMINATION_BYTES and not keep_contaminated:
            continue
        lora, train = _row_settings(row)
        p0 = phases(model, lora, train, base)
        names = list(p0)
        base_tot = {n: sum(p0[n].values()) for n in names}
        grads = {}
        for key in ALLOC_KEYS:
            p1 = phases(model, lora, train, _with(base, **{key: base.get(key) + 1.0}))
            grads[key] = {n: sum(p1[n].values()) - base_tot[n] for n in names}
        out.append({"row": row, "model": model, "lora": lora, "train": train, "offset": offset,
                    "alloc": int(row["peak_allocated_bytes"]) - offset,
                    "reserved": int(row["peak_reserved_bytes"]) - offset,
                    "base": base_tot, "grads": grads, "phases": names, "repeats": 1,
                    "measurements": [(int(row["peak_allocated_bytes"]) - offset, int(row["peak_reserved_bytes"]) - offset)]})
    return merge_repeats(out) if per_configuration else out


def merge_repeats(items: list[dict]) -> list[dict]:
    """One item per configuration (run_id without the cap): the mean of its measurements' targets."""
    by: dict[str, list[dict]] = {}
    for it in items:
        by.setdefault(it["row"]["run_id"].rsplit("|cap", 1)[0], []).append(it)
    out = []
    for group in by.values():
        first = dict(group[0])
        meas = [m for it in group for m in it["measurements"]]
        first.update(repeats=len(meas), measurements=meas, alloc=sum(a for a, _ in meas) // len(meas),
                     reserved=sum(r for _, r in meas) // len(meas))
        out.append(first)
    return out


def _predict_alloc(item: dict, theta: dict, base: Coefficients) -> tuple[float, str]:
    best, best_phase = -1.0, ""
    for n in item["phases"]:
        v = item["base"][n] + sum((theta[k] - base.get(k)) * item["grads"][k][n] for k in ALLOC_KEYS)
        if v > best:
            best, best_phase = v, n
    return best, best_phase


def fit_alloc(items: list[dict], base: Coefficients, iterations: int = 8) -> dict:
    """Least squares on relative error, the max over phases handled by re-assigning each row to
    its arg-max phase and re-solving (the phases are linear in the coefficients)."""
    import numpy as np

    theta = {k: base.get(k) for k in ALLOC_KEYS}
    for _ in range(iterations):
        a_rows, b_rows = [], []
        for it in items:
            _, ph = _predict_alloc(it, theta, base)
            y = it["alloc"]
            const = it["base"][ph] - sum(base.get(k) * it["grads"][k][ph] for k in ALLOC_KEYS)
            a_rows.append([it["grads"][k][ph] / y for k in ALLOC_KEYS])
            b_rows.append((y - const) / y)
        prior = [base.get(k) for k in ALLOC_KEYS]
        for j in range(len(ALLOC_KEYS)):  # ridge toward the defaults, relative scale
            r = [0.0] * len(ALLOC_KEYS)
            r[j] = RIDGE / prior[j]
            a_rows.append(r)
            b_rows.append(RIDGE)
        sol, *_ = np.linalg.lstsq(np.array(a_rows), np.array(b_rows), rcond=None)
        new = {k: float(max(0.0, v)) for k, v in zip(ALLOC_KEYS, sol)}
        if all(abs(new[k] - theta[k]) < 1e-6 for k in ALLOC_KEYS):
            theta = new
            break
        theta = new
    return theta


def _breakdown(it: dict, coeffs: Coefficients):
    from planner.memory import estimate

    return estimate(it["model"], it["lora"], it["train"], coeffs)


def fit_reserve(items: list[dict], coeffs: Coefficients) -> dict:
    """reserved - allocated per allocator mode: non-negative least squares (relative error) on memory.reserve_features."""
    import numpy as np

    from planner.memory import reserve_features

    out = {}
    for mode in ("expandable", "default"):
        sel = [it for it in items if it["train"].expandable_segments == (mode == "expandable")]
        if len(sel) < 3:
            continue
        a, b = [], []
        for it in sel:
            bd = _breakdown(it, coeffs)
            feats = reserve_features(it["model"], it["lora"], it["train"], bd.components())
            a.append([feats[f] / it["reserved"] for f in RESERVE_FEATURES])
            b.append((it["reserved"] - it["alloc"]) / it["reserved"])
        sol = _nnls(np.array(a), np.array(b), iterations=3000)
        for f, v in zip(RESERVE_FEATURES, sol):
            out[f"reserve_{f}_{mode}"] = float(v)
    return out


def _nnls(a, b, iterations: int = 200):
    """Non-negative least squares by projected coordinate descent (small problems only)."""
    import numpy as np

    x = np.zeros(a.shape[1])
    ata, atb = a.T @ a, a.T @ b
    for _ in range(iterations):
        for j in range(len(x)):
            if ata[j, j] <= 0:
                continue
            x[j] = max(0.0, x[j] + (atb[j] - ata[j] @ x) / ata[j, j])
    return x


def fit_required(df, coeffs: Coefficients) -> dict:
    """The smallest allocator budget that ran, from the cap bisections. Per allocator mode, required =
    peak allocated + r x the predicted allocator reserve + required_const (kept from the base: 256 MiB,
    chosen by leave-one-model-out over 0-512 MiB, see calibration/REPORT.md); r is the largest share of
    the predicted reserve a bisected configuration needed beyond the constant, so that a plan's budget is
    never below a measured success's minimum."""
    out = {}
    for mode, rows in bisection_groups(df, coeffs).items():
        const = coeffs.get(f"required_const_{mode}")
        ok = [g for g in rows if g["ok_min"] is not None]
        if ok:
            out[f"required_frac_{mode}"] = float(max(0.0, max((g["ok_min"] - g["allocated"] - const) / max(g["reserve"], 1)
                                                              for g in ok)))
    return out


def cross_validate_required(df, base: Coefficients | None = None) -> list[dict]:
    """Leave-one-model-out for the smallest budget: each bisected configuration's required budget from a
    fit that did not see its model, beside its smallest budget that ran and largest that failed."""
    base = base or _read(str(DEFAULTS_FILE))
    out = []
    for m in sorted(set(df["model"])):
        coeffs = fit(df[df["model"] != m], base)
        for mode, rows in bisection_groups(df[df["model"] == m], coeffs).items():
            out += [{**g, "mode": mode} for g in rows]
    return out


def bisection_groups(df, coeffs: Coefficients) -> dict[str, list[dict]]:
    """Per allocator mode, each capped configuration's smallest budget that ran and largest that ran out of
    memory (both less memory an earlier configuration left behind), with the model's predicted peak
    allocated and allocator reserve at that peak."""
    groups: dict[tuple, list] = {}  # per file: a configuration bisected in two processes is two groups
    for _, row in df.iterrows():
        if int(row["budget_bytes"]) != 0:
            groups.setdefault((row["source_file"], row["run_id"].rsplit("|cap", 1)[0]), []).append(row)
    out: dict[str, list[dict]] = {"expandable": [], "default": []}
    for key, rows in groups.items():
        r0 = rows[0]
        model = row_model(r0)
        lora, train = _row_settings(r0)
        offset = row_offset(r0, model)
        if offset > CONTAMINATION_BYTES:
            continue
        bd = _breakdown({"model": model, "lora": lora, "train": train}, coeffs)
        ok = [int(r["budget_bytes"]) - offset for r in rows if r["status"] == "ok"]
        oom = [int(r["budget_bytes"]) - offset for r in rows if r["status"] == "oom"]
        out["expandable" if train.expandable_segments else "default"].append({
            "key": key[1], "model": r0["model"], "offset": offset, "ok_min": min(ok) if ok else None, "oom_max": max(oom) if oom else None,
            "allocated": bd.peak_allocated_bytes, "reserve": bd.allocator_reserve, "required": bd.required_bytes})
    return out


def fit_context(df, coeffs: Coefficients) -> int:
    """CUDA context + lazily loaded kernels and library handles: NVML used minus peak reserved minus
    managed (paged) memory, on the first configuration of each process (later rows also carry
    managed memory that bitsandbytes' page manager has not returned)."""
    from planner.memory import paged_state_bytes

    vals = []
    for _, grp in df.groupby("source_file"):
        row = grp.iloc[0]
        if row["status"] != "ok" or not str(row["nvml_used_bytes"]):
            continue
        lora, train = _row_settings(row)
        paged = paged_state_bytes(row_model(row), lora, train)
        vals.append(int(row["nvml_used_bytes"]) - int(row["nvml_baseline_bytes"]) + int(row["nvml_baseline_bytes"])
                    - int(row["peak_reserved_bytes"]) - paged)
    return int(max(vals)) if vals else int(coeffs.get("cuda_context_bytes"))


def fit(df, base: Coefficients | None = None) -> Coefficients:
    """Fit every measured coefficient from runs; returns new Coefficients (no I/O)."""
    base = base or _read(str(DEFAULTS_FILE))
    df = qlora_only(df)
    items = prepare_rows(df, base)
    theta = fit_alloc(items, base)
    coeffs = _with(base, **theta)
    coeffs = _with(coeffs, **fit_reserve(items, coeffs))
    coeffs = _with(coeffs, **fit_required(df, coeffs))
    coeffs = _with(coeffs, cuda_context_bytes=fit_context(df, coeffs))
    return coeffs


def predict_rows(items: list[dict], coeffs: Coefficients) -> list[dict]:
    """Measured vs predicted peak allocated and reserved for prepared rows."""
    out = []
    for it in items:
        bd = _breakdown(it, coeffs)
        r = it["row"]
        out.append({
            "model": r["model"], "run_id": r["run_id"], "alloc_conf": r["alloc_conf"] or "default",
            "method": it["train"].method,
            "measured_allocated": it["alloc"], "predicted_allocated": bd.peak_allocated_bytes,
            "measured_reserved": it["reserved"], "predicted_reserved": bd.peak_reserved_bytes,
            "phase": bd.peak_phase, "tokens_per_s": float(r["tokens_per_s"] or 0),
            "measurements": it.get("measurements", [(it["alloc"], it["reserved"])]),
        })
    return out


def cross_validate(df, by: str = "model", base: Coefficients | None = None) -> list[dict]:
    """Leave-one-group-out: fit on every other group, predict the held-out one (never a fitted point)."""
    from planner.profiles import load_model

    base = base or _read(str(DEFAULTS_FILE))
    keyf = (lambda m: m) if by == "model" else (lambda m: load_model(m).model_type)
    groups = sorted({keyf(m) for m in df["model"]})
    preds = []
    for g in groups:
        held = df["model"].map(keyf) == g
        coeffs = fit(df[~held], base)
        preds += predict_rows(prepare_rows(df[held], base), coeffs)
    return preds


def per_measurement(preds: list[dict]) -> list[dict]:
    """Predictions against every measurement of their configuration, not the mean of its repeats."""
    return [{**p, "measured_allocated": a, "measured_reserved": r} for p in preds for a, r in p["measurements"]]


def error_summary(preds: list[dict]) -> dict:
    import numpy as np

    def stats(kind):
        err = np.array([(p[f"predicted_{kind}"] - p[f"measured_{kind}"]) / p[f"measured_{kind}"] for p in preds])
        return {"median_abs_pct": round(float(np.median(np.abs(err)) * 100), 2),
                "max_abs_pct": round(float(np.max(np.abs(err)) * 100), 2),
                "under_prediction_rate": round(float(np.mean(err < 0)), 3),
                "worst_under_pct": round(float(min(0.0, err.min()) * 100), 2)}

    out = {"runs": len(preds), "models": sorted({p["model"] for p in preds}),
           "allocated": stats("allocated"), "reserved": stats("reserved")}
    modes = sorted({p["alloc_conf"] for p in preds})
    if len(modes) > 1:  # the allocator modes separately: their reserve terms are fitted separately
        out["by_allocator"] = {m: error_summary([p for p in preds if p["alloc_conf"] == m]) for m in modes}
    return out


def method_bands(preds: list[dict]) -> dict[str, dict]:
    """error_summary per method (planner.specs.METHODS) of cross-validated predictions: the coefficients are fitted
    on QLoRA rows only, so a lora / lora-8bit band is out of sample twice (other models, another method)."""
    methods = sorted({p.get("method", "qlora") for p in preds})
    return {m: error_summary([p for p in preds if p.get("method", "qlora") == m]) for m in methods}


def qlora_preds(preds: list[dict]) -> list[dict]:
    return [p for p in preds if p.get("method", "qlora") == "qlora"]


def _gpu_of(row):
    from planner.profiles import load_gpu, match_gpu_name

    return match_gpu_name(str(row["gpu_name"])) or load_gpu("h200")


# --------------------------------------------------------------------------- several GPUs (calibration/multigpu)

def predict_multigpu(df, coeffs: Coefficients) -> list[dict]:
    """Per rank, measured vs predicted: peak allocated (the training phase), the load peak, and what NVML saw
    outside torch's allocator (CUDA context + NCCL). FSDP predictions include the margin in `needs` only;
    predicted_allocated is the structural sum (no margin), so its error is what the margin must cover."""
    from planner.memory import cuda_context_bytes, paged_state_bytes, quant_constants_bytes, quantized_weights_bytes
    from planner.multigpu import ddp_per_gpu, fsdp_per_gpu, fsdp_unquantized_bytes, peak_allocated_per_gpu

    out = []
    for _, row in df.iterrows():
        if row["status"] != "ok" or not str(row["peak_allocated_bytes"]) or str(row["budget_bytes"]) not in ("", "0"):
            continue  # capped runs are the fit promise's check, not a peak measurement
        model = row_model(row)
        lora, train = _row_settings(row)
        n = int(row["world_size"])
        # the measured peak covers the whole of trainer.train(), FSDP's wrap included
        if row["strategy"] == "ddp":
            mem = ddp_per_gpu(model, lora, train, coeffs, n)
            pred_load = mem.single.quantized_weights + mem.single.quant_constants + mem.single.unquantized_weights
        else:
            mem = fsdp_per_gpu(model, lora, train, coeffs, n)
            # from_pretrained's peak (measured before the wrap): the whole 4-bit model, unquantized in the compute dtype
            pred_load = (quantized_weights_bytes(model) + quant_constants_bytes(model, train.double_quant)
                         + fsdp_unquantized_bytes(model, train))
        # as fit_context: NVML's device-wide used memory minus torch's reserved pool and the paged state
        outside = (int(row["nvml_used_bytes"]) - int(row["peak_reserved_bytes"])
                   - cuda_context_bytes(coeffs) - paged_state_bytes(model, lora, train))
        out.append({"run_id": row["run_id"], "strategy": row["strategy"], "model": row["model"], "rank": int(row["rank_index"]),
                    "measured_allocated": int(row["peak_allocated_bytes"]), "predicted_allocated": peak_allocated_per_gpu(mem),
                    "measured_reserved": int(row["peak_reserved_bytes"]),
                    "measured_load": int(row["load_peak_allocated_bytes"]), "predicted_load": int(pred_load),
                    "outside_allocator": int(outside)})
    return out


def fit_multigpu(df, coeffs: Coefficients) -> dict:
    """nccl_buffer_bytes: the most NVML saw outside torch's allocator beyond the CUDA context and paged state,
    per rank; fsdp_margin_frac: the FSDP model's worst per-rank under-prediction of peak allocated."""
    preds = predict_multigpu(df, _with(coeffs, fsdp_margin_frac=0.0))
    if not preds:
        return {}
    out = {"nccl_buffer_bytes": max(p["outside_allocator"] for p in preds)}
    fsdp = [p for p in preds if p["strategy"] == "fsdp"]
    if fsdp:
        out["fsdp_margin_frac"] = round(max(0.0, max((p["measured_allocated"] - p["predicted_allocated"])
                                                     / p["predicted_allocated"] for p in fsdp)), 4)
    return out


def contaminated_grid(df, alloc_conf: str, bisect: bool = False) -> list[dict]:
    """The contaminated rows measured under one allocator setting ("" for the default), as a harness
    JSON grid (planner/train/harness.py grid_from_json) to measure again in fresh processes;
    bisect: also bisect the allocator cap where the original did."""
    from planner.coefficients import DEFAULTS_FILE as _defaults

    base = _read(str(_defaults))
    bisected = {r.rsplit("|cap", 1)[0] for r in df[df["budget_bytes"].astype(int) != 0]["run_id"]}
    out, seen = [], set()
    for it in prepare_rows(df, base, keep_contaminated=True, per_configuration=False):
        r = it["row"]
        key = r["run_id"].rsplit("|cap", 1)[0]
        if it["offset"] <= CONTAMINATION_BYTES or str(r["alloc_conf"]) != alloc_conf or key in seen:
            continue
        seen.add(key)
        lora, train = it["lora"], it["train"]
        out.append({"model": r["model"], "batch": train.batch_size, "seq": train.seq_len,
                    "ckpt": train.gradient_checkpointing, "rank": lora.rank, "targets": ",".join(lora.targets),
                    "optim": train.optim, "dtype": train.compute_dtype, "dq": train.double_quant,
                    "accum": train.grad_accum, "unckpt": train.uncheckpointed_layers,
                    "bisect": bisect and key in bisected})
    return out


def main(argv=None) -> int:
    import argparse
    import glob
    import json

    ap = argparse.ArgumentParser(description="Write a harness grid of the contaminated calibration rows.")
    ap.add_argument("--runs", default="calibration/runs/*.csv")
    ap.add_argument("--alloc-conf", default="expandable_segments:True", help='"" for the default allocator')
    ap.add_argument("--bisect", action="store_true", help="bisect the allocator cap where the original did")
    ap.add_argument("--bisected-only", action="store_true", help="only the configurations the original bisected")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    paths = sorted(glob.glob(args.runs))
    if not paths:
        ap.error(f"no measured runs match --runs {args.runs!r}")
    rows = contaminated_grid(read_runs(paths), args.alloc_conf, args.bisect or args.bisected_only)
    if args.bisected_only:
        rows = [r for r in rows if r["bisect"]]
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)
    print(f"{len(rows)} configurations -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
