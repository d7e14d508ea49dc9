"""benchmarks/gpu_recipes.py (issue #5's classic-recipe vs qfit speed check): the pure parts, and the whole
pipeline on the CPU with --cpu-smoke (tiny-llama, 2 steps per run, 4 `qfit run` processes: about a minute on
two CPU cores)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_recipes.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_recipes", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gr = _module()


def _row(ds, recipe, tok_s, tokens, **kw):
    row = {"dataset": ds, "recipe": recipe, "name": f"{ds}-{recipe}", "status": "completed", "exit_code": 0,
           "batch_size": 4, "grad_accum": 4, "gradient_checkpointing": True, "optim": "paged_adamw_32bit",
           "compute_dtype": "fp16", "padding": "max-length", "tokens_per_s": tok_s, "padded_tokens_per_s": tok_s,
           "predicted_tokens_per_s": 500.0, "train_tokens": tokens, "steps": 8, "oom_backoffs": 0,
           "peak_allocated_bytes": 9 * 2**30, "peak_reserved_bytes": 10 * 2**30, "budget_bytes": 13 * 2**30,
           "nvml_this_process_bytes": 12 * 2**30}
    return {**row, **kw}


def test_checks_compute_the_speedup_and_flag_unequal_tokens_and_ooms():
    rows = [_row("full-length", "classic", 1000.0, 65536), _row("full-length", "qfit", 1400.0, 65536),
            _row("instruction", "classic", 1000.0, 7000), _row("instruction", "qfit", 1200.0, 6999, oom_backoffs=1)]
    res = gr.checks(rows, steps=8, card_bytes=15 * 2**30)
    full, inst = res["full-length"], res["instruction"]
    assert full["speedup"] == 1.4 and full["target_met"] and full["tokens_equal"] and full["nvml_within_card"]
    assert not inst["tokens_equal"] and not inst["no_oom"] and not inst["target_met"]
    text = gr.table(rows, res)
    assert text.count("\n") == 5 and "1.40x" in text and "6,999 MISMATCH" in text
    assert all(line.count("|") == 12 for line in text.splitlines())  # 11 columns in every row


def test_a_failed_run_is_a_row_not_a_crash():
    rows = [_row("full-length", "classic", 1000.0, 1),
            {"dataset": "full-length", "recipe": "qfit", "name": "full-length-qfit", "status": "failed", "exit_code": 2,
             "error": "error: something"}]
    res = gr.checks(rows, steps=8)
    assert res["full-length"] == {"completed": False} and res["instruction"] == {"completed": False}
    assert all(line.count("|") == 12 for line in gr.table(rows, res).splitlines())


def test_user_mistakes_exit_2_with_one_line(tmp_path, capsys):
    assert gr.main(["--out", str(tmp_path), "--gpu", "t5"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown GPU 't5'")
    assert gr.main(["--out", str(tmp_path), "--steps", "0", "--cpu-smoke"]) == 2
    assert capsys.readouterr().err.strip() == "error: --steps must be a positive integer, got 0"
    import torch

    if not torch.cuda.is_available():
        assert gr.main(["--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: no CUDA GPU")


def test_full_length_rows_are_at_least_512_tokens_and_deterministic():
    from planner import demo

    tok = demo.build_tokenizer(512)
    a, b = gr.full_length_rows(tok, 5, 512), gr.full_length_rows(tok, 5, 512)
    assert a == b and len({r["text"] for r in a}) == 5
    assert all(len(tok(r["text"], add_special_tokens=False)["input_ids"]) >= 512 for r in a)


@pytest.mark.slow
def test_cpu_smoke_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("QFIT_EMULATE_GPU", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--cpu-smoke", "--workdir", str(tmp_path / "m")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "gpu_recipes.json").read_text())
    runs = {r["name"]: r for r in doc["runs"]}
    assert sorted(runs) == ["full-length-classic", "full-length-qfit", "instruction-classic", "instruction-qfit"]
    assert all(r["status"] == "completed" and r["steps"] == 2 for r in runs.values())
    classic = runs["full-length-classic"]
    assert (classic["batch_size"], classic["grad_accum"], classic["gradient_checkpointing"]) == (4, 4, True)
    assert (classic["optim"], classic["compute_dtype"], classic["padding"]) == ("paged_adamw_32bit", "fp16", "max-length")
    assert runs["full-length-qfit"]["padding"] == "longest"
    assert all(r["seq_len"] == 512 and r["rank"] == 16 and len(r["targets"]) == 7 for r in runs.values())
    for ds in ("full-length", "instruction"):
        chk = doc["checks"][ds]
        assert chk["completed"] and chk["steps_equal"] and chk["tokens_equal"] and chk["speedup"] > 0
    assert runs["full-length-classic"]["train_tokens"] == 2 * 16 * 512  # full-length rows: no padding at all
    assert doc["datasets"]["full-length"]["lengths"]["min"] >= 512
    assert doc["datasets"]["instruction"]["rows"] == 240 and doc["emulated_gpu"] is None
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert len(table) == 5 and table[0].startswith("| dataset | recipe |")
    assert "tokens/s: non-padding tokens" in proc.stdout and "timings:" in proc.stdout


def test_gpu_mode_emulates_the_card_in_every_run(tmp_path, monkeypatch, capsys):
    """main() without --cpu-smoke, CUDA faked in this process and `qfit run` replaced by a stub that answers
    with the figures an emulated run reports: the runs get QFIT_EMULATE_GPU and the same shared options, the
    checkpoint is saved in the T4's fp16, and the table and JSON carry the emulation."""
    import torch

    from planner.profiles import load_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    t4 = load_gpu("t4")
    calls = []

    def fake_run(name, model_path, data, out, recipe, steps, env, timeout_s):
        calls.append((name, recipe, env.get("QFIT_EMULATE_GPU"), model_path, env.get("QFIT_CACHE")))
        classic = recipe == "classic"
        tokens = 65536 if name.startswith("full") else 7000
        return {"name": name, "recipe": recipe, "exit_code": 0, "wall_s": 60.0, "log": "", "command": [],
                "status": "completed", "device": "NVIDIA T4 (emulated on NVIDIA H200)",
                "batch_size": 4 if classic else 8, "grad_accum": 4 if classic else 2, "gradient_checkpointing": True,
                "optim": "paged_adamw_32bit", "compute_dtype": "fp16", "padding": "max-length" if classic else "longest",
                "tokens_per_s": 1000.0 if classic else 1500.0, "padded_tokens_per_s": 1000.0,
                "predicted_tokens_per_s": 506.0 if classic else 573.0, "train_seconds": 10.0, "train_tokens": tokens,
                "steps": steps, "oom_backoffs": 0, "peak_allocated_bytes": 8 * 2**30, "peak_reserved_bytes": 9 * 2**30,
                "nvml_this_process_bytes": 11 * 2**30, "budget_bytes": 13 * 2**30, "library_versions": {"torch": "x"}}

    monkeypatch.setattr(gr, "run_one", fake_run)
    out = tmp_path / "bench"
    code = gr.main(["--out", str(out), "--model", "tiny-llama", "--workdir", str(tmp_path / "m")])
    text = capsys.readouterr().out
    assert code == 0, text
    assert [c[:3] for c in calls] == [("full-length-classic", "classic", "t4"), ("full-length-qfit", "qfit", "t4"),
                                      ("instruction-classic", "classic", "t4"), ("instruction-qfit", "qfit", "t4")]
    assert calls[0][3].name == "tiny-llama-fp16" and calls[0][4] == str(out.resolve() / "qfit-cache")
    doc = json.loads((out / "gpu_recipes.json").read_text())
    assert doc["emulated_gpu"] == "t4" and doc["steps"] == 8 and not doc["cpu_smoke"]
    chk = doc["checks"]["full-length"]
    assert chk["speedup"] == 1.5 and chk["target_met"] and chk["nvml_within_card"] is True
    assert chk["predicted_speedup"] == round(573 / 506, 3)
    assert "memory capped to the NVIDIA T4's, speed is the real GPU's" in text and "11.00" in text
    assert f"{t4.memory_bytes}" not in text  # bytes are shown as GiB only
