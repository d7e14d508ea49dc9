"""planner/train/throughput.py, the step-timing sweep behind the speed model: the whole path on the CPU with the
tiny Llama (real NF4 + LoRA through the Trainer), one row per configuration, the three kinds of data."""

from __future__ import annotations

import csv
import json
import statistics

from planner.train import throughput


def test_tiny_sweep_writes_one_row_per_configuration(tmp_path):
    grid = [{"model": "tiny-llama", "batch_size": 2, "seq_len": 64, "rank": 4, "data": "full", "optim": "adamw_torch", "steps": 3},
            {"model": "tiny-llama", "batch_size": 2, "seq_len": 128, "rank": 4, "data": "packed", "optim": "adamw_torch", "steps": 3},
            {"model": "tiny-llama", "batch_size": 2, "seq_len": 128, "rank": 4, "data": "padded", "optim": "adamw_torch",
             "steps": 3, "gradient_checkpointing": False}]
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    out = tmp_path / "speed.csv"
    assert throughput.main(["--grid", str(path), "--out", str(out), "--workdir", str(tmp_path / "m"), "--one-process"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["data"] for r in rows] == ["full", "packed", "padded"] and all(r["status"] == "ok" for r in rows)
    for r in rows:
        times = [float(t) for t in r["step_times_s"].split(";")]
        assert len(times) == 3  # every step timed; the first (warm-up) is left out of the median
        assert abs(float(r["step_time_s"]) - statistics.median(times[1:])) < 1e-3
        assert float(r["real_tokens_per_step"]) <= float(r["computed_tokens_per_step"])
    full, packed, padded = rows
    assert float(full["computed_tokens_per_step"]) == 2 * 64
    assert float(packed["computed_tokens_per_step"]) == 2 * 128  # packed rows: one static shape
    assert float(padded["real_tokens_per_step"]) < float(padded["computed_tokens_per_step"])  # padding computed
