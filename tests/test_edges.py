"""Edges of the issue: bare capacities, one-line errors, Hugging Face ids from the local cache, the fit map, names,
exports. Through click's CliRunner; nothing touches the network."""

import json

import pytest
from click.testing import CliRunner

from planner.cli import cli
from planner.coefficients import load_coefficients
from planner.profiles import load_gpu, load_model
from planner.search import Request, search


def run(*args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


def one_line_error(r, *words):
    """exit 2, one line, no traceback, naming each of `words`."""
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# =========================================================================== 1. a GPU given as a capacity

@pytest.mark.parametrize(("capacity", "proxy"), [("24GiB", "NVIDIA L4"), ("16GB", "NVIDIA T4")])
def test_capacity_borrows_the_speed_of_its_memory_class(capacity, proxy):
    gpu = load_gpu(capacity)
    assert gpu.speed_proxy == proxy and gpu.bandwidth_gb_s > 0 and gpu.name == capacity
    r = run("plan", "mistral-7b", "--gpu", capacity, "--json")
    doc = json.loads(r.output)
    assert doc["tokens_per_s"] > 0
    assert f"speed estimated as for {proxy} (same memory class)" in doc["notes"]
    assert doc["settings"]["batch_size"] > 1  # not the slowest plan
    text = run("plan", "mistral-7b", "--gpu", capacity).output
    assert text.count(f"speed estimated as for {proxy}") == 1


def test_capacity_outside_every_memory_class_has_no_speed_but_the_fastest_settings():
    r = run("plan", "mistral-7b", "--gpu", "5000GiB", "--json")
    doc = json.loads(r.output)
    assert doc["tokens_per_s"] is None and all(a["tokens_per_s"] is None for a in doc["alternatives"])
    assert any(n.startswith("no speed estimate") for n in doc["notes"])
    s = doc["settings"]
    assert s["batch_size"] == 16 and s["grad_accum"] == 1 and s["gradient_checkpointing"] is False


def test_without_speed_the_ranking_prefers_partial_checkpointing_and_larger_micro_batches():
    coeffs = load_coefficients("36GiB")
    gpu = load_gpu("36GiB")  # no catalog card within 10% (32 and 40 GiB are farther)
    assert not gpu.speed_proxy
    best = search(load_model("mistral-7b"), gpu, Request(), coeffs).best
    assert best.tokens_per_s == 0.0
    assert best.train.batch_size > 1 or not best.train.gradient_checkpointing or best.train.uncheckpointed_layers > 0


def test_compare_gives_a_capacity_hours_from_its_memory_class():
    r = run("compare", "mistral-7b", "--gpus", "24GiB,5000GiB", "--tokens", "1M", "--json")
    doc = json.loads(r.output)
    rows = {o["gpu"]: o for o in doc}
    assert rows["24GiB"]["tokens_per_s"] > 0 and rows["24GiB"]["hours"] > 0 and rows["24GiB"]["cost_usd"] is None
    assert rows["5000GiB"]["tokens_per_s"] is None and rows["5000GiB"]["hours"] is None


def test_qfit_run_plans_an_uncatalogued_gpu_like_its_memory_class(monkeypatch):
    torch = pytest.importorskip("torch")
    from planner import hardware
    from planner.train import device

    gib = 1024**3
    gpus = [{"index": 0, "name": "NVIDIA RTX 4500 Ada", "total_bytes": 24 * gib, "free_bytes": 23 * gib}]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 9))
    monkeypatch.setattr(hardware, "detect_gpus", lambda: gpus)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("QFIT_EMULATE_GPU", raising=False)
    dev = device.detect_device()
    assert dev.spec.memory_bytes == 23 * gib and dev.spec.speed_proxy == "NVIDIA L4"
    assert dev.spec.compute_capability == "8.9" and dev.spec.display_name == "NVIDIA RTX 4500 Ada"
    assert any("speed estimated as for NVIDIA L4" in n for n in dev.notes)


# =========================================================================== 2. no tracebacks

@pytest.mark.parametrize("flag", ["--save", "--fit-map"])
def test_plan_output_into_a_missing_folder_is_one_line_before_the_work(tmp_path, flag):
    target = tmp_path / "missing" / ("p.png" if flag == "--fit-map" else "p.json")
    r = run("plan", "mistral-7b", "--gpu", "t4", flag, target)
    one_line_error(r, flag, str(tmp_path / "missing"), "mkdir")
    assert not (tmp_path / "missing").exists()


def test_profile_out_into_a_missing_folder(tmp_path):
    pytest.importorskip("transformers")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(_llama_config()))
    r = run("profile", cfg, "--out", tmp_path / "nope" / "m.toml")
    one_line_error(r, "--out", "does not exist")


@pytest.mark.parametrize("content", ["[]", "{}", '{"values": []}', '{"values": {"a": [1]}}', "{not json", "\x00\xff\xfe"])
def test_coefficients_file_that_holds_no_coefficients(tmp_path, content):
    path = tmp_path / "c.json"
    path.write_bytes(content.encode("latin-1"))
    r = run("plan", "mistral-7b", "--gpu", "t4", "--coefficients", path)
    one_line_error(r, str(path), "qfit calibrate")


def test_calibrate_refit_with_a_csv_of_other_columns(tmp_path):
    csv_path = tmp_path / "other.csv"
    csv_path.write_text("a,b\n1,2\n")
    one_line_error(run("calibrate", "--refit", "--runs", csv_path), "--runs", str(csv_path), "missing columns")


def test_calibrate_refit_finds_the_package_runs_from_any_folder(tmp_path, monkeypatch):
    from planner import refit
    from planner.coefficients import CALIBRATION_DIR

    seen = {}
    monkeypatch.setattr(refit, "refit_and_report", lambda paths, out, report: seen.setdefault("paths", paths) and "ok")
    monkeypatch.chdir(tmp_path)
    r = run("calibrate", "--refit")
    assert r.exit_code == 0, r.output
    assert seen["paths"] and all(p.startswith(str(CALIBRATION_DIR / "runs")) for p in seen["paths"])


@pytest.mark.parametrize(("key", "value"), [("batch_size", "4"), ("seq_len", 0.5), ("rank", None), ("targets", 3)])
def test_plan_file_with_a_wrongly_typed_setting(tmp_path, key, value):
    pytest.importorskip("torch")
    from planner.errors import QfitError
    from planner.train.planning import read_plan_file

    r = run("plan", "qwen2.5-0.5b", "--gpu", "t4", "--json")
    doc = json.loads(r.output)
    doc["settings"][key] = value
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(QfitError, match=f"{path}.*settings.{key}"):
        read_plan_file(str(path))


def _llama_config() -> dict:
    from planner.profiles import PROFILES_DIR, _load_toml

    return dict(_load_toml(PROFILES_DIR / "models" / "llama-3.2-1b.toml")["config"])


# =========================================================================== 5. smaller edges

def test_binary_config_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x00")
    one_line_error(run("plan", path, "--gpu", "t4"), str(path), "binary")


@pytest.mark.parametrize("gpu", ["-5GB", "0GiB", "-1GiB"])
def test_negative_and_zero_capacity_say_positive(gpu):
    one_line_error(run("plan", "mistral-7b", "--gpu", gpu), "must be positive")


def test_rank_above_the_hidden_size_is_an_error():
    one_line_error(run("plan", "qwen2.5-0.5b", "--gpu", "t4", "--rank", "2048"), "--rank 2048", "hidden size (896)")


def test_profile_of_a_near_empty_config_names_the_missing_fields(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    line = one_line_error(run("profile", path), "intermediate_size", "num_hidden_layers", "vocab_size",
                          "max_position_embeddings")
    assert "hidden_size," not in line


def test_exact_says_what_it_does_before_the_long_trace(monkeypatch):
    pytest.importorskip("torch")
    from planner import exact
    from planner.errors import QfitError

    def stop(*a, **k):
        raise QfitError("stopped by the test")

    monkeypatch.setattr(exact, "trace_step", stop)
    r = CliRunner().invoke(cli, ["plan", "tiny-llama", "--gpu", "t4", "--exact"])
    assert r.exit_code == 2
    assert r.stderr.index("--exact: tracing the recommended step") < r.stderr.index("stopped by the test")


# =========================================================================== 3. Hugging Face ids from the local cache

def _fake_hub(tmp_path, monkeypatch, repo_id="acme/tiny-lm", config=None, ref=True):
    """A Hugging Face cache laid out as huggingface_hub writes it; HF_HUB_CACHE points at it; offline."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config or _llama_config()))
    if ref:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snap / "config.json"


@pytest.mark.parametrize("ref", [True, False])
def test_plan_a_hugging_face_id_from_the_local_cache(tmp_path, monkeypatch, ref):
    _fake_hub(tmp_path, monkeypatch, ref=ref)
    r = run("plan", "acme/tiny-lm", "--gpu", "t4", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["model"] == "acme/tiny-lm" and doc["fits"]
    llama = json.loads(run("plan", "llama-3.2-1b", "--gpu", "t4", "--json").output)
    assert doc["params"] == llama["params"] and doc["memory"]["needs_bytes"] == llama["memory"]["needs_bytes"]
    r = run("compare", "acme/tiny-lm", "--gpus", "t4,l4", "--tokens", "1M", "--json")
    assert r.exit_code == 0 and {o["gpu"] for o in json.loads(r.output)} == {"t4", "l4"}


def test_hf_home_is_honoured(tmp_path, monkeypatch):
    from planner.hf_cache import hub_cache_dir

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hub_cache_dir() == tmp_path / "hfhome" / "hub"


def test_an_uncached_id_offline_fails_fast_in_one_line(tmp_path, monkeypatch):
    import time

    _fake_hub(tmp_path, monkeypatch)
    start = time.perf_counter()
    r = run("plan", "acme/not-cached", "--gpu", "t4")
    assert time.perf_counter() - start < 2.0
    one_line_error(r, "acme/not-cached", "HF_HUB_OFFLINE", "qfit profile")
    r = run("compare", "acme/not-cached", "--gpus", "t4", "--tokens", "1M", "--json")
    assert r.exit_code == 2 and "qfit profile" in json.loads(r.output)["error"]


def test_plan_of_a_cached_id_stays_light(tmp_path, monkeypatch):
    import subprocess
    import sys

    _fake_hub(tmp_path, monkeypatch)
    code = ("import sys; from planner.cli import cli\n"
            "try:\n    cli.main(['plan', 'acme/tiny-lm', '--gpu', 't4', '--json'])\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('huggingface_hub', 'torch', 'transformers') if m in sys.modules], file=sys.stderr)")
    import os

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stderr.strip().splitlines()[-1] == "[]", out.stderr


def test_profile_of_a_cached_id(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    _fake_hub(tmp_path, monkeypatch)
    r = run("profile", "acme/tiny-lm")
    assert r.exit_code == 0, r.output
    assert 'hf_id = "acme/tiny-lm"' in r.output


# =========================================================================== 4. the fit map agrees with the plan

def test_fit_map_cells_share_the_recommended_plan_settings_and_mark_it():
    from planner.fitmap import fit_map, legend

    coeffs = load_coefficients("t4")
    model, gpu = load_model("mistral-7b"), load_gpu("t4")
    best = search(model, gpu, Request(), coeffs).best
    grid = fit_map(model, gpu, Request(), coeffs, recommended=best)
    cells = [c for row in grid for c in row if c.shown]
    assert {c.shown.train.optim for c in cells} == {best.train.optim}  # no silent switch to an 8-bit optimizer
    assert {c.shown.lora for c in cells} == {best.lora}
    assert {c.shown.train.compute_dtype for c in cells} == {best.train.compute_dtype}
    marked = [c for row in grid for c in row if c.recommended]
    assert len(marked) == 1
    assert (marked[0].batch_size, marked[0].seq_len) == (best.train.batch_size, best.train.seq_len)
    assert marked[0].fits  # the plan's own cell fits on the map
    text = legend(grid, best)
    assert any("recommended plan" in line for line in text)
    assert text[-1] == f"every cell: LoRA r{best.lora.rank} {','.join(best.lora.targets)}, {best.train.optim}, fp16, packed"


def test_fit_map_axes_gain_the_recommended_sequence_length():
    from planner.fitmap import fit_map

    coeffs = load_coefficients("l4")
    model, gpu = load_model("qwen2.5-0.5b"), load_gpu("l4")
    best = search(model, gpu, Request(seq_len=768), coeffs).best
    grid = fit_map(model, gpu, Request(seq_len=768), coeffs, recommended=best)
    assert 768 in [c.seq_len for c in grid[0]]
    assert sum(c.recommended for row in grid for c in row) == 1


def test_fit_map_png_marks_the_recommended_cell(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "map.png"
    r = run("plan", "mistral-7b", "--gpu", "t4", "--fit-map", out)
    assert r.exit_code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# =========================================================================== 6. names

def test_compare_takes_gpu_as_a_comma_list_and_gpus_still_works():
    new = run("compare", "mistral-7b", "--gpu", "t4,l4", "--tokens", "1M", "--json")
    old = run("compare", "mistral-7b", "--gpus", "t4,l4", "--tokens", "1M", "--json")
    assert new.exit_code == old.exit_code == 0 and json.loads(new.output) == json.loads(old.output)
    help_text = run("compare", "--help").output
    assert "--gpu LIST" in help_text and "--gpus" not in help_text


def test_plan_plot_is_the_fit_map_and_fit_map_is_hidden(tmp_path):
    help_text = run("plan", "--help").output
    assert "--plot FILE.png" in help_text and "--fit-map" not in help_text
    for flag in ("--plot", "--fit-map"):  # both check the folder first, under the name given
        one_line_error(run("plan", "mistral-7b", "--gpu", "t4", flag, tmp_path / "no" / "m.png"), flag)


def test_compare_takes_the_plan_options():
    r = run("compare", "mistral-7b", "--gpu", "t4,l4", "--tokens", "1M", "--rank", "8", "--targets", "attn",
            "--batch-size", "2", "--seq-len", "1024", "--optim", "paged_adamw_8bit", "--json")
    assert r.exit_code == 0, r.output
    for o in json.loads(r.output):
        s = o["settings"]
        assert (s["rank"], s["batch_size"], s["seq_len"], s["optim"]) == (8, 2, 1024, "paged_adamw_8bit")
    one_line_error(run("compare", "mistral-7b", "--tokens", "1M", "--seq-len", "auto"), "--seq-len auto")
    one_line_error(run("compare", "mistral-7b", "--tokens", "1M", "--rank", "0"), "--rank")


# =========================================================================== 7. --export trl|axolotl|accelerate

def _exported(tmp_path, fmt, gpu="l4", name="cfg.yaml"):
    path = tmp_path / name
    r = run("plan", "mistral-7b", "--gpu", gpu, "--export", fmt, path)
    assert r.exit_code == 0, r.output
    plan = json.loads(run("plan", "mistral-7b", "--gpu", gpu, "--json").output)["settings"]
    return path, plan


@pytest.mark.parametrize("name", ["trl.yaml", "trl.json"])
def test_trl_export_loads_into_training_arguments_lora_and_bnb(tmp_path, name):
    yaml = pytest.importorskip("yaml")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    path, s = _exported(tmp_path, "trl", name=name)
    doc = json.loads(path.read_text()) if name.endswith(".json") else yaml.safe_load(path.read_text())
    ta_fields = set(transformers.TrainingArguments.__dataclass_fields__)
    sft_only = {"max_length", "packing"}
    model_keys = {"model_name_or_path", "dtype", "load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant",
                  "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"}
    assert set(doc) == (set(doc) & ta_fields) | sft_only | model_keys
    args = transformers.TrainingArguments(**{k: v for k, v in doc.items() if k in ta_fields}, use_cpu=True)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (s["batch_size"], s["grad_accum"])
    assert args.gradient_checkpointing == s["gradient_checkpointing"] and args.optim.value == s["optim"]
    assert args.bf16 == (s["compute_dtype"] == "bf16") and args.fp16 == (s["compute_dtype"] == "fp16")
    assert (doc["max_length"], doc["packing"]) == (s["seq_len"], s["packing"])
    lora = peft.LoraConfig(r=doc["lora_r"], lora_alpha=doc["lora_alpha"], lora_dropout=doc["lora_dropout"],
                           target_modules=doc["lora_target_modules"], task_type="CAUSAL_LM")
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (s["rank"], s["alpha"], s["lora_dropout"])
    assert set(lora.target_modules) == set(s["targets"])
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=doc["load_in_4bit"], bnb_4bit_quant_type=doc["bnb_4bit_quant_type"],
                                          bnb_4bit_use_double_quant=doc["use_bnb_nested_quant"],
                                          bnb_4bit_compute_dtype=doc["dtype"])
    assert bnb.load_in_4bit and bnb.bnb_4bit_use_double_quant == s["double_quant"]


def test_trl_export_parses_as_trl_sft_config(tmp_path):
    trl = pytest.importorskip("trl")
    from transformers import HfArgumentParser

    path, s = _exported(tmp_path, "trl", name="trl.json")
    doc = json.loads(path.read_text())
    sft, model = HfArgumentParser((trl.SFTConfig, trl.ModelConfig)).parse_dict({**doc, "use_cpu": True})
    assert (sft.per_device_train_batch_size, sft.max_length, model.lora_r) == (s["batch_size"], s["seq_len"], s["rank"])


def test_axolotl_export_parses_and_matches(tmp_path):
    yaml = pytest.importorskip("yaml")
    path, s = _exported(tmp_path, "axolotl", gpu="t4")
    doc = yaml.safe_load(path.read_text())
    assert doc["load_in_4bit"] is True and doc["adapter"] == "qlora"
    assert (doc["lora_r"], doc["lora_alpha"], doc["lora_dropout"]) == (s["rank"], s["alpha"], s["lora_dropout"])
    assert doc["lora_target_modules"] == s["targets"]
    assert (doc["sequence_len"], doc["sample_packing"]) == (s["seq_len"], s["packing"])
    assert (doc["micro_batch_size"], doc["gradient_accumulation_steps"]) == (s["batch_size"], s["grad_accum"])
    assert doc["gradient_checkpointing"] == s["gradient_checkpointing"] and doc["optimizer"] == s["optim"]
    assert (doc["bf16"], doc["fp16"]) == (False, True)  # T4: fp16
    assert "checkpoints every layer" in path.read_text()  # the plan's partial checkpointing is said, not hidden


def test_accelerate_export_loads_as_an_accelerate_config(tmp_path):
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import ClusterConfig

    path, s = _exported(tmp_path, "accelerate")
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.mixed_precision == s["compute_dtype"] and cfg.num_processes == 1


def test_export_errors_are_one_line(tmp_path):
    one_line_error(run("plan", "mistral-7b", "--gpu", "t4", "--export", "axolotl", tmp_path / "a.json"), "YAML")
    one_line_error(run("plan", "mistral-7b", "--gpu", "t4", "--export", "trl", tmp_path / "no" / "t.yaml"),
                   "--export trl", "does not exist")
    r = run("plan", "llama-3.1-70b", "--gpu", "t4", "--export", "trl", tmp_path / "t.yaml")
    assert r.exit_code == 2 and "nothing fits" in r.output and not (tmp_path / "t.yaml").exists()


def test_compare_text_says_which_card_lends_a_capacity_its_speed():
    out = run("compare", "mistral-7b", "--gpu", "24GiB,5000GiB,t4", "--tokens", "1M").output
    assert "24GiB: speed estimated as for NVIDIA L4 (same memory class)" in out
    assert "5000GiB: no speed estimate" in out


def test_plan_gpu_auto_on_an_uncatalogued_gpu_uses_its_memory_class(monkeypatch):
    from planner import hardware

    monkeypatch.setattr(hardware, "detect_gpu", lambda: ("NVIDIA RTX 4500 Ada", 24 * 1024**3))
    r = run("plan", "mistral-7b", "--gpu", "auto")
    assert r.exit_code == 0, r.output
    assert "on NVIDIA RTX 4500 Ada (24.00 GiB)" in r.output
    assert "speed estimated as for NVIDIA L4 (same memory class)" in r.output
