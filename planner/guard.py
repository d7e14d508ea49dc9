"""What a short calibration sweep on the user's own machine may change, and the test it must pass first.

`qfit calibrate --gpu auto` and `--from-runs` measure a handful of configurations. The shipped coefficients were
fitted on far more (calibration/REPORT.md), so a user sweep refines them instead of replacing them:

  speed    one factor on the CPU terms (this host's kernel-launch and Python overheads) and one on the GPU terms
           (this GPU's rates against its datasheet), each only where the sweep can see it: the CPU factor needs
           configurations whose CPU time is at least half of a micro-batch, the GPU factor configurations whose GPU
           time is. The shape of the model (which term grows with what) stays as shipped.
  memory   the CUDA context (measured directly: NVML used minus reserved minus paged state) and the allocator's
           reserve coefficients of the allocator modes the sweep ran, the latter only from a sweep of at least
           MIN_MEMORY_MODELS models: their features grow with the model, and a one-model sweep cannot tell how (on an
           H100, reserve coefficients refitted on Qwen2.5-0.5B alone passed a per-configuration check, 1.63% -> 0.41%,
           and made 8B-14B models worse, 1.18% -> 1.33%: calibration/user-h100/). The structural terms
           (activation scale, logits bytes, backward temporaries) describe the libraries, not the GPU, and stay.

A candidate is accepted per quantity only if it predicts the sweep's own configurations better than the shipped
coefficients do, each held out of the fit that predicts it (speed: configuration by configuration; memory: model
by model), by a margin (`better`); otherwise the shipped value stays and the table says so. No I/O; numpy/scipy/pandas only inside the functions that fit.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from planner.specs import Coefficients
from planner.speed import CPU_TERMS, GPU_TERMS, micro_batch_seconds, overlap_exponent, step_seconds

IDENTIFY_SHARE = 0.5  # a term group is identifiable when, in some configuration, it is at least this share of the time
# a candidate must beat the shipped coefficients by a margin, not by noise: at least 10% lower held-out error and
# 0.25 percentage points
MIN_GAIN_FRAC, MIN_GAIN_PCT = 0.10, 0.25
MIN_CONFIGURATIONS = 3  # fewer distinct configurations than this: nothing is identifiable
MIN_MEMORY_MODELS = 2  # allocator reserve coefficients need a sweep over at least this many models


@dataclass(frozen=True, slots=True)
class Decision:
    """One quantity's verdict: the sweep's held-out median abs error with the shipped and the candidate coefficients."""

    quantity: str  # e.g. "tokens/s: CPU terms"
    identifiable: bool
    shipped_error_pct: float | None
    candidate_error_pct: float | None
    accepted: bool
    detail: str  # the factor or the coefficients changed, or why not

    def line(self) -> str:
        def pct(v):
            return "-" if v is None else f"{v:.2f}%"

        verdict = "accepted" if self.accepted else "kept shipped"
        return f"{self.quantity}: shipped {pct(self.shipped_error_pct)}, candidate {pct(self.candidate_error_pct)} -> {verdict} ({self.detail})"


def better(candidate_pct: float, shipped_pct: float) -> bool:
    """Whether a candidate's held-out error beats the shipped one by the margin (MIN_GAIN_FRAC and MIN_GAIN_PCT)."""
    return candidate_pct <= shipped_pct * (1 - MIN_GAIN_FRAC) and shipped_pct - candidate_pct >= MIN_GAIN_PCT


def _median_abs(errs: list[float]) -> float:
    return float(statistics.median(abs(e) for e in errs)) if errs else 0.0


def _share(rows, coeffs: Coefficients, which: str) -> float:
    """How much a factor on the CPU (or GPU) terms moves the predicted step time, at most over the rows: the
    derivative of log(step time) by log(factor). 1: the step is all that group's time; near 0: the other group
    hides it (the two overlap) and the sweep cannot see it."""
    best = 0.0
    for r in rows:
        p = overlap_exponent(r.features, coeffs)
        cpu, gpu, micro = micro_batch_seconds(r.features, coeffs)
        part = cpu if which == "cpu" else gpu
        if micro <= 0 or part <= 0:
            continue
        step = step_seconds(r.features, coeffs)
        best = max(best, r.features.grad_accum * micro * part ** p / (cpu ** p + gpu ** p) / step)
    return best


def guard_speed(shipped: dict[str, float], rows: list) -> tuple[dict[str, float], list[Decision]]:
    """The speed coefficients after a user sweep (planner.speed_fit rows), CPU factor first, then GPU factor."""
    from planner import speed_fit as sf

    coeffs = dict(shipped)
    decisions = []
    configs = {r.config_id for r in rows}
    for which, terms in (("cpu", CPU_TERMS), ("gpu", GPU_TERMS)):
        name = f"tokens/s: {which.upper()} terms"
        co = Coefficients("guard", "", coeffs)
        share = _share(rows, co, which) if rows else 0.0
        if len(configs) < MIN_CONFIGURATIONS or share < IDENTIFY_SHARE:
            why = (f"{len(configs)} configurations" if len(configs) < MIN_CONFIGURATIONS
                   else f"no configuration where the {which.upper()} terms are half of a step (largest share {share:.0%})")
            decisions.append(Decision(name, False, None, None, False, f"not identifiable: {why}"))
            continue
        shipped_err = _median_abs(sf.errors_pct(rows, sf.predict(rows, coeffs)))
        cand_err = _median_abs(sf.held_out_scale(rows, coeffs, terms))
        factor = sf.fit_scale(rows, coeffs, terms)
        ok = better(cand_err, shipped_err)
        if ok:
            coeffs = sf.with_scale(coeffs, terms, factor)
        decisions.append(Decision(name, True, round(shipped_err, 2), round(cand_err, 2), ok, f"factor {factor:.3f}"))
    return coeffs, decisions


def identifiable_memory_keys(df) -> tuple[str, ...]:
    """The memory coefficients a sweep can identify: the CUDA context when NVML was read, and each allocator
    mode's reserve coefficients when that mode ran at least MIN_CONFIGURATIONS configurations of at least
    MIN_MEMORY_MODELS models (its cap bisection coefficients when it was bisected)."""
    ok = df[df["status"] == "ok"]
    keys = []
    if len(ok) and ok["nvml_used_bytes"].astype(str).str.len().gt(0).any():
        keys.append("cuda_context_bytes")
    for mode, conf in (("expandable", "expandable_segments:True"), ("default", "")):
        rows = ok[ok["alloc_conf"].fillna("").astype(str) == conf]
        if rows["model"].nunique() < MIN_MEMORY_MODELS:
            continue
        free = rows[rows["budget_bytes"].astype(int) == 0]
        if len(free) >= MIN_CONFIGURATIONS:
            keys.append(f"reserve_*_{mode}")
        if (rows["budget_bytes"].astype(int) > 0).any():
            keys.append(f"required_*_{mode}")
    return tuple(keys)


def _restrict(candidate: Coefficients, shipped: Coefficients, keys: tuple[str, ...]) -> Coefficients:
    """The shipped coefficients with only `keys` (patterns with *) taken from the candidate."""
    import fnmatch

    values = dict(shipped.values)
    for k, v in candidate.values.items():
        if any(fnmatch.fnmatch(k, pat) for pat in keys):
            values[k] = v
    return Coefficients(shipped.name, shipped.description, values)


def guard_memory(shipped: Coefficients, df) -> tuple[Coefficients, list[Decision]]:
    """The memory coefficients after a user sweep (harness rows): the identifiable keys refitted (the shipped
    fit as the starting point), accepted only if the sweep's configurations, each predicted by a fit that did
    not see its model, come out closer in peak reserved than with the shipped coefficients. A sweep that
    identifies only the CUDA context takes it as measured (it does not enter peak reserved)."""
    from planner.fit import fit, predict_rows, prepare_rows

    keys = identifiable_memory_keys(df)
    name = "peak reserved"
    items = prepare_rows(df, shipped)
    configs = sorted({it["row"]["run_id"] for it in items})
    models = sorted({it["row"]["model"] for it in items})
    allocator = tuple(k for k in keys if k != "cuda_context_bytes")
    if not allocator or len(configs) < MIN_CONFIGURATIONS:
        why = (f"{len(configs)} configurations" if len(configs) < MIN_CONFIGURATIONS else
               f"the allocator's coefficients need a sweep of {MIN_MEMORY_MODELS} or more models (this one: "
               f"{', '.join(models) or 'none'})")
        decisions = [Decision(name, False, None, None, False, f"not identifiable: {why}")]
        if "cuda_context_bytes" in keys:  # measured directly (NVML), outside the allocator: taken as measured
            context = _restrict(fit(df, base=shipped), shipped, ("cuda_context_bytes",))
            decisions.append(Decision("CUDA context", True, None, None, True,
                                      f"measured {context.values['cuda_context_bytes'] / 2**30:.2f} GiB (shipped "
                                      f"{shipped.values['cuda_context_bytes'] / 2**30:.2f} GiB)"))
            return context, decisions
        return shipped, decisions

    def err(preds):
        return [100.0 * (p["predicted_reserved"] / p["measured_reserved"] - 1) for p in preds]

    shipped_err = _median_abs(err(predict_rows(items, shipped)))
    held = []
    for model in models:  # held out model by model: the reserve features grow with the model
        train = df[df["model"] != model]
        test = [it for it in items if it["row"]["model"] == model]
        cand = _restrict(fit(train, base=shipped), shipped, keys)
        held += err(predict_rows(test, cand))
    cand_err = _median_abs(held)
    candidate = _restrict(fit(df, base=shipped), shipped, keys)
    ok = better(cand_err, shipped_err)
    changed = sorted(k for k in candidate.values if candidate.values[k] != shipped.values.get(k))
    detail = f"refits {', '.join(keys)}" + (f"; changed {len(changed)} coefficients" if ok else "")
    return (candidate if ok else shipped), [Decision(name, True, round(shipped_err, 2), round(cand_err, 2), ok, detail)]


def decision_table(decisions: list[Decision]) -> str:
    return "\n".join(d.line() for d in decisions)
