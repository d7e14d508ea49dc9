"""planner.calibration_check: shipped vs candidate coefficients on throughput-sweep rows neither was fitted on."""

from __future__ import annotations

import json
from pathlib import Path

from planner import calibration_check as cc
from planner.coefficients import load_coefficients
from planner.specs import Coefficients
from planner.speed import CPU_TERMS

SWEEP_A = Path(__file__).resolve().parents[1] / "calibration" / "speed" / "h100-speed-a.csv"


def _scaled(co: Coefficients, factor: float) -> Coefficients:
    values = {k: v * factor if k in {f"speed_{t}" for t in CPU_TERMS} else v for k, v in co.values.items()}
    return Coefficients(f"cpu-x{factor}", "", values)


def test_same_coefficients_change_nothing():
    shipped = load_coefficients()
    doc = cc.check(shipped, shipped, [SWEEP_A])
    assert doc["memory_rows"] > 20 and doc["speed_rows"] > 20
    assert doc["shipped"]["peak_reserved"] == doc["candidate"]["peak_reserved"]
    assert doc["verdict"]["memory_no_worse"] and not doc["verdict"]["speed_better"]


def test_a_slower_host_factor_is_seen_as_better_speed_and_equal_memory():
    """The second H100 machine's host was slower: CPU terms x 1.3 predict its steps better (the report's CPU factor),
    and speed coefficients leave every memory figure as it was."""
    shipped = load_coefficients()
    doc = cc.check(shipped, _scaled(shipped, 1.3), [SWEEP_A])
    assert doc["candidate"]["tokens_per_s"]["median"] < doc["shipped"]["tokens_per_s"]["median"]
    assert doc["verdict"]["speed_better"] and doc["verdict"]["memory_no_worse"]
    assert doc["candidate"]["peak_allocated"] == doc["shipped"]["peak_allocated"]
    text = cc.render(doc)
    assert "tokens/s better: yes" in text and "memory no worse: yes" in text


def test_worse_memory_coefficients_are_flagged(tmp_path):
    """A candidate whose allocator reserve is halved predicts peak reserved worse: the verdict says NO."""
    shipped = load_coefficients()
    values = {k: (v * 0.5 if k.startswith("reserve_") and isinstance(v, float) else v) for k, v in shipped.values.items()}
    bad = Coefficients("bad-reserve", "", values)
    doc = cc.check(shipped, bad, [SWEEP_A])
    assert doc["candidate"]["peak_reserved"]["median"] > doc["shipped"]["peak_reserved"]["median"]
    assert not doc["verdict"]["memory_no_worse"]


def test_cli(tmp_path, capsys):
    cand = tmp_path / "cand.json"
    cand.write_text(json.dumps({"name": "x", "description": "", "values": load_coefficients().values}))
    out = tmp_path / "check.json"
    assert cc.main(["--candidate", str(cand), "--heldout", str(SWEEP_A), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["speed_rows"] > 20
    assert cc.main(["--candidate", str(tmp_path / "missing.json"), "--heldout", str(SWEEP_A)]) == 2
    assert "no such file" in capsys.readouterr().err
