"""Did a calibration make qfit better on a GPU? Two coefficient sets against measurements neither was fitted on.

`qfit calibrate --gpu auto` writes user coefficients for the GPU it ran on; issue #17's promise is that they predict
that GPU's other configurations no worse than the shipped ones for memory and better for tokens/s. This module
measures that, offline, from committed data: the held-out configurations are throughput-sweep CSVs
(planner.train.throughput: each row has its measured step time, peak allocated and peak reserved bytes), so one
GPU run of the sweep serves both checks.

  python -m planner.calibration_check --candidate ~/.cache/qfit/coefficients-h200.json \
      --heldout calibration/speed/h200-speed.csv [--shipped calibration/coefficients.json] [--json out.json]
  python -m planner.calibration_check --replay MEMORY_SWEEP.csv SPEED_SWEEP.csv --heldout ...   (the guard as it is now)

Per quantity it prints the median and max abs error (tokens/s: median, 90th percentile, max) before (shipped) and
after (candidate), and how many peak reserved predictions fall more than UNDER_PCT below the measurement. That count
is not the fits check: these runs were not capped, and an uncapped allocator reserves more than the smallest budget a
step runs in; whether plans made with the candidate fit is `python -m planner.train.validate --coefficients FILE`
(capped runs on the GPU). numpy and scipy come in through speed_fit (the `train` extra).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

from planner.codec import settings_from_dict
from planner.coefficients import load_coefficients
from planner.fit import row_model
from planner.memory import estimate
from planner.specs import Coefficients

UNDER_PCT = 1.0  # peak reserved predicted more than 1% below the measurement is counted


def memory_rows(paths: list[Path], exclude: tuple[str, ...] = ()) -> list[dict]:
    """The measured rows of throughput-sweep CSVs that a memory prediction describes (ok, not padded, first repeat),
    without the models in `exclude` (those the calibration's own sweep saw)."""
    out = []
    for path in paths:
        with Path(path).open(newline="") as fh:
            for r in csv.DictReader(fh):
                if (r["status"] == "ok" and r["data"] != "padded" and r["run_id"].endswith("|rep0")
                        and r.get("peak_reserved_bytes") and r["model"] not in exclude):
                    out.append({**r, "file": Path(path).name})
    return out


def memory_errors(rows: list[dict], coeffs: Coefficients) -> list[dict]:
    """Signed errors (predicted / measured - 1, percent) of peak allocated and peak reserved, per row."""
    out = []
    for r in rows:
        lora, train = settings_from_dict(r, packing=r["data"] == "packed",
                                         expandable_segments="expandable_segments:True" in r.get("alloc_conf", ""))
        bd = estimate(row_model(r), lora, train, coeffs)
        out.append({"run_id": r["run_id"], "file": r["file"],
                    "allocated_pct": 100.0 * (bd.peak_allocated_bytes / int(r["peak_allocated_bytes"]) - 1),
                    "reserved_pct": 100.0 * (bd.peak_reserved_bytes / int(r["peak_reserved_bytes"]) - 1)})
    return out


def _summary(errs: list[float]) -> dict:
    if not errs:
        return {"n": 0, "median": None, "max": None}
    a = sorted(abs(e) for e in errs)
    return {"n": len(a), "median": round(statistics.median(a), 2), "max": round(a[-1], 2)}


def check(shipped: Coefficients, candidate: Coefficients, heldout: list[Path], exclude: tuple[str, ...] = ()) -> dict:
    """Before/after on the held-out rows (models in `exclude` left out): memory (allocated, reserved, reserved
    under-predictions) and tokens/s."""
    from planner import speed_fit as sf

    mem = memory_rows(heldout, exclude)
    speed = [r for r in sf.read_rows(heldout) if r.model not in exclude]
    doc = {"heldout": [str(p) for p in heldout], "excluded_models": list(exclude), "memory_rows": len(mem),
           "speed_rows": len(speed)}
    for label, co in (("shipped", shipped), ("candidate", candidate)):
        m = memory_errors(mem, co)
        s = sf.errors_pct(speed, sf.predict(speed, co)) if speed else []
        doc[label] = {"name": co.name,
                      "peak_allocated": _summary([e["allocated_pct"] for e in m]),
                      "peak_reserved": _summary([e["reserved_pct"] for e in m]),
                      "reserved_under": sum(e["reserved_pct"] < -UNDER_PCT for e in m),
                      "tokens_per_s": sf.summary(s) if s else {"n": 0}}
    b, a = doc["shipped"], doc["candidate"]
    doc["verdict"] = {
        "memory_no_worse": (a["peak_reserved"]["median"] or 0) <= (b["peak_reserved"]["median"] or 0) + 0.05
        and a["reserved_under"] <= b["reserved_under"],
        "speed_better": bool(speed) and a["tokens_per_s"]["median"] < b["tokens_per_s"]["median"],
    }
    return doc


def replay_guard(shipped: Coefficients, memory_csv: Path, speed_csv: Path) -> tuple[Coefficients, list[str]]:
    """The coefficients `qfit calibrate --gpu auto` writes from its two sweep files (planner.refit.calibrate_this_gpu's
    last step, with the guard as it is now): for checking a guard change on sweeps measured before it."""
    from planner import guard
    from planner import speed_fit as sf
    from planner.fit import read_runs

    memory, mem_decisions = guard.guard_memory(shipped, read_runs([str(memory_csv)]))
    speed_values, speed_decisions = guard.guard_speed(
        {k: v for k, v in shipped.values.items() if k.startswith("speed_") and isinstance(v, float)},
        sf.read_rows([speed_csv]))
    values = {**memory.values, **speed_values}
    return Coefficients("replayed-guard", f"guard replayed on {memory_csv.name}, {speed_csv.name}", values), \
        [d.line() for d in mem_decisions + speed_decisions]


def render(doc: dict) -> str:
    def cell(s, key):
        v = s.get(key)
        return "-" if v is None else f"{v}%"

    without = f", without {', '.join(doc['excluded_models'])}" if doc.get("excluded_models") else ""
    lines = [f"held out: {', '.join(doc['heldout'])}{without} ({doc['memory_rows']} memory rows, {doc['speed_rows']} speed rows)",
             "", "| coefficients | peak reserved median / max | peak allocated median / max | reserved predicted > "
             f"{UNDER_PCT:g}% low | tokens/s median / p90 / max |", "|---|---|---|---|---|"]
    for label in ("shipped", "candidate"):
        d = doc[label]
        t = d["tokens_per_s"]
        lines.append(f"| {label} ({d['name']}) | {cell(d['peak_reserved'], 'median')} / {cell(d['peak_reserved'], 'max')} | "
                     f"{cell(d['peak_allocated'], 'median')} / {cell(d['peak_allocated'], 'max')} | {d['reserved_under']} | "
                     + (f"{t['median']}% / {t['p90']}% / {t['max']}%" if t.get("n") else "-") + " |")
    v = doc["verdict"]
    lines += ["", f"memory no worse: {'yes' if v['memory_no_worse'] else 'NO'}; tokens/s better: "
              f"{'yes' if v['speed_better'] else 'NO'}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--candidate", help="the coefficients to check (a `qfit calibrate` output)")
    group.add_argument("--replay", nargs=2, metavar=("MEMORY_CSV", "SPEED_CSV"),
                       help="instead: the two sweep files of a `qfit calibrate --gpu auto` run, passed through the guard "
                            "as it is now")
    ap.add_argument("--shipped", help="the coefficients to compare with (default: the shipped calibration)")
    ap.add_argument("--heldout", nargs="+", required=True, help="throughput-sweep CSVs neither set was fitted on")
    ap.add_argument("--exclude-models", default="", help="comma-separated: models the calibration's sweep saw")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    inputs = [args.candidate] if args.candidate else list(args.replay)
    for p in inputs + args.heldout + ([args.shipped] if args.shipped else []):
        if not Path(p).is_file():
            print(f"error: no such file: {p}", file=sys.stderr)
            return 2
    shipped = load_coefficients(path=args.shipped) if args.shipped else load_coefficients()
    verdicts = []
    if args.candidate:
        candidate = load_coefficients(path=args.candidate)
    else:
        candidate, verdicts = replay_guard(shipped, Path(args.replay[0]), Path(args.replay[1]))
    doc = check(shipped, candidate, [Path(p) for p in args.heldout], tuple(m for m in args.exclude_models.split(",") if m))
    doc["guard"] = verdicts
    print("\n".join(verdicts + ([""] if verdicts else [])) + render(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
