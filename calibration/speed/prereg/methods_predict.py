"""Predicted step times of a methods step-time grid, written before the GPU measures it (issue 18).

  python calibration/speed/prereg/methods_predict.py calibration/grids/methods-speed-c.json h100-sxm OUT.csv

Each row: the configuration's id (as planner/train/throughput.py names it), the GPU profile and the predicted
seconds per optimizer step from the committed coefficients (calibration/coefficients.json). Compare with the
measured CSV by run_id once it exists."""

import csv
import json
import sys

from planner.codec import settings_from_dict
from planner.coefficients import load_coefficients
from planner.profiles import load_gpu, load_model
from planner.speed import features, step_seconds
from planner.train.throughput import normalize, run_id


def main(grid: str, gpu_name: str, out: str) -> None:
    coeffs, gpu = load_coefficients(), load_gpu(gpu_name)
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run_id", "gpu", "predicted_step_s", "coefficients"])
        for raw in json.load(open(grid)):
            cfg = normalize(raw)
            lora, train = settings_from_dict(cfg, lora_dropout=0.05, packing=cfg["data"] != "full")
            f = features(load_model(cfg["model"]), lora, train, gpu)
            w.writerow([run_id(cfg), gpu.name, round(step_seconds(f, coeffs), 4), coeffs.name])


if __name__ == "__main__":
    main(*sys.argv[1:4])
