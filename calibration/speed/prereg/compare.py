"""Measured step times against predictions written before the measurement (issue 18).

  python calibration/speed/prereg/compare.py MEASURED.csv PREDICTED.csv [PREDICTED.csv ...]

MEASURED: a throughput sweep's CSV (planner/train/throughput.py); PREDICTED: methods_predict.py's output. For each
prediction file, the signed tokens/s error of every measured row (measured time / predicted time - 1) and, by
method, the median / 90th percentile / max of the absolute errors (planner.speed_fit.summary)."""

import csv
import sys

from planner.speed_fit import summary


def method_of(run_id: str) -> str:
    parts = run_id.split("|")
    return parts[-2] if parts[-2] in ("lora", "lora-8bit") else "qlora"


def main(measured: str, *predicted: str) -> None:
    rows = {r["run_id"]: float(r["step_time_s"]) for r in csv.DictReader(open(measured)) if r["status"] == "ok"}
    for path in predicted:
        pred = {r["run_id"]: float(r["predicted_step_s"]) for r in csv.DictReader(open(path))}
        errs = {k: 100.0 * (rows[k] / pred[k] - 1.0) for k in pred if k in rows}
        print(f"{path}: {len(errs)} of {len(pred)} predicted rows measured")
        for k, e in sorted(errs.items(), key=lambda x: -abs(x[1])):
            print(f"  {e:+7.2f}%  {k}")
        for m in ("qlora", "lora", "lora-8bit"):
            es = [e for k, e in errs.items() if method_of(k) == m]
            if es:
                print(f"  {m}: {summary(es)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
