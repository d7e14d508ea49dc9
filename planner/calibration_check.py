"""Did a calibration make qfit better on a GPU? Two coefficient sets against measurements neither was fitted on.

`qfit calibrate --gpu auto` writes user coefficients for the GPU it ran on; issue #17's promise is that they predict
that GPU's other configurations no worse than the shipped ones for memory and better for tokens/s. This module
measures that, offline, from committed data: the held-out configurations are throughput-sweep CSVs
(planner.train.throughput: each row has its measured step time, peak allocated and peak reserved bytes), so one
GPU run of the sweep serves both checks.

  python -m planner.calibration_check --candidate ~/.cache/qfit/coefficients/h200.json \
      --heldout calibration/speed/h200-speed.csv [--shipped calibration/coefficients.json] [--json out.json]

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
from planner.memory import estimate
from planner.profiles import load_model
from planner.specs import Coefficients

UNDER_PCT = 1.0  # peak reserved predicted more than 1% below the measurement is counted


def memory_rows(paths: list[Path]) -> list[dict]:
    """The measured rows of throughput-sweep CSVs that a memory prediction describes (ok, not padded, first repeat)."""
    out = []
    for path in paths:
        with Path(path).open(newline="") as fh:
            for r in csv.DictReader(fh):
                if r["status"] == "ok" and r["data"] != "padded" and r["run_id"].endswith("|rep0") and r.get("peak_reserved_bytes"):
                    out.append({**r, "file": Path(path).name})
    return out


def memory_errors(rows: list[dict], coeffs: Coefficients) -> list[dict]:
    """Signed errors (predicted / measured - 1, percent) of peak allocated and peak reserved, per row."""
    out = []
    for r in rows:
        lora, train = settings_from_dict(r, packing=r["data"] == "packed",
                                         expandable_segments="expandable_segments:True" in r.get("alloc_conf", ""))
        bd = estimate(load_model(r["model"]), lora, train, coeffs)
        out.append({"run_id": r["run_id"], "file": r["file"],
                    "allocated_pct": 100.0 * (bd.peak_allocated_bytes / int(r["peak_allocated_bytes"]) - 1),
                    "reserved_pct": 100.0 * (bd.peak_reserved_bytes / int(r["peak_reserved_bytes"]) - 1)})
    return out


def _summary(errs: list[float]) -> dict:
    if not errs:
        return {"n": 0, "median": None, "max": None}
    a = sorted(abs(e) for e in errs)
    return {"n": len(a), "median": round(statistics.median(a), 2), "max": round(a[-1], 2)}


def check(shipped: Coefficients, candidate: Coefficients, heldout: list[Path]) -> dict:
    """Before/after on the held-out rows: memory (allocated, reserved, reserved under-predictions) and tokens/s."""
    from planner import speed_fit as sf

    mem = memory_rows(heldout)
    speed = sf.read_rows(heldout)
    doc = {"heldout": [str(p) for p in heldout], "memory_rows": len(mem), "speed_rows": len(speed)}
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


def render(doc: dict) -> str:
    def cell(s, key):
        v = s.get(key)
        return "-" if v is None else f"{v}%"

    lines = [f"held out: {', '.join(doc['heldout'])} ({doc['memory_rows']} memory rows, {doc['speed_rows']} speed rows)",
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
    ap.add_argument("--candidate", required=True, help="the coefficients to check (a `qfit calibrate` output)")
    ap.add_argument("--shipped", help="the coefficients to compare with (default: the shipped calibration)")
    ap.add_argument("--heldout", nargs="+", required=True, help="throughput-sweep CSVs neither set was fitted on")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    for p in [args.candidate, *args.heldout] + ([args.shipped] if args.shipped else []):
        if not Path(p).is_file():
            print(f"error: no such file: {p}", file=sys.stderr)
            return 2
    doc = check(load_coefficients(path=args.shipped) if args.shipped else load_coefficients(),
                load_coefficients(path=args.candidate), [Path(p) for p in args.heldout])
    print(render(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
