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
             "steps": 3, "gradient_checkpointing": False},
            {"model": "tiny-llama", "batch_size": 2, "seq_len": 64, "rank": 4, "data": "full", "optim": "adamw_torch",
             "steps": 3, "method": "lora-8bit"}]
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    out = tmp_path / "speed.csv"
    assert throughput.main(["--grid", str(path), "--out", str(out), "--workdir", str(tmp_path / "m"), "--one-process"]) == 0
    rows = list(csv.DictReader(out.open()))
    int8 = [r for r in rows if r["method"] == "lora-8bit"]
    rows = [r for r in rows if r["method"] == "qlora"]
    assert [r["data"] for r in rows] == ["full", "packed", "padded"] and all(r["status"] == "ok" for r in rows)
    # lora-8bit: the outlier watch ran (the CPU trains through MatMul8bitFp, which keeps no outlier columns)
    assert int8[0]["status"] == "ok" and int8[0]["int8_outlier_columns"] == "0" and rows[0]["int8_outlier_columns"] == ""
    for r in rows:
        times = [float(t) for t in r["step_times_s"].split(";")]
        assert len(times) == 3  # every step timed; the first (warm-up) is left out of the median
        assert abs(float(r["step_time_s"]) - statistics.median(times[1:])) < 1e-3
        assert float(r["real_tokens_per_step"]) <= float(r["computed_tokens_per_step"])
    full, packed, padded = rows
    assert float(full["computed_tokens_per_step"]) == 2 * 64
    assert float(packed["computed_tokens_per_step"]) == 2 * 128  # packed rows: one static shape
    assert float(padded["real_tokens_per_step"]) < float(padded["computed_tokens_per_step"])  # padding computed


def test_published_speed_readings():
    """benchmarks/published_speed.py: the padded reading's shape is a real padding of the rows (mean micro-batch
    length between the mean row and the cutoff, a non-padding share in (0, 1)), and every reading is estimated."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "published_speed.py"
    spec = importlib.util.spec_from_file_location("published_speed", path)
    mod = importlib.util.module_from_spec(spec)
    import sys
    sys.modules["published_speed"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    mean_len, share = mod.padded_shape(4, 1024)
    assert 114 < mean_len < 1024 and 0.3 < share < 1.0
    assert mod.padded_shape(1, 1024)[1] == 1.0  # one row per micro-batch: no padding
    from planner.coefficients import load_coefficients
    rows = mod.estimates(mod.FIGURES[0], load_coefficients())
    assert len(rows) == 2 * 2 * 3 and all(r["estimate_tokens_per_s"] > 0 for r in rows)


def test_steps_for_covers_the_asked_time():
    """--min-timed-seconds: a short step (Qwen2.5-0.5B, 1 x 512) runs more steps than a long one (Qwen2.5-14B,
    4 x 4096), never fewer than the grid's, never more than MAX_STEPS; 0 keeps the grid's count; an unknown GPU
    (no datasheet to estimate from) keeps it too."""
    from planner.profiles import load_model
    short = throughput.normalize({"model": "qwen2.5-0.5b", "batch_size": 1, "seq_len": 512, "rank": 8, "steps": 6})
    long = throughput.normalize({"model": "qwen2.5-14b", "batch_size": 4, "seq_len": 4096, "rank": 8, "steps": 6,
                                 "data": "packed"})
    name = "NVIDIA H100 80GB HBM3"
    n_short = throughput.steps_for(short, load_model("qwen2.5-0.5b"), name, 5.0)
    n_long = throughput.steps_for(long, load_model("qwen2.5-14b"), name, 5.0)
    assert 6 <= n_long < n_short <= throughput.MAX_STEPS
    assert throughput.steps_for(short, load_model("qwen2.5-0.5b"), name, 0.0) == 6
    assert throughput.steps_for(short, load_model("qwen2.5-0.5b"), "cpu", 5.0) == 6
