"""`qfit run` on the CPU: the demo end to end, the OOM back-off, stop and resume, and the checks
that come before any model is loaded. Everything trains the tiny demo model (planner/demo), so
nothing is downloaded; the whole file takes about a minute on two CPU cores."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from planner.cli_run import run_cmd
from planner.profiles import load_model
from planner.train import device, oom, planning, run_report, runner, session, source
from planner.train.harness import FIELDS  # imports transformers now, before any test fakes CUDA
from planner.train.options import PADDINGS
from planner.train.runner import RunError, RunOptions
from planner.train.trainer_glue import PadCollator

ROOT = Path(__file__).resolve().parent.parent



@pytest.fixture(scope="module")
def demo_dir(cache):
    from planner import demo

    return demo.prepare()


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def quiet(opts: RunOptions, **kw):
    lines: list[str] = []
    result = runner.run(opts, echo=lines.append, **kw)
    return result, "\n".join(lines)


def logged_steps(report: dict) -> list[int]:
    return [h["step"] for h in report["loss"]["history"]]


# --------------------------------------------------------------------------- the demo, end to end

@pytest.fixture(scope="module")
def demo_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    t0 = time.perf_counter()
    res = CliRunner().invoke(run_cmd, ["--demo", "--output", str(out)], catch_exceptions=False)
    seconds = time.perf_counter() - t0
    report = json.loads((out / "run_report.json").read_text())
    return res, out, report, seconds


def test_demo_trains_and_the_loss_goes_down(demo_run):
    res, out, report, _ = demo_run  # the demo's wall time is a benchmark (benchmarks/bench_demo.py), not a test
    assert res.exit_code == 0, res.output
    hist = [h["loss"] for h in report["loss"]["history"]]
    assert len(hist) == report["steps"]["planned"] == report["steps"]["completed"] == 120
    first, last = sum(hist[:10]) / 10, sum(hist[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "plan.json", "run_report.json"):
        assert (out / name).is_file(), name
    assert "adapter:" in res.output and "PeftModel.from_pretrained" in res.output
    if not cuda():
        assert "CPU mode" in res.output and "calibration data not appended" in res.output


def test_demo_report_reads_settings_back_from_the_model(demo_run):
    _, _, report, _ = demo_run
    planned, effect = report["planned"], report["in_effect"]
    for key in ("batch_size", "grad_accum", "gradient_checkpointing", "optim", "compute_dtype", "rank", "alpha",
                "double_quant"):
        assert effect[key] == planned[key], key
    assert effect["gradient_checkpointing"] is False  # prepare_model_for_kbit_training did not turn it on
    assert effect["quant_type"] == "nf4" and effect["quantized_linears"] == 14  # 2 layers x 7 linears
    assert effect["lora_layers"] == 14 and sorted(effect["targets"]) == sorted(planned["targets"])
    assert effect["lr_scheduler"].endswith("(cosine)") and effect["warmup_steps"] == 6  # 5% of 120
    assert report["memory"]["predicted"]["peak_allocated_bytes"] > 0
    assert report["speed"]["tokens_per_s"] > 0 and report["oom_events"] == []
    if not cuda():  # nothing to measure on the CPU, nothing appended to the calibration data
        assert report["memory"]["measured"]["peak_allocated_bytes"] == 0 and "CPU" in report["memory"]["note"]
        assert report["calibration_row"] is None


def test_adapter_loads_on_a_fresh_4bit_base_and_generates(demo_run, demo_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    _, out, _, _ = demo_run
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16 and Path(cfg["base_model_name_or_path"]) == demo_dir
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(str(demo_dir), quantization_config=bnb)
    model = PeftModel.from_pretrained(base, str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained weights, not the zero init
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nGreet the user.\n\n### Response:\n")
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]


# --------------------------------------------------------------------------- OOM back-off

def _oom_injector(at_step: int):
    """Raises the CUDA allocator's message once, mid-accumulation, during step at_step + 1."""
    from transformers import TrainerCallback

    class InjectOOM(TrainerCallback):
        fired = 0

        def on_substep_end(self, args, state, control, **kwargs):
            if state.global_step == at_step and not self.fired:
                InjectOOM.fired += 1
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")

    return InjectOOM()


@pytest.mark.parametrize("at_step", [3, 0], ids=["mid-run", "first-step"])
def test_oom_halves_the_micro_batch_and_loses_no_step(cache, tmp_path, at_step):
    inject = _oom_injector(at_step)
    opts = RunOptions(output=str(tmp_path / "run"), demo=True, max_steps=8, effective_batch=8, batch_size=4,
                      gradient_checkpointing=True, save_steps=100, progress=False)
    res, text = quiet(opts, callbacks=(inject,))
    rep = res.report
    assert inject.fired == 1 and res.status == "completed"
    (event,) = rep["oom_events"]
    assert (event["micro_batch_before"], event["grad_accum_before"]) == (4, 2)
    assert (event["micro_batch_after"], event["grad_accum_after"]) == (2, 4)
    assert event["step"] == at_step + 1
    eff = rep["in_effect"]
    assert (eff["batch_size"], eff["grad_accum"], eff["effective_batch"]) == (2, 4, 8)  # effective batch unchanged
    assert rep["steps"]["completed"] == rep["steps"]["planned"] == 8  # no lost steps
    assert logged_steps(rep) == list(range(1, 9))  # every step once: none lost, none repeated
    lrs = [h["learning_rate"] for h in rep["loss"]["history"]][1:]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] > 0  # the cosine schedule resumed, not restarted
    if at_step:
        assert event["resumed_from"].endswith(f"checkpoint-{at_step}")  # saved right after the OOM
    else:
        assert event["resumed_from"] is None  # nothing finished yet: restarted from the initial weights
    assert eff["gradient_checkpointing"] is True  # as asked, read back from the model
    assert "no step lost" in text
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert (saved["settings"]["batch_size"], saved["settings"]["grad_accum"]) == (2, 4)  # --resume keeps it


def test_backoff_keeps_the_effective_batch():
    assert oom.backoff(8, 2) == (4, 4)
    assert oom.backoff(6, 1) == (3, 2)
    assert oom.backoff(3, 4) == (1, 12)
    with pytest.raises(ValueError):
        oom.backoff(1, 8)


def test_oom_with_uncheckpointed_layers_first_checkpoints_every_layer():
    """Partial checkpointing is the first thing an OOM gives back: the micro-batch is kept, then halved."""
    from planner.specs import TrainSettings

    train = TrainSettings(batch_size=8, grad_accum=2, gradient_checkpointing=True, uncheckpointed_layers=3)
    where = {"phase": "train", "step": 5, "message": "CUDA out of memory", "resumed_from": None}
    train, event = oom.next_settings(train, where)
    assert (train.batch_size, train.uncheckpointed_layers) == (8, 0)
    assert event["uncheckpointed_layers_before"] == 3 and "every layer is checkpointed" in oom.explain(event)
    train, event = oom.next_settings(train, where)
    assert (train.batch_size, train.grad_accum) == (4, 4) and "uncheckpointed_layers_before" not in event
    assert oom.explain(event).startswith("out of memory (train, step 5) at micro-batch 8: now micro-batch 4 x accumulation 4")


def test_oom_policy_is_one_pure_function_for_one_and_several_gpus():
    """The single-GPU session and the multi-GPU relaunch loop share next_settings; micro-batch 1 is the end."""
    from planner.specs import TrainSettings

    train, event = oom.next_settings(TrainSettings(batch_size=6, grad_accum=1, gradient_checkpointing=False),
                                     {"rank": 1, "step": 3, "message": "CUDA out of memory.", "resumed_from": "/o/checkpoint-2"})
    assert (train.batch_size, train.grad_accum) == (3, 2)
    assert list(event) == ["rank", "step", "message", "micro_batch_before", "grad_accum_before", "micro_batch_after",
                           "grad_accum_after", "resumed_from"]
    assert oom.explain(event) == ("out of memory on rank 1 (step 3): now micro-batch 3 x accumulation 2 per GPU "
                                  "(global batch unchanged), resuming from checkpoint-2; no step lost")
    with pytest.raises(oom.NoSmallerSettings):
        oom.next_settings(TrainSettings(batch_size=1, grad_accum=8), {"phase": "probe", "step": 1, "message": ""})
    with pytest.raises(RunError, match="out of memory at micro-batch 1 x 512 tokens"):
        session.back_off(TrainSettings(batch_size=1, grad_accum=8), 0, "probe", "CUDA out of memory.", None, print)


def test_oom_detection():
    import torch

    assert oom.is_cuda_oom(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert oom.is_cuda_oom(torch.OutOfMemoryError("anything"))
    assert not oom.is_cuda_oom(RuntimeError("shape mismatch"))
    assert not oom.is_cuda_oom(ValueError("CUDA out of memory."))


# --------------------------------------------------------------------------- stop and resume

def _signal_at(step: int, sig: int):
    from transformers import TrainerCallback

    class SendSignal(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                os.kill(os.getpid(), sig)

    return SendSignal()


def test_sigterm_saves_a_checkpoint_and_resume_loses_no_step(cache, tmp_path):
    out = tmp_path / "run"
    opts = RunOptions(output=str(out), demo=True, max_steps=10, effective_batch=4, save_steps=100, progress=False)
    first, text = quiet(opts, callbacks=(_signal_at(4, signal.SIGTERM),))
    assert first.status == "interrupted" and first.exit_code == 128 + signal.SIGTERM
    assert first.checkpoint.endswith("checkpoint-4") and (out / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "run_report.json").read_text())["status"] == "interrupted"
    assert f"qfit run --resume {out}" in text
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    res = CliRunner().invoke(run_cmd, ["--resume", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "run_report.json").read_text())
    assert rep["status"] == "completed" and rep["steps"]["completed"] == 10
    assert rep["steps"]["resumed_from"].endswith("checkpoint-4") and rep["steps"]["run_in_this_process"] == 6
    assert logged_steps(rep) == list(range(1, 11))
    lrs = [h["learning_rate"] for h in rep["loss"]["history"]][1:]
    assert lrs == sorted(lrs, reverse=True)  # optimizer and scheduler state came back from the checkpoint
    assert (out / "adapter_model.safetensors").is_file()

    again = CliRunner().invoke(run_cmd, ["--resume", str(out)])
    assert again.exit_code == 2 and "is complete" in again.output


def test_sigint_in_a_real_process_then_resume(cache, tmp_path):
    """The CLI in a subprocess, interrupted from outside while it trains."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QFIT_CACHE": str(cache)}
    cmd = [sys.executable, "-c", "from planner.cli_run import run_cmd; run_cmd()",
           "--demo", "--output", str(out), "--max-steps", "3000", "--save-steps", "5000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # wait until training has started
        lines.append(line)
        if line.startswith("training:"):
            break
    try:
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, "".join(lines) + rest
    assert "Traceback" not in rest and "qfit run --resume" in rest
    rep = json.loads((out / "run_report.json").read_text())
    step = rep["steps"]["completed"]
    assert rep["status"] == "interrupted" and 0 < step < 3000
    assert (out / f"checkpoint-{step}" / "trainer_state.json").is_file()


# --------------------------------------------------------------------------- checks before any model is loaded

@pytest.fixture
def no_model_load(monkeypatch):
    from planner.train import stack

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(stack, "load_4bit", refuse)


def test_bad_data_is_reported_before_the_model_loads(cache, demo_dir, tmp_path, no_model_load):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "z"}\n')
    res = CliRunner().invoke(run_cmd, [str(demo_dir), "--dataset", str(bad), "--output", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert res.stderr.strip() == "error: bad.jsonl row 2: missing field 'output' (alpaca rows need instruction and " \
                                 "output, input is optional; --format picks another layout)"


@pytest.mark.parametrize("args,expect", [
    (["--demo", "--output", "{full}"], "exists and is not empty: pass --overwrite"),
    (["--demo", "--output", "{full}", "--overwrite"], "was not written by qfit run"),
    (["--demo", "--output", "{o}", "--max-steps", "0"], "--max-steps must be a positive integer"),
    (["--demo", "--output", "{o}", "--epochs", "1", "--max-steps", "3"], "--epochs or --max-steps, not both"),
    (["--demo", "--output", "{o}", "--optim", "sgd"], "Invalid value for '--optim'"),
    (["--demo", "--output", "{o}", "--targets", "qproj"], "has no linear named 'qproj'"),
    (["--demo", "--output", "{o}", "--seq-len", "4096"], "exceeds tiny-llama (qfit demo)'s max_position_embeddings"),
    (["--output", "{o}", "--dataset", "x.jsonl"], "name a MODEL"),
    (["tiny-llama", "--output", "{o}", "--dataset", "x.jsonl"], "has no Hugging Face id"),
    (["--resume", "{o}"], "nothing to resume"),
    (["--resume", "{o}", "--rank", "8"], "--resume continues a run with its saved settings: drop --rank"),
    (["--demo"], "--output DIR is required"),
    (["--demo", "--output", "{o}", "--uncheckpointed-layers", "1", "--no-gradient-checkpointing"],
     "--uncheckpointed-layers needs checkpointing"),
    (["--demo", "--output", "{o}", "--uncheckpointed-layers", "99"], "decoder layers; for none checkpointed"),
    (["--demo", "--output", "{o}", "--plan", "{o}/none.json"], "drop MODEL, --dataset and --plan"),
    (["--demo", "--output", "{o}", "--eval-fraction", "0.7"], "--eval-fraction must be from 0"),
    (["--demo", "--output", "{o}", "--eval-fraction", "0.1", "--eval-dataset", "v.jsonl"],
     "give --eval-dataset or --eval-fraction, not both"),
    (["--demo", "--output", "{o}", "--eval-fraction", "0", "--eval-steps", "5"], "--eval-steps needs a validation set"),
    (["--demo", "--output", "{o}", "--eval-steps", "0"], "--eval-steps must be a positive integer"),
    (["--demo", "--output", "{o}", "--eval-dataset", "{o}/missing.jsonl"], "no such file"),
    (["--demo", "--output", "{o}", "--num-gpus", "2", "--eval-fraction", "0.1"], "validation (--eval-dataset"),
    (["--demo", "--output", "{o}", "--warmup", "-1"], "--warmup must be a fraction of the steps"),
    (["--demo", "--output", "{o}", "--warmup", "2.5"], "--warmup must be a fraction of the steps"),
    (["--demo", "--output", "{o}", "--seed", "-1"], "--seed must be an integer from 0"),
    (["--demo", "--output", "{o}", "--scheduler", "step"], "Invalid value for '--scheduler'"),
    (["--demo", "--output", "{o}", "--report-to", "mlflow"], "Invalid value for '--report-to'"),
    (["--demo", "--output", "{o}", "--sample-prompt", " "], "--sample-prompt needs some text"),
    (["--demo", "--output", "{o}", "--num-gpus", "2", "--sample-prompt", "hi"], "--sample-prompt runs on one GPU"),
    (["--demo", "--output", "{o}", "--num-gpus", "2", "--report-to", "wandb"], "--report-to runs on one GPU"),
    (["--resume", "{o}", "--seed", "3"], "--resume continues a run with its saved settings: drop --seed"),
    (["--resume", "{o}", "--scheduler", "linear"], "drop --scheduler"),
])
def test_user_mistakes_are_one_line_exit_2(cache, tmp_path, no_model_load, args, expect):
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    args = [a.format(full=full, o=tmp_path / "o") for a in args]
    res = CliRunner().invoke(run_cmd, args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], res.output
    assert "Traceback" not in res.output
    assert (full / "notes.txt").read_text() == "mine"


def test_model_not_available_offline(cache, tmp_path, monkeypatch, no_model_load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(RunError, match="not in the local Hugging Face cache") as err:
        source.resolve_model("mistral-7b")
    assert "huggingface-cli download mistralai/Mistral-7B-v0.1" in str(err.value)
    with pytest.raises(RunError, match="not in the local Hugging Face cache"):
        source.resolve_model("someone/not-a-model")
    with pytest.raises(RunError, match="no config.json"):
        source.resolve_model(str(tmp_path))


# --------------------------------------------------------------------------- plan file and CLI shape

def test_saved_plan_drives_the_run(demo_run, demo_dir, tmp_path):
    """plan.json (the `qfit plan --save` layout) of the demo run, used with --plan on the same model
    given as a local directory, with one override on top."""
    _, out, report, _ = demo_run
    plan = json.loads((out / "plan.json").read_text())
    res, text = quiet(RunOptions(output=str(tmp_path / "p"), model=str(demo_dir), dataset=str(ROOT / "planner" /
                      "demo" / "instructions.jsonl"), plan_path=str(out / "plan.json"), rank=4, max_steps=2,
                      progress=False))
    eff = res.report["in_effect"]
    assert res.status == "completed"
    assert eff["rank"] == 4 and eff["seq_len"] == plan["settings"]["seq_len"]
    assert eff["effective_batch"] == plan["settings"]["batch_size"] * plan["settings"]["grad_accum"]
    assert eff["optim"] == plan["settings"]["optim"] and "micro-batch is planned again" in text


def test_every_option_has_help_ending_with_an_example():
    import click

    options = [p for p in run_cmd.params if isinstance(p, click.Option) and p.name != "help"]
    assert len(options) >= 20
    for opt in options:
        assert re.fullmatch(r".*\bExample: \S[^\n]*", opt.help or "", re.S), opt.name
    assert re.search(r"Example:\n(\s+qfit run [^\n]+\n)+\s*$", run_cmd.help)


def test_importing_the_command_stays_light():
    code = ("import sys, planner.cli_run, planner.train.runner, planner.data, planner.demo, planner.cli_merge, "
            "planner.train.merge, planner.train.watch, planner.train.sample; "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'pandas', 'pynvml', 'tokenizers') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- CUDA only

@pytest.mark.gpu
def test_demo_on_cuda_measures_memory_and_appends_calibration(cache, tmp_path):
    import csv

    res, text = quiet(RunOptions(output=str(tmp_path / "g"), demo=True, max_steps=20, progress=False))
    rep = res.report
    measured = rep["memory"]["measured"]
    assert res.status == "completed" and rep["device"]["kind"] == "cuda"
    assert measured["peak_allocated_bytes"] > 0 and measured["peak_reserved_bytes"] >= measured["peak_allocated_bytes"]
    assert measured["probe_peak_allocated_bytes"] > 0  # the fit probe ran at the full length
    with open(cache / "runs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == FIELDS and rows[-1]["model"] == "tiny-llama"
    assert int(rows[-1]["peak_allocated_bytes"]) == measured["peak_allocated_bytes"]
    assert "measured" in text and "predicted" in text


# --------------------------------------------------------------------------- GPU logic, with the GPU faked

@pytest.fixture
def fake_gpus(monkeypatch):
    """torch sees CUDA devices and NVML reports them; nothing is allocated (no CUDA needed)."""
    import torch

    from planner import hardware

    gib = 1024**3
    gpus = [{"index": 0, "name": "Tesla T4", "total_bytes": 15 * gib, "free_bytes": 12 * gib},
            {"index": 1, "name": "NVIDIA H200", "total_bytes": 140 * gib, "free_bytes": 139 * gib}]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(hardware, "detect_gpus", lambda: gpus)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    return gpus


def test_detect_device_plans_for_free_memory_on_one_gpu(fake_gpus, monkeypatch):
    dev = device.detect_device()
    assert dev.kind == "cuda" and dev.name == "Tesla T4"
    assert dev.spec.name == "t4" and dev.spec.memory_bytes == fake_gpus[0]["free_bytes"] < dev.total_bytes
    assert any("2 GPUs visible" in n for n in dev.notes)
    assert any("in use by other processes" in n for n in dev.notes)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # CUDA device 0 is NVML's GPU 1
    assert device.detect_device().spec.name == "h200"


def test_bf16_on_a_gpu_without_it_becomes_fp16_and_says_so(fake_gpus):
    dev = device.detect_device()
    req, _ = planning.build_request(RunOptions(output="x", compute_dtype="bf16", effective_batch=16), None, 512)
    plan, notes = planning.plan_run(load_model("qwen2.5-0.5b"), dev, req)
    assert plan.train.compute_dtype == "fp16" and any("no bf16" in n for n in notes)
    assert plan.train.effective_batch == 16 and plan.fits


def test_nothing_fits_is_a_run_error(fake_gpus):
    dev = device.detect_device()
    req, _ = planning.build_request(RunOptions(output="x"), None, 4096)
    with pytest.raises(RunError, match="does not fit: the smallest configuration"):
        planning.plan_run(load_model("llama-2-70b"), dev, req)


def test_alloc_conf_is_set_for_the_plan_and_a_user_value_is_kept(fake_gpus, monkeypatch):
    assert device.set_alloc_conf(True) is None
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert "kept" in device.set_alloc_conf(True)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


@pytest.mark.parametrize("older", [False, True])
def test_calibration_row_uses_the_harness_layout(cache, fake_gpus, older):
    """older: a runs.csv written before a column was added keeps its rows under today's header."""
    import csv

    from planner.coefficients import user_cache_dir

    if older:
        old_fields = [f for f in FIELDS if f != "uncheckpointed_layers"]
        path = user_cache_dir() / "runs.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=old_fields)
            w.writeheader()
            w.writerow({f: "" for f in old_fields} | {"run_id": "earlier", "model": "qwen2.5-0.5b"})
    dev = device.detect_device()
    req, _ = planning.build_request(RunOptions(output="x", effective_batch=8), None, 256)
    plan, _ = planning.plan_run(load_model("qwen2.5-0.5b"), dev, req)
    effect = {"compute_dtype": "fp16", "double_quant": True, "alloc_conf": "expandable_segments:True",
              "batch_size": plan.train.batch_size, "grad_accum": plan.train.grad_accum, "gradient_checkpointing": False,
              "rank": 16, "alpha": 32, "lora_dropout": 0.05, "optim": "paged_adamw_32bit"}
    report = {"in_effect": effect, "library_versions": {"torch": "2.x"}, "speed": {"padded_tokens_per_s": 1000.0}}
    progress = type("P", (), {"train_seconds": 2.0, "steps_run": 4})()
    collator = PadCollator(0)
    collator.longest = 200
    measured = {"peak_allocated_bytes": 5 * 1024**3, "peak_reserved_bytes": 6 * 1024**3}
    path = run_report.append_calibration(report, plan, dev, {"seq_len": 256}, measured, progress, collator)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == FIELDS
    assert [r["run_id"] == "earlier" for r in rows] == ([True, False] if older else [False])
    row = rows[-1]
    assert (row["model"], row["seq_len"], row["status"], row["budget_bytes"]) == ("qwen2.5-0.5b", "200", "ok", "0")
    assert int(row["peak_allocated_bytes"]) == measured["peak_allocated_bytes"] and row["gpu_name"] == "Tesla T4"


def test_fit_probe_backs_off_until_the_longest_micro_batch_fits():
    """The probe's loop on the CPU, with a model that 'runs out of memory' above micro-batch 2."""
    import types

    import torch

    from planner.specs import TrainSettings

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))
            self.shapes = []

        def forward(self, input_ids, labels):
            self.shapes.append(tuple(input_ids.shape))
            if input_ids.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (stub)")
            return types.SimpleNamespace(loss=(self.w * input_ids.float().mean()).sum())

    model, lines = Stub(), []
    start = TrainSettings(batch_size=12, grad_accum=2, seq_len=64, gradient_checkpointing=False)
    train, events, measured = session.fit_probe(model, start, 512, lines.append, device="cpu")
    assert model.shapes == [(12, 64), (6, 64), (3, 64), (1, 64)]  # always the full sequence length
    assert (train.batch_size, train.grad_accum) == (1, 24) and train.effective_batch == 24
    assert [e["phase"] for e in events] == ["probe"] * 3 and model.w.grad is None
    assert measured == {"probe_peak_allocated_bytes": 0, "probe_peak_reserved_bytes": 0}  # the CPU: nothing measured
    assert lines[-1].startswith("fit probe: micro-batch 1 x 64 tokens ran")


# --------------------------------------------------------------------------- GPU emulation (QFIT_EMULATE_GPU), faked CUDA

def test_emulated_gpu_is_what_the_plan_is_made_for(fake_gpus, monkeypatch):
    import torch

    from planner.profiles import load_gpu

    t4 = load_gpu("t4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the real card: the faked H200
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # the H200 has bf16, a T4 not
    monkeypatch.setenv("QFIT_EMULATE_GPU", "t4")
    dev = device.detect_device()
    assert dev.kind == "cuda" and dev.emulated_on == "NVIDIA H200"
    assert dev.name == "NVIDIA T4 (emulated on NVIDIA H200)"
    assert dev.spec.name == "t4" and dev.spec.memory_bytes == dev.total_bytes == dev.free_bytes == t4.memory_bytes
    assert not dev.spec.bf16 and any(n.startswith("QFIT_EMULATE_GPU: emulating NVIDIA T4") for n in dev.notes)
    req, _ = planning.build_request(RunOptions(output="x", effective_batch=16, rank=16, targets=("all-linear",)), None, 512)
    plan, _ = planning.plan_run(load_model("mistral-7b"), dev, req)
    assert plan.gpu.name == "t4" and plan.train.compute_dtype == "fp16" and plan.fits
    assert plan.memory.needs_bytes <= t4.memory_bytes
    monkeypatch.delenv("QFIT_EMULATE_GPU")
    assert device.detect_device().emulated_on == ""  # unset: the real card again


def test_unknown_emulated_gpu_is_a_one_line_run_error(monkeypatch):
    monkeypatch.setenv("QFIT_EMULATE_GPU", "t5")
    with pytest.raises(RunError) as err:
        device.detect_device()  # on any machine, CUDA or not
    msg = str(err.value)
    assert msg.startswith("QFIT_EMULATE_GPU=t5: unknown GPU 't5'") and "\n" not in msg and "qfit gpus" in msg


def test_emulation_is_ignored_without_cuda_and_says_so(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("QFIT_EMULATE_GPU", "t4")
    dev = device.detect_device()
    assert dev.kind == "cpu" and dev.emulated_on == ""
    assert any("QFIT_EMULATE_GPU=t4 ignored" in n for n in dev.notes)


def test_emulation_caps_the_allocator_to_the_card_less_context_and_paged_state(fake_gpus, monkeypatch):
    import types

    import torch

    from planner.coefficients import load_coefficients
    from planner.memory import cuda_context_bytes
    from planner.profiles import load_gpu

    gib = 1024**3
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: types.SimpleNamespace(total_memory=140 * gib))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda *a: calls.append(a))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the real card: the faked H200
    monkeypatch.setenv("QFIT_EMULATE_GPU", "t4")
    dev = device.detect_device()
    req, _ = planning.build_request(RunOptions(output="x", effective_batch=16, batch_size=4, optim="paged_adamw_32bit",
                                             rank=16, targets=("all-linear",)), None, 512)
    plan, _ = planning.plan_run(load_model("mistral-7b"), dev, req)
    lines = []
    emu = device.cap_for_emulation(dev, plan, lines.append)
    t4 = load_gpu("t4")
    context = cuda_context_bytes(load_coefficients("t4"))
    assert plan.memory.paged_optimizer_state > 0  # paged state lives outside torch's allocator: not under the cap
    budget = t4.memory_bytes - context - plan.memory.paged_optimizer_state
    assert emu["budget_bytes"] == budget and isinstance(budget, int)
    assert calls == [(budget / (140 * gib), 0)]
    assert emu["emulated_on"] == "NVIDIA H200" and emu["real_total_bytes"] == 140 * gib and emu["gpu"] == "t4"
    assert emu["cuda_context_bytes"] == context and emu["memory_bytes"] == t4.memory_bytes
    assert lines[0].startswith("emulation: torch's allocator capped at")
    assert device.emulation_budget(t4, plan).items() <= emu.items()  # the pure part, recorded as computed

    monkeypatch.delenv("QFIT_EMULATE_GPU")
    calls.clear()
    assert device.cap_for_emulation(device.detect_device(), plan, lines.append) == {} and calls == []

    monkeypatch.setenv("QFIT_EMULATE_GPU", "h200")  # a bigger card than the real one
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: types.SimpleNamespace(total_memory=15 * gib))
    with pytest.raises(RunError, match="cannot emulate"):
        device.cap_for_emulation(device.detect_device(), plan, lines.append)
    assert calls == []


def test_calibration_row_of_an_emulated_run_records_its_budget(cache, fake_gpus):
    import csv

    dev = device.detect_device()
    req, _ = planning.build_request(RunOptions(output="x", effective_batch=8), None, 256)
    plan, _ = planning.plan_run(load_model("qwen2.5-0.5b"), dev, req)
    effect = {"compute_dtype": "fp16", "double_quant": True, "alloc_conf": "", "batch_size": plan.train.batch_size,
              "grad_accum": plan.train.grad_accum, "gradient_checkpointing": False, "rank": 16, "alpha": 32,
              "lora_dropout": 0.05, "optim": "adamw_torch"}
    report = {"in_effect": effect, "library_versions": {}, "speed": {"padded_tokens_per_s": 1.0},
              "device": {"emulation": {"budget_bytes": 12345678}}}
    progress = type("P", (), {"train_seconds": 1.0, "steps_run": 1})()
    measured = {"peak_allocated_bytes": 5, "peak_reserved_bytes": 6}
    path = run_report.append_calibration(report, plan, dev, {"seq_len": 256}, measured, progress, PadCollator(0))
    with open(path, newline="") as fh:
        assert list(csv.DictReader(fh))[-1]["budget_bytes"] == "12345678"


# --------------------------------------------------------------------------- --padding

def test_pad_collator_pads_to_the_longest_row_or_to_max_length():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9]}]
    longest, fixed = PadCollator(0), PadCollator(0, pad_to=8)
    a, b = longest(rows), fixed(rows)
    assert tuple(a["input_ids"].shape) == (2, 5) and tuple(b["input_ids"].shape) == (2, 8)
    for batch in (a, b):
        assert int(batch["attention_mask"].sum()) == 8  # real tokens: the same either way
        assert batch["input_ids"][0, 3:].eq(0).all() and batch["labels"][0, 3:].eq(-100).all()
        assert batch["labels"][0].tolist()[:3] == [-100, 6, 7]
    assert (longest.tokens, longest.padded_tokens, longest.longest) == (8, 10, 5)
    assert (fixed.tokens, fixed.padded_tokens, fixed.longest) == (8, 16, 8)


def test_default_run_packs_short_rows_and_records_it(demo_run):
    _, out, report, _ = demo_run
    assert report["in_effect"]["padding"] == "packed" and report["device"]["emulation"] is None
    assert json.loads((out / "run_config.json").read_text())["packing"] is True
    speed = report["speed"]
    assert 0 < speed["train_tokens"] < speed["train_padded_tokens"]  # the report states the tokens it timed
    packed = report["data"]["packing"]
    assert packed["fill"] > 0.85 and packed["rows"] == report["data"]["examples"]  # every example, in fuller rows
    assert speed["train_tokens"] / speed["train_padded_tokens"] > 0.85  # little padding computed
    assert report["memory"]["longest_micro_batch_tokens"] == report["data"]["seq_len"]  # packed rows: one shape


def test_no_packing_pads_to_the_longest_row_and_plans_for_it(cache, tmp_path):
    out = tmp_path / "run"
    done, text = quiet(RunOptions(output=str(out), demo=True, packing=False, max_steps=3, effective_batch=4,
                                  save_steps=100, progress=False))
    rep = done.report
    assert done.status == "completed" and rep["in_effect"]["padding"] == "longest"
    assert "no packing: micro-batches are padded to their longest row" in text
    longest = rep["data"]["lengths"]["max"]
    assert rep["planned"]["seq_len"] == min(longest, rep["data"]["seq_len"])  # the worst real micro-batch, not the rounded seq
    assert rep["memory"]["longest_micro_batch_tokens"] <= longest
    assert rep["speed"]["train_tokens"] < rep["speed"]["train_padded_tokens"]


def test_padding_max_length_reaches_the_collator_and_resume_keeps_it(cache, tmp_path):
    out = tmp_path / "run"
    opts = RunOptions(output=str(out), demo=True, padding="max-length", max_steps=4, effective_batch=4,
                      save_steps=100, progress=False)
    first, text = quiet(opts, callbacks=(_signal_at(2, signal.SIGTERM),))
    assert first.status == "interrupted" and "every row is padded to" in text
    assert json.loads((out / "run_config.json").read_text())["padding"] == "max-length"

    res = CliRunner().invoke(run_cmd, ["--resume", str(out), "--padding", "longest"])
    assert res.exit_code == 2 and "drop --padding" in res.stderr  # resume keeps the run's padding
    done, text = quiet(RunOptions(output=str(out), resume=True, progress=False))
    rep = done.report
    assert done.status == "completed" and rep["steps"]["completed"] == 4
    seq = rep["data"]["seq_len"]
    assert rep["in_effect"]["padding"] == "max-length" and rep["memory"]["longest_micro_batch_tokens"] == seq
    assert "every row is padded to" in text
    # every micro-batch is rows x seq_len (the collator also counts the dataloader's one look-ahead micro-batch)
    assert rep["speed"]["train_padded_tokens"] % seq == 0 and rep["speed"]["train_padded_tokens"] >= 2 * 4 * seq
    assert rep["speed"]["train_tokens"] < rep["speed"]["train_padded_tokens"] / 2


def test_padding_option_on_the_command_line(cache, tmp_path, no_model_load):
    import click

    (opt,) = [p for p in run_cmd.params if p.name == "padding"]
    assert isinstance(opt.type, click.Choice) and tuple(opt.type.choices) == PADDINGS
    res = CliRunner().invoke(run_cmd, ["--demo", "--output", str(tmp_path / "o"), "--padding", "max_length"])
    assert res.exit_code == 2 and "Invalid value for '--padding'" in res.stderr
    with pytest.raises(RunError, match="--padding must be one of longest, max-length"):
        RunOptions(output="x", padding="max")


# --------------------------------------------------------------------------- validation, memory watch, options

def test_demo_holds_back_a_validation_split_and_records_its_loss(demo_run):
    import importlib.util

    res, out, report, _ = demo_run
    ev = report["eval"]
    assert ev["rows"] == report["data"]["eval"]["rows"] == 12  # 5% of the demo's 240 rows
    assert [h["step"] for h in ev["history"]] == list(range(12, 121, 12))  # every tenth of the run, the last at the end
    assert ev["final"] == ev["history"][-1]["eval_loss"] < ev["history"][0]["eval_loss"]
    assert ev["best"]["eval_loss"] == min(h["eval_loss"] for h in ev["history"])
    assert ev["batch_size"] == report["in_effect"]["batch_size"] and "no_grad" in ev["memory_note"] and ev["packing"]
    assert "validation: 12 rows" in res.output and "validation loss: " in res.output
    # evaluation batches come from their own collator: the training counts are the training rows only
    eff = report["in_effect"]
    packed, b = report["data"]["packing"]["packed_rows"], eff["batch_size"]
    assert eff["grad_accum"] == 1
    sizes = [min(b, packed - i) for i in range(0, packed, b)] * 120  # micro-batches of each pass over the rows
    assert report["speed"]["train_padded_tokens"] == sum(sizes[:120]) * eff["seq_len"]
    tb = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    assert report["training"] == {"scheduler": "cosine", "warmup": 0.05, "seed": 42, "report_to": tb}
    config = json.loads((out / "run_config.json").read_text())
    assert config["eval"] == {"dataset": None, "fraction": None, "steps": 12, "rows": 12}


def test_demo_records_memory_per_logging_interval(demo_run):
    _, _, report, _ = demo_run
    mem = report["memory"]
    assert [p["step"] for p in mem["per_interval"]] == list(range(1, 121))  # logged every step (120 // 500 -> 1)
    assert mem["leak_from_step"] is None and report["warnings"] == []
    if not cuda():
        assert all(p["peak_allocated_bytes"] is None and p["allocated_bytes"] is None for p in mem["per_interval"])
        assert "null" in mem["per_interval_note"]
    else:
        assert all(p["allocated_bytes"] > 0 for p in mem["per_interval"])
        assert mem["measured"]["peak_allocated_bytes"] >= max(p["peak_allocated_bytes"] for p in mem["per_interval"])


def test_eval_dataset_scheduler_seed_warmup_and_sample_prompt(cache, tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text("".join((ROOT / "planner" / "demo" / "instructions.jsonl").read_text().splitlines(True)[:5]))
    out = tmp_path / "o"
    res = CliRunner().invoke(run_cmd, ["--demo", "--output", str(out), "--max-steps", "5", "--eval-dataset", str(val),
                                       "--eval-steps", "2", "--scheduler", "linear", "--seed", "7", "--warmup", "2",
                                       "--report-to", "none", "--sample-prompt", "Name three colors."],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "run_report.json").read_text())
    assert [h["step"] for h in report["eval"]["history"]] == [2, 4, 5]  # every 2 steps, and at the end
    assert report["data"]["eval"]["rows"] == 5 and report["data"]["examples"] == 240  # nothing held back
    assert report["in_effect"]["lr_scheduler"].endswith("(linear)") and report["in_effect"]["warmup_steps"] == 2
    assert report["training"] == {"scheduler": "linear", "warmup": 2.0, "seed": 7, "report_to": "none"}
    sample = report["sample"]
    assert sample["prompt"] == "Name three colors." and sample["max_new_tokens"] == 40 and sample["decoding"] == "greedy"
    assert "### Instruction:\nName three colors." in sample["formatted_prompt"]  # the demo's Alpaca template
    assert isinstance(sample["completion"], str) and "sample: 'Name three colors.' -> " in res.output
    assert json.loads((out / "run_config.json").read_text())["eval"]["dataset"] == str(val.resolve())


def test_constant_scheduler_keeps_the_warmup_and_eval_can_be_turned_off(cache, tmp_path):
    res, _ = quiet(RunOptions(output=str(tmp_path / "o"), demo=True, max_steps=2, scheduler="constant",
                              eval_fraction=0.0, progress=False))
    assert res.report["in_effect"]["lr_scheduler"].endswith("(constant_with_warmup)")
    assert res.report["eval"] is None and res.report["data"]["eval"] is None


def test_eval_split_size_and_split_are_deterministic():
    from planner.train.options import eval_split_size

    assert eval_split_size(99, None) == 0  # too few rows to spare any
    assert eval_split_size(240, None) == 12 and eval_split_size(100_000, None) == 200  # 5%, capped
    assert eval_split_size(240, 0) == 0 and eval_split_size(240, 0.1) == 24 and eval_split_size(3, 0.01) == 1
    with pytest.raises(RunError, match="leaves none to train on"):
        eval_split_size(1, 0.4)
    train, val = runner.split_eval(list(range(50)), 5, seed=3)
    assert (train, val) == runner.split_eval(list(range(50)), 5, seed=3)  # --resume gets the same split
    assert sorted(train + val) == list(range(50)) and len(val) == 5 and val == sorted(val)


def test_report_to_an_integration_that_is_not_installed_is_a_run_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "wandb")
                        else real(name, *a))
    assert runner.resolve_report_to(None) == "none" and runner.resolve_report_to("none") == "none"
    for name in ("tensorboard", "wandb"):
        with pytest.raises(RunError, match=f"--report-to {name}: {name} is not installed"):
            runner.resolve_report_to(name)


# --------------------------------------------------------------------------- qfit merge

def test_merged_model_equals_the_16bit_base_with_the_adapter(demo_run, demo_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from planner.cli import cli

    _, out, _, _ = demo_run
    merged_dir = tmp_path / "merged"
    res = CliRunner().invoke(cli, ["merge", str(out), "--output", str(merged_dir)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "memory: base " in res.output and "merged in " in res.output
    assert not (merged_dir / "adapter_config.json").exists() and (merged_dir / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    ids = tok(["Name three colors.", "Below is an instruction that describes a task.", "hello world"],
              return_tensors="pt", padding=True)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.bfloat16).eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(demo_dir), dtype=torch.bfloat16),
                                           str(out)).eval()
    with torch.no_grad():
        a = merged(**ids).logits.float()
        b = peft_model(**ids).logits.float()
        with peft_model.disable_adapter():
            base = peft_model(**ids).logits.float()
    # bf16 keeps 8 significant bits: W + BA rounded once per weight, against W x + B(A x) rounded per product
    diff, effect = (a - b).abs(), (b - base).abs()
    assert diff.max().item() < 0.05 * b.abs().max().item(), (diff.max().item(), b.abs().max().item())
    assert diff.mean().item() < 0.05 * effect.mean().item(), (diff.mean().item(), effect.mean().item())


def test_merge_refuses_what_does_not_fit_and_what_is_not_a_finished_run(demo_run, tmp_path, monkeypatch):
    from planner.cli import cli
    from planner.train import merge

    _, out, _, _ = demo_run
    monkeypatch.setattr(merge, "available_memory", lambda: ("cpu", 1000, 2000))
    res = CliRunner().invoke(cli, ["merge", str(out), "--output", str(tmp_path / "m")])
    assert res.exit_code == 2 and res.stderr.strip().splitlines()[-1].startswith("error: merging needs ")
    assert not (tmp_path / "m").exists()
    unfinished = tmp_path / "run"
    unfinished.mkdir()
    (unfinished / "run_config.json").write_text("{}")
    for args, expect in ((["merge", str(unfinished), "--output", str(tmp_path / "m")], "has no adapter yet"),
                         (["merge", str(tmp_path), "--output", str(tmp_path / "m")], "is not a qfit run directory"),
                         (["merge", str(out), "--output", str(out)], "--output must be a new directory"),
                         (["merge", str(out), "--output", str(tmp_path / "m"), "--dtype", "fp32"],
                          "Invalid value for '--dtype'")):
        res = CliRunner().invoke(cli, args)
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and expect in lines[0], res.output
    spec = load_model("mistral-7b")
    need = merge.merge_memory(spec, "bf16", 0)
    assert need.base_weights_bytes == 2 * spec.total_param_count
    assert need.needs_bytes == need.base_weights_bytes + need.layer_bytes
    assert 0 < need.layer_bytes < need.base_weights_bytes / spec.num_hidden_layers * 1.1


def test_merge_help_ends_with_an_example():
    from planner.cli import cli
    from planner.cli_merge import merge_cmd

    res = CliRunner().invoke(cli, ["--help"])
    assert "merge" in res.output
    res = CliRunner().invoke(cli, ["merge", "--help"])
    assert res.exit_code == 0 and "qfit merge runs/m7 --output runs/m7-merged" in res.output
    assert re.search(r"Example:\n\s+qfit merge runs/m7 --output runs/m7-merged\s*$", merge_cmd.help)
    for opt in merge_cmd.params:
        if opt.name != "run_dir":
            assert re.fullmatch(r".*\bExample: \S[^\n]*", opt.help or "", re.S), opt.name
