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

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_recipes.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_recipes", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gr = _module()


def _row(recipe, tok_s, steps, **kw):
    row = {"dataset": "alpaca-like", "recipe": recipe, "name": f"alpaca-like-{recipe}", "status": "completed",
           "exit_code": 0, "batch_size": 4, "grad_accum": 4, "gradient_checkpointing": True, "optim": "paged_adamw_32bit",
           "compute_dtype": "fp16", "padding": "packed", "rank": 8, "targets": ["q_proj", "v_proj"],
           "tokens_per_s": tok_s, "predicted_tokens_per_s": 500.0, "train_tokens": 900, "train_padded_tokens": 1000,
           "steps": steps, "oom_backoffs": 0, "peak_allocated_bytes": 9 * 2**30, "peak_reserved_bytes": 10 * 2**30,
           "budget_bytes": 13 * 2**30, "nvml_this_process_bytes": 12 * 2**30}
    return {**row, **kw}


STEPS = {"lesson": 12, "qfit": 6, "qfit-lesson": 6}


def test_checks_compute_each_speedup_against_the_lesson_and_its_target():
    rows = [_row("lesson", 500.0, 12, padding="longest"), _row("qfit", 900.0, 6), _row("qfit-lesson", 1400.0, 6, oom_backoffs=1)]
    res = gr.checks(rows, STEPS, card_bytes=15 * 2**30)["alpaca-like"]
    assert res["qfit"]["speedup"] == 1.8 and res["qfit"]["target"] == 1.5 and res["qfit"]["target_met"]
    assert res["qfit"]["nvml_within_card"] and res["qfit"]["steps_done"]
    assert res["qfit-lesson"]["speedup"] == 2.8 and not res["qfit-lesson"]["no_oom"] and not res["qfit-lesson"]["target_met"]
    text = gr.table(rows, res and gr.checks(rows, STEPS))
    assert "1.80x" in text and "10%" in text  # speed-up and the padding share computed
    assert all(line.count("|") == 11 for line in text.splitlines())  # 10 columns in every row


def test_a_failed_run_is_a_row_not_a_crash():
    rows = [_row("lesson", 500.0, 12),
            {"dataset": "alpaca-like", "recipe": "qfit", "name": "alpaca-like-qfit", "status": "failed", "exit_code": 2,
             "error": "error: something"}]
    res = gr.checks(rows, STEPS)["alpaca-like"]
    assert res["qfit"] == {"completed": False} and res["qfit-lesson"] == {"completed": False}
    assert all(line.count("|") == 11 for line in gr.table(rows, gr.checks(rows, STEPS)).splitlines())


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


def test_alpaca_like_rows_follow_the_length_distribution_and_are_deterministic():
    import statistics

    from planner import demo

    tok = demo.build_tokenizer(512)
    a, b = gr.alpaca_like_rows(tok, 400), gr.alpaca_like_rows(tok, 400)
    assert a == b
    lengths = [len(tok(r["text"], add_special_tokens=False)["input_ids"]) + 2 for r in a]
    assert 95 <= statistics.median(lengths) <= 135 and max(lengths) <= 820  # Alpaca-like: median 114, max 800

def test_cpu_smoke_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("QFIT_EMULATE_GPU", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--cpu-smoke", "--workdir", str(tmp_path / "m")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "gpu_recipes.json").read_text())
    runs = {r["name"]: r for r in doc["runs"]}
    assert sorted(runs) == ["alpaca-like-lesson", "alpaca-like-qfit", "alpaca-like-qfit-lesson"]
    assert all(r["status"] == "completed" and r["steps"] == 2 for r in runs.values())
    lesson = runs["alpaca-like-lesson"]
    assert (lesson["batch_size"], lesson["grad_accum"], lesson["gradient_checkpointing"]) == (4, 4, True)
    assert (lesson["optim"], lesson["compute_dtype"], lesson["padding"], lesson["rank"]) == ("paged_adamw_32bit", "fp16", "longest", 8)
    assert sorted(lesson["targets"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert runs["alpaca-like-qfit"]["padding"] == "packed" and len(runs["alpaca-like-qfit"]["targets"]) == 7
    assert runs["alpaca-like-qfit-lesson"]["padding"] == "packed" and runs["alpaca-like-qfit-lesson"]["rank"] == 8
    for recipe, chk in doc["checks"]["alpaca-like"].items():
        assert chk["completed"] and chk["steps_done"] and chk["speedup"] > 0, recipe
    assert gr.padding_share(lesson) > 0.2 and gr.padding_share(runs["alpaca-like-qfit"]) < 0.05  # what packing removes
    assert doc["datasets"]["alpaca-like"]["rows"] == 3000 and doc["emulated_gpu"] is None
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert len(table) == 4 and table[0].startswith("| dataset | recipe |")
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

    def fake_run(name, model_path, data, out, recipe, steps, env, timeout_s, extra=()):
        calls.append((name, recipe, env.get("QFIT_EMULATE_GPU"), model_path, env.get("QFIT_CACHE"), steps))
        lesson = recipe == "lesson"
        return {"name": name, "recipe": recipe, "exit_code": 0, "wall_s": 60.0, "log": "", "command": [],
                "status": "completed", "device": "NVIDIA T4 (emulated on NVIDIA H100)", "rank": 8 if recipe != "qfit" else 16,
                "targets": ["q_proj"], "batch_size": 4, "grad_accum": 4, "gradient_checkpointing": True,
                "optim": "paged_adamw_32bit", "compute_dtype": "fp16", "padding": "longest" if lesson else "packed",
                "tokens_per_s": {"lesson": 500.0, "qfit": 1000.0, "qfit-lesson": 1600.0}[recipe], "padded_tokens_per_s": 1000.0,
                "predicted_tokens_per_s": 506.0 if lesson else 573.0, "train_seconds": 10.0, "train_tokens": 900,
                "train_padded_tokens": 1500 if lesson else 901,
                "steps": steps, "oom_backoffs": 0, "peak_allocated_bytes": 8 * 2**30, "peak_reserved_bytes": 9 * 2**30,
                "nvml_this_process_bytes": 11 * 2**30, "budget_bytes": 13 * 2**30, "library_versions": {"torch": "x"}}

    monkeypatch.setattr(gr, "run_one", fake_run)
    monkeypatch.setattr(gr, "SEQ_LEN", 512)  # tiny-llama takes 512 positions
    out = tmp_path / "bench"
    code = gr.main(["--out", str(out), "--model", "tiny-llama", "--workdir", str(tmp_path / "m")])
    text = capsys.readouterr().out
    assert code == 0, text
    assert [c[:3] for c in calls] == [("alpaca-like-lesson", "lesson", "t4"), ("alpaca-like-qfit", "qfit", "t4"),
                                      ("alpaca-like-qfit-lesson", "qfit-lesson", "t4")]
    assert [c[5] for c in calls] == [12, 6, 6]
    assert calls[0][3].name == "tiny-llama-fp16" and calls[0][4] == str(out.resolve() / "qfit-cache")
    doc = json.loads((out / "gpu_recipes.json").read_text())
    assert doc["emulated_gpu"] == "t4" and doc["steps"] == {"lesson": 12, "qfit": 6, "qfit-lesson": 6} and not doc["cpu_smoke"]
    chk = doc["checks"]["alpaca-like"]
    assert chk["qfit"]["speedup"] == 2.0 and chk["qfit"]["target_met"] and chk["qfit"]["nvml_within_card"] is True
    assert chk["qfit-lesson"]["speedup"] == 3.2 and chk["qfit-lesson"]["target_met"]
    assert chk["qfit"]["predicted_speedup"] == round(573 / 506, 3)
    assert "memory capped to the NVIDIA T4's, speed is the real GPU's" in text and "11.00" in text
    assert f"{t4.memory_bytes}" not in text  # bytes are shown as GiB only
