"""Fit the throughput model (planner/speed.py) to measured optimizer steps, and measure how well it predicts
steps it never saw.

Rows are the throughput sweep's CSV rows (planner/train/throughput.py; calibration/speed/*.csv): one
configuration each, with its median step time over the timed steps. Rows with padded data are left out of the
fit (their micro-batches change shape every step, so no single shape describes them); they are reported apart.

The fit minimises the squared log ratio predicted / measured (relative error, so small models weigh as much as
large ones) over non-negative coefficients, with scipy's bounded least squares. Validation:
  - leave one configuration out (its repeats go with it): the error on configurations the fit never saw;
  - leave one model out: the error on an architecture the fit never saw;
  - fit on one sweep, predict another (another machine or another GPU kind).

numpy and scipy are imported inside the functions (the `train` extra).
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from planner.codec import settings_from_dict
from planner.profiles import load_gpu, load_model, match_gpu_name
from planner.specs import Coefficients
from planner.speed import CPU_TERMS, GPU_TERMS, METHOD_TERMS, STEP_TERMS, SpeedFeatures, features, step_seconds

# A non-4-bit base's own terms (planner.speed METHOD_TERMS): GPU terms of its rows alone, and factors on QLoRA's
METHOD_GPU = ("base_16bit", "base_8bit", "int8_matmul", "fp32_matmul")
METHOD_FACTORS = ("cpu_fwd_16bit", "cpu_bwd_16bit", "traffic_16bit", "cpu_fwd_8bit", "cpu_bwd_8bit")
METHOD_PARAMS = METHOD_TERMS  # each method's own coefficients, as planner.speed prices them
# the two overlap exponents last (lora-8bit's, then everyone else's): _predict and _bounds read them from the end
PARAMS = (tuple(f"speed_{k}" for k in CPU_TERMS + GPU_TERMS + STEP_TERMS + METHOD_GPU + METHOD_FACTORS)
          + ("speed_overlap_8bit", "speed_overlap"))
_KIND = {"qlora": 0, "lora": 1, "lora-8bit": 2}
OVERLAP_START = 2.0


@dataclass(frozen=True, slots=True)
class SpeedRow:
    run_id: str
    config_id: str  # run_id without the repeat index: repeats of one configuration share it
    model: str
    gpu: str  # catalog profile name
    data: str
    step_time_s: float
    features: SpeedFeatures


def gpu_profile_for(nvml_name: str) -> str:
    """The catalog GPU NVML's name matches (speed features need its datasheet rates)."""
    gpu = match_gpu_name(nvml_name)
    if gpu is None:
        raise ValueError(f"no GPU profile matches {nvml_name!r}: add one under profiles/gpus/")
    return gpu.name


def read_rows(paths: Iterable[Path], *, padded: bool = False) -> list[SpeedRow]:
    rows = []
    for path in paths:
        with Path(path).open(newline="") as fh:
            for r in csv.DictReader(fh):
                if r["status"] != "ok" or (r["data"] == "padded") != padded:
                    continue
                rows.append(row_from_csv(r))
    return rows


def step_iqr_pct(path: Path) -> float:
    """How steady a sweep's machine was: over its ok rows, the median of the timed steps' interquartile range as a
    percentage of their median step."""
    spreads = []
    with Path(path).open(newline="") as fh:
        for r in csv.DictReader(fh):
            steps = r.get("step_times_s") or ""
            times = sorted(float(x) for x in steps.split(";")[int(r.get("warmup_steps") or 1):] if x) if steps else []
            if r["status"] == "ok" and len(times) >= 4:
                q = statistics.quantiles(times, n=4)
                spreads.append(100.0 * (q[2] - q[0]) / statistics.median(times))
    return round(statistics.median(spreads), 2) if spreads else 0.0


def row_from_csv(r: dict) -> SpeedRow:
    lora, train = settings_from_dict(r, packing=r["data"] == "packed")
    if r["data"] == "padded":  # the mean padded micro-batch stands for all of them
        per_micro = float(r["computed_tokens_per_step"]) / train.grad_accum
        train = dataclasses.replace(train, seq_len=max(1, round(per_micro / train.batch_size)), packing=True)
    gpu = gpu_profile_for(r["gpu_name"])
    f = features(load_model(r["model"]), lora, train, load_gpu(gpu))
    return SpeedRow(r["run_id"], r["run_id"].rsplit("|rep", 1)[0], r["model"], gpu, r["data"], float(r["step_time_s"]), f)


def _matrices(rows: list[SpeedRow]) -> dict:
    import numpy as np

    return {
        "a": np.array([r.features.grad_accum for r in rows], dtype=float),
        "c": np.array([[r.features.cpu[k] for k in CPU_TERMS] for r in rows]),
        "g": np.array([[r.features.gpu.get(k, 0.0) for k in GPU_TERMS] for r in rows]),
        "x": np.array([[r.features.gpu.get(k, 0.0) for k in METHOD_GPU] for r in rows]),
        "s": np.array([[r.features.step[k] for k in STEP_TERMS] for r in rows]),
        "kind": np.array([_KIND[r.features.method] for r in rows]),
        "share": np.array([r.features.cpu_forward_share for r in rows]),
        "y": np.array([r.step_time_s for r in rows]),
    }


_TRAFFIC = [GPU_TERMS.index(k) for k in ("activations", "lora_traffic")]
_OTHER_GPU = [i for i in range(len(GPU_TERMS)) if i not in _TRAFFIC]


def _predict(p, m: dict):
    """Step seconds of every row at parameters p (PARAMS order): planner.speed.step_seconds, vectorised."""
    import numpy as np

    nc, ng, ns, nx = len(CPU_TERMS), len(GPU_TERMS), len(STEP_TERMS), len(METHOD_GPU)
    pc, pg = p[:nc], p[nc:nc + ng]
    ps, px = p[nc + ng:nc + ng + ns], p[nc + ng + ns:nc + ng + ns + nx]
    fwd16, bwd16, traffic16, fwd8, bwd8 = p[nc + ng + ns + nx:nc + ng + ns + nx + len(METHOD_FACTORS)]
    k8, k, kind, c, g = p[-2], p[-1], m["kind"], m["c"], m["g"]
    mb = CPU_TERMS.index("micro_batch")
    layer = np.delete(c, mb, axis=1) @ np.delete(pc, mb)
    share = m["share"]
    mult = np.where(kind == 1, fwd16 * share + bwd16 * (1.0 - share),
                    np.where(kind == 2, fwd8 * share + bwd8 * (1.0 - share), 1.0))
    cpu = layer * mult + c[:, mb] * pc[mb]
    gpu = (g[:, _OTHER_GPU] @ pg[_OTHER_GPU] + (g[:, _TRAFFIC] @ pg[_TRAFFIC]) * np.where(kind == 1, traffic16, 1.0)
           + m["x"] @ px)
    k = np.where(kind == 2, k8, k)
    return m["a"] * (cpu ** k + gpu ** k) ** (1.0 / k) + m["s"] @ ps


def _initial(m: dict):
    import numpy as np

    c, s = m["c"], m["s"]
    # start each coefficient where its term alone would explain a typical share of a step
    scale = lambda v: np.where(v.mean(axis=0) > 0, 0.1 / np.maximum(v.mean(axis=0), 1e-30), 1.0)  # noqa: E731
    return np.concatenate([scale(c), np.full(len(GPU_TERMS), 1.5), scale(s) * 0.1, np.full(len(METHOD_GPU), 1.5),
                           np.ones(len(METHOD_FACTORS)), [OVERLAP_START, OVERLAP_START]])


def _bounds():
    """A rate term can not beat the datasheet: its coefficient (1 / efficiency, or passes over the bytes) is >= 1;
    counts and the step terms are >= 0; a method's factors on QLoRA's terms lie in planner.speed.METHOD_TERM_BOUNDS."""
    import numpy as np

    from planner.speed import METHOD_TERM_BOUNDS, OVERLAP_BOUNDS

    lb, ub = np.zeros(len(PARAMS)), np.full(len(PARAMS), np.inf)
    for i, key in enumerate(PARAMS):
        term = key[len("speed_"):]
        if term in GPU_TERMS or term in METHOD_GPU:
            lb[i] = 1.0
        elif key in METHOD_TERM_BOUNDS:
            lb[i], ub[i] = METHOD_TERM_BOUNDS[key]
    lb[-1], ub[-1] = OVERLAP_BOUNDS
    return lb, ub


def fit(rows: list[SpeedRow], start: Coefficients | None = None) -> dict[str, float]:
    """Coefficients (speed_*) fitted to the rows, every method's rows in one fit (a lora or lora-8bit row informs
    the terms it shares with QLoRA, and its own). `start`: initial values (a previous fit), else neutral ones. A
    method without rows gets none of its own terms (planner.speed falls back to QLoRA's for it)."""
    import numpy as np
    from scipy.optimize import least_squares

    m = _matrices(rows)
    p0 = _initial(m)
    if start is not None:
        p0 = np.array([start.values.get(k, v) for k, v in zip(PARAMS, p0)], dtype=float)
    lb, ub = _bounds()
    p0 = np.clip(p0, lb + 1e-3, np.where(np.isfinite(ub), ub - 1e-3, p0 + 1))
    res = least_squares(lambda p: np.log(_predict(p, m) / m["y"]), p0, bounds=(lb, ub), x_scale="jac")
    methods = {r.features.method for r in rows}
    absent = {k for meth, keys in METHOD_PARAMS.items() if meth not in methods for k in keys}
    return {k: float(v) for k, v in zip(PARAMS, res.x) if k not in absent}


def predict(rows: list[SpeedRow], coeffs: dict[str, float] | Coefficients) -> list[float]:
    co = coeffs if isinstance(coeffs, Coefficients) else Coefficients("fit", "", dict(coeffs))
    return [step_seconds(r.features, co) for r in rows]


def errors_pct(rows: list[SpeedRow], predicted: list[float]) -> list[float]:
    """Signed error of predicted tokens/s (= measured time / predicted time - 1), in percent."""
    return [100.0 * (r.step_time_s / p - 1.0) for r, p in zip(rows, predicted)]


def held_out(rows: list[SpeedRow], group: Callable[[SpeedRow], str], start: dict | None = None) -> list[float]:
    """Each row predicted by a fit without every row of its group; signed tokens/s errors in percent."""
    start_co = Coefficients("start", "", start) if start else None
    out = [0.0] * len(rows)
    for key in sorted({group(r) for r in rows}):
        train = [r for r in rows if group(r) != key]
        test = [i for i, r in enumerate(rows) if group(r) == key]
        co = fit(train, start_co)
        for i, e in zip(test, errors_pct([rows[i] for i in test], predict([rows[i] for i in test], co))):
            out[i] = e
    return out


def summary(errs: list[float]) -> dict[str, float]:
    """Median, 90th percentile and max of the absolute errors, in percent."""
    if not errs:
        return {"n": 0, "median": 0.0, "p90": 0.0, "max": 0.0}
    a = sorted(abs(e) for e in errs)
    p90 = a[min(len(a) - 1, max(0, round(0.9 * (len(a) - 1))))]
    return {"n": len(a), "median": round(statistics.median(a), 2), "p90": round(p90, 2), "max": round(a[-1], 2)}


def with_scale(coeffs: dict[str, float], terms: tuple[str, ...], scale: float) -> dict[str, float]:
    """The coefficients with every term of `terms` (CPU_TERMS or GPU_TERMS) multiplied by scale."""
    return {k: v * scale if k[len("speed_"):] in terms else v for k, v in coeffs.items()}


def fit_scale(rows: list[SpeedRow], coeffs: dict[str, float], terms: tuple[str, ...], lo: float = 0.2,
              hi: float = 5.0) -> float:
    """The one factor on `terms` that best fits these rows, every other coefficient held: what a short sweep on
    another machine can identify (CPU_TERMS: its host's launch overheads; GPU_TERMS: its GPU's rates)."""
    import math

    from scipy.optimize import minimize_scalar

    def loss(scale: float) -> float:
        return sum(math.log(r.step_time_s / p) ** 2 for r, p in zip(rows, predict(rows, with_scale(coeffs, terms, scale))))

    return float(minimize_scalar(loss, bounds=(lo, hi), method="bounded").x)


def held_out_scale(rows: list[SpeedRow], coeffs: dict[str, float], terms: tuple[str, ...]) -> list[float]:
    """Each configuration predicted with the factor on `terms` fitted on the other configurations of the rows."""
    out = [0.0] * len(rows)
    for key in sorted({r.config_id for r in rows}):
        train = [r for r in rows if r.config_id != key]
        test = [i for i, r in enumerate(rows) if r.config_id == key]
        co = with_scale(coeffs, terms, fit_scale(train, coeffs, terms))
        for i, e in zip(test, errors_pct([rows[i] for i in test], predict([rows[i] for i in test], co))):
            out[i] = e
    return out


# --------------------------------------------------------------------------- a non-4-bit base (lora, lora-8bit)

def row_method(r: SpeedRow) -> str:
    """The method a row was measured with, read from its features (planner.speed renames the base's terms)."""
    return r.features.method


def by_method(rows: list[SpeedRow], errs: list[float]) -> dict[str, dict[str, float]]:
    """summary() of the errors of each method's rows."""
    return {m: summary([e for r, e in zip(rows, errs) if row_method(r) == m]) for m in sorted({row_method(r) for r in rows})}


def method_ratios(rows: list[SpeedRow]) -> dict[str, dict]:
    """Each method's measured step time over QLoRA's in the same configuration (same model and shape, both timed):
    {method: {"configurations", "models", "min", "median", "max"}}."""
    qlora = {r.config_id: r.step_time_s for r in rows if row_method(r) == "qlora"}
    out = {}
    for m in sorted({row_method(r) for r in rows} - {"qlora"}):
        pairs = [(r.model, r.step_time_s / qlora[key]) for r in rows if row_method(r) == m
                 and (key := r.config_id.replace(f"|{m}", "")) in qlora]
        if pairs:
            ratios = sorted(x for _, x in pairs)
            out[m] = {"configurations": len(pairs), "models": len({mm for mm, _ in pairs}), "min": round(ratios[0], 2),
                      "median": round(statistics.median(ratios), 2), "max": round(ratios[-1], 2)}
    return out
