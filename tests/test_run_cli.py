"""`qfit run`'s shell: --gpu NAME, --json, and what an immediate interrupt says and leaves behind."""

from __future__ import annotations

import json

from click.testing import CliRunner

from planner.cli_run import interrupted_line, run_cmd


def test_an_unknown_gpu_is_one_line_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.delenv("QFIT_EMULATE_GPU", raising=False)
    res = CliRunner().invoke(run_cmd, ["--demo", "--output", str(tmp_path / "o"), "--gpu", "t5"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "t5" in res.stderr
    assert not (tmp_path / "o").exists()


def test_json_prints_the_report_and_gpu_names_the_card(tmp_path, monkeypatch):
    monkeypatch.delenv("QFIT_EMULATE_GPU", raising=False)
    out = tmp_path / "o"
    res = CliRunner().invoke(run_cmd, ["--demo", "--output", str(out), "--max-steps", "2", "--eval-fraction", "0",
                                       "--json", "--gpu", "t4"])
    monkeypatch.delenv("QFIT_EMULATE_GPU", raising=False)  # the command set it for its process
    assert res.exit_code == 0, res.stderr[-2000:]
    doc = json.loads(res.stdout)  # stdout is the report alone: progress went to stderr
    assert doc["status"] == "completed" and doc == json.loads((out / "run_report.json").read_text())
    assert "QFIT_EMULATE_GPU=t4 ignored: it needs a CUDA GPU" in res.stderr  # on the CPU, said in one note


def test_a_second_ctrl_c_names_the_last_checkpoint_and_leaves_a_report(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"x")
    line = interrupted_line(str(out))
    assert "checkpoint-4" in line and f"qfit run --resume {out}" in line and "nothing was saved" not in line
    rep = json.loads((out / "run_report.json").read_text())
    assert rep["status"] == "interrupted" and rep["checkpoint"].endswith("checkpoint-4")
    assert interrupted_line(str(tmp_path / "nothing")) == "interrupted: no checkpoint was saved yet"


def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path):
    import pytest

    from planner.train.options import RunError
    from planner.train.output import check_checkpoint

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")  # a truncated header
    with pytest.raises(RunError, match="checkpoint .*checkpoint-4 is damaged .*delete that folder"):
        check_checkpoint(ckpt)
    (ckpt / "adapter_model.safetensors").unlink()
    (ckpt / "trainer_state.json").write_text("{not json")
    with pytest.raises(RunError, match="is damaged"):
        check_checkpoint(ckpt)
