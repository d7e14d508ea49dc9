"""The profiling harness behind `qfit calibrate` runs end to end on the CPU (real 4-bit layers)."""

import csv

import pytest

from planner.train import harness


def test_tiny_grid_on_cpu(tmp_path):
    out = tmp_path / "runs.csv"
    assert harness.main(["--grid", "tiny", "--out", str(out), "--workdir", str(tmp_path / "models")]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(harness.grid("tiny"))
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert set(rows[0]) == set(harness.FIELDS)
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)


@pytest.mark.gpu
def test_gpu_row_has_memory(tmp_path):
    out = tmp_path / "runs.csv"
    harness.main(["--grid", "tiny", "--out", str(out), "--workdir", str(tmp_path / "models")])
    rows = list(csv.DictReader(out.open()))
    assert all(int(r["peak_allocated_bytes"]) > 0 for r in rows)
