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


def test_appending_to_a_file_with_other_columns_is_refused(tmp_path):
    out = tmp_path / "old.csv"
    out.write_text("run_id,model\nx,y\n")
    with pytest.raises(SystemExit, match="other columns"):
        harness.main(["--grid", "tiny", "--out", str(out), "--workdir", str(tmp_path / "models")])
    assert out.read_text() == "run_id,model\nx,y\n"
