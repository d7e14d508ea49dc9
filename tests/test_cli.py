"""The CLI through click's CliRunner: help for every command, exit codes, JSON schema, golden text."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from update_goldens import PLAN_ARGS, PLAN_GOLDEN

from planner.cli import cli

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "pandas", "numpy", "pynvml", "matplotlib", "accelerate")


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command", cli.list_commands(None))
def test_every_command_has_help_with_an_example(command):
    r = run(command, "--help")
    assert r.exit_code == 0
    assert "Example" in r.output


def test_plan_golden_text():
    """Compares only; after a deliberate change: python -m tests.update_goldens"""
    r = run(*PLAN_ARGS)
    assert r.exit_code == 0
    assert r.output == PLAN_GOLDEN.read_text()


def test_plan_text_rows_add_up():
    r = run("plan", "mistral-7b", "--gpu", "t4")
    lines = r.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Memory at peak"))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("---"):
            break
        rows.append(float(line.split()[-1] if not line.rstrip().endswith("term") else line.split()[-4]))
    total = next(line for line in lines if line.startswith("device used"))
    assert abs(sum(rows) - float(total.split()[-1])) <= 0.01 * len(rows)


def test_plan_json_schema():
    r = run("plan", "mistral-7b", "--gpu", "t4", "--json")
    doc = json.loads(r.output)
    assert set(doc) >= {"model", "gpu", "settings", "params", "memory", "fits", "alternatives"}
    assert set(doc["settings"]) >= {"batch_size", "grad_accum", "seq_len", "rank", "alpha", "lora_dropout", "targets",
                                    "gradient_checkpointing", "optim", "compute_dtype", "double_quant"}
    assert set(doc["params"]) == {"total", "trainable", "quantized"}
    assert set(doc["memory"]) >= {"components", "peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes",
                                  "gpu_capacity_bytes", "required_bytes"}
    mem = doc["memory"]
    assert all(isinstance(v, int) for v in mem["components"].values())
    assert mem["peak_allocated_bytes"] <= mem["required_bytes"] <= mem["peak_reserved_bytes"] + 2**30
    assert doc["fits"] is True and doc["settings"]["compute_dtype"] == "fp16"  # T4: no bf16
    assert doc["params"]["total"] == 7_241_732_096
    assert isinstance(doc["settings"]["targets"], list)


def test_user_values_are_respected():
    doc = json.loads(run("plan", "mistral-7b", "--gpu", "a100-80gb", "--batch-size", "2", "--grad-accum", "4",
                         "--rank", "8", "--targets", "q_proj,v_proj", "--no-gradient-checkpointing",
                         "--optim", "adamw_torch", "--seq-len", "1024", "--json").output)
    s = doc["settings"]
    assert (s["batch_size"], s["grad_accum"], s["rank"], s["targets"], s["gradient_checkpointing"], s["optim"],
            s["seq_len"]) == (2, 4, 8, ["q_proj", "v_proj"], False, "adamw_torch", 1024)


def test_bf16_on_t4_switches_and_says_so():
    r = run("plan", "mistral-7b", "--gpu", "t4", "--compute-dtype", "bf16")
    assert "no bf16: computing in fp16" in r.output


def test_nothing_fits_says_why_and_what_would():
    r = run("plan", "llama-3.1-70b", "--gpu", "rtx4090")
    assert r.exit_code == 1
    assert "does not fit" in r.output and "dominated by 4-bit base weights" in r.output
    assert "would fit: one" in r.output


@pytest.mark.parametrize("args,message", [
    (["plan", "mistrl-7b", "--gpu", "t4"], "unknown model 'mistrl-7b'. Did you mean: mistral-7b"),
    (["plan", "mistral-7b", "--gpu", "t44"], "unknown GPU 't44'. Did you mean: t4"),
    (["plan", "mistral-7b", "--gpu", "t4", "--rank", "0"], "--rank must be a positive integer"),
    (["plan", "mistral-7b", "--gpu", "t4", "--batch-size", "-2"], "--batch-size must be a positive integer"),
    (["plan", "mistral-7b", "--gpu", "t4", "--seq-len", "100000"], "exceeds Mistral-7B-v0.1's max_position_embeddings"),
    (["plan", "mistral-7b", "--gpu", "t4", "--targets", "foo_proj"], "has no linear named 'foo_proj'"),
    (["plan", "mistral-7b", "--gpu", "t4", "--optim", "sgd"], "Invalid value for '--optim'"),
    (["plan", "mistral-7b", "--gpu", "t4", "--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
    (["plan", "mistral-7b", "--gpu", "lots"], "unknown GPU 'lots'"),
    (["plan", "mistral-7b", "--gpu", "t4", "--uncheckpointed-layers", "-1"], "--uncheckpointed-layers must be 0 or more"),
    (["plan", "mistral-7b", "--gpu", "t4", "--uncheckpointed-layers", "2", "--no-gradient-checkpointing"],
     "needs checkpointing: drop --no-gradient-checkpointing"),
    (["plan", "mistral-7b", "--gpu", "t4", "--uncheckpointed-layers", "32"], "has 32 decoder layers"),
    (["plan", "mistral-7b", "--gpu", "t4", "--uncheckpointed-layers", "2", "--num-gpus", "2"], "plans one GPU"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    err = r.stderr if hasattr(r, "stderr") else r.output
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_json_errors_are_json():
    r = CliRunner().invoke(cli, ["plan", "mistrl-7b", "--gpu", "t4", "--json"])
    assert r.exit_code == 2
    assert "Did you mean" in json.loads(r.stdout)["error"]


def test_malformed_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    r = CliRunner().invoke(cli, ["plan", str(tmp_path / "config.json"), "--gpu", "t4"])
    assert r.exit_code == 2 and "missing field 'intermediate_size'" in r.stderr


def test_save_writes_the_json_plan(tmp_path):
    out = tmp_path / "plan.json"
    run("plan", "qwen2.5-1.5b", "--gpu", "l4", "--save", str(out))
    assert json.loads(out.read_text())["model"] == "qwen2.5-1.5b"


def test_all_commands_are_listed():
    assert set(cli.list_commands(None)) >= {"plan", "models", "gpus", "calibrate", "profile", "run", "compare"}
    assert "run" in run("--help").output and "compare" in run("--help").output


def test_catalog_commands():
    assert "mistral-7b" in run("models").output
    gpus = json.loads(run("gpus", "--json").output)
    assert len(gpus) >= 15 and all(isinstance(g["memory_bytes"], int) for g in gpus)


def test_plan_path_imports_no_heavy_library():
    """`qfit plan` stays light (accelerate tests/test_imports.py style)."""
    code = ("import sys; from planner.cli import cli; "
            "from click.testing import CliRunner; CliRunner().invoke(cli, ['plan', 'mistral-7b', '--gpu', 't4']); "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "[]"


def test_gemma2_plan_reads_the_transformers_version_without_importing_it():
    """Gemma-2's attention depends on the transformers version (planner.architectures.SOFTCAPPING_EAGER_FROM): `qfit plan`
    reads it from the package metadata and still imports none of the heavy libraries."""
    code = ("import sys; from planner.cli import cli; from planner.profiles import load_model; "
            "from click.testing import CliRunner; r = CliRunner().invoke(cli, ['plan', 'gemma-2-2b', '--gpu', 't4']); "
            "assert r.exit_code == 0, r.output; "
            f"print([m for m in {HEAVY!r} if m in sys.modules], load_model('gemma-2-2b').attn_implementation)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    from planner.architectures import default_attn_implementation, installed_transformers_version

    assert out.stdout.split() == ["[]", default_attn_implementation("gemma2", installed_transformers_version())]


def test_profile_writes_a_working_profile_for_an_unshipped_architecture(tmp_path):
    """`qfit profile` on a config.json of an architecture qfit ships no profile for (Qwen3: q/k norms)."""
    cfg = {"model_type": "qwen3", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000,
           "max_position_embeddings": 2048, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "qwen3-tiny.toml"
    r = run("profile", str(tmp_path / "config.json"), "--name", "qwen3-tiny", "--out", str(out))
    assert r.exit_code == 0
    doc = json.loads(run("plan", str(out), "--gpu", "t4", "--json").output)
    from planner.introspect import build_meta_model

    assert doc["params"]["total"] == sum(p.numel() for p in build_meta_model(cfg).parameters())
    assert doc["fits"]


def test_profile_refuses_remote_code(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoModel": "x.Y"},
                                                      "hidden_size": 8}))
    r = CliRunner().invoke(cli, ["profile", str(tmp_path / "config.json")])
    assert r.exit_code == 2 and "trust_remote_code" in r.stderr


def test_missing_train_extra_is_one_line(tmp_path):
    """Without the train extra, commands that need it say how to install it (exit 2), no traceback."""
    code = ("import sys; sys.modules['pandas'] = None; sys.modules['transformers'] = None; "
            "from planner.cli import cli; cli.main(sys.argv[1:])")
    for args in (["calibrate", "--refit", "--out", str(tmp_path / "c.json"), "--report", str(tmp_path / "r.md")],
                 ["run", "--demo", "--output", str(tmp_path / "run")]):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                             cwd=Path(__file__).parent.parent)
        assert out.returncode == 2, out.stderr
        assert "needs the train extra" in out.stderr and "Traceback" not in out.stderr


def test_num_gpus_1_is_the_single_gpu_plan():
    """--num-gpus 1 (the default) is the single-GPU planner, byte for byte, text and JSON (the text itself is
    test_plan_golden_text's)."""
    assert run("plan", "mistral-7b", "--gpu", "t4", "--num-gpus", "1").output == \
        run("plan", "mistral-7b", "--gpu", "t4").output
    assert run("plan", "mistral-7b", "--gpu", "t4", "--num-gpus", "1", "--json").output == \
        run("plan", "mistral-7b", "--gpu", "t4", "--json").output


def test_plan_on_two_gpus_gives_per_gpu_memory():
    """Qwen2.5-14B at seq 4096: one RTX 4090 cannot hold it, two can with FSDP (run on two capped H200 ranks)."""
    args = ("plan", "qwen2.5-14b", "--gpu", "rtx4090", "--num-gpus", "2", "--seq-len", "4096")
    r = run(*args)
    assert r.exit_code == 0 and "FSDP" in r.output.splitlines()[0] and "Memory per GPU" in r.output
    doc = json.loads(run(*args, "--json").output)
    assert (doc["num_gpus"], doc["strategy"], doc["fits"]) == (2, "fsdp", True)
    assert doc["global_batch"] == 2 * doc["settings"]["batch_size"] * doc["settings"]["grad_accum"]
    assert all(isinstance(v, int) for v in doc["per_gpu"].values())
    assert doc["per_gpu"]["needs_bytes"] <= doc["per_gpu"]["usable_bytes"]


def test_seventy_b_on_two_24gb_cards():
    """Loaded shard by shard (the default), Llama-3.1-70B fits 2 x RTX 4090 with CPU offload (issue #16); loaded whole
    first (--loading full: each rank must hold the whole ~33 GiB 4-bit model, measured on 2 x H200) it does not."""
    r = run("plan", "llama-3.1-70b", "--gpu", "rtx4090", "--num-gpus", "2")
    assert r.exit_code == 0 and "CPU offload on" in r.output and "CPU RAM per node" in r.output
    doc = json.loads(run("plan", "llama-3.1-70b", "--gpu", "rtx4090", "--num-gpus", "2", "--json").output)
    assert (doc["num_gpus"], doc["strategy"], doc["fits"], doc["loading"], doc["cpu_offload"]) == (2, "fsdp", True,
                                                                                                 "sharded", True)
    full = run("plan", "llama-3.1-70b", "--gpu", "rtx4090", "--num-gpus", "2", "--loading", "full")
    assert full.exit_code == 1 and "does not fit." in full.output and "the load phase sets the peak" in full.output
    assert "no count of up to 8 x NVIDIA GeForce RTX 4090 fits: every rank first loads the whole 4-bit model" in full.output
    doc = json.loads(run("plan", "llama-3.1-70b", "--gpu", "rtx4090", "--num-gpus", "2", "--loading", "full",
                         "--json").output)
    assert (doc["num_gpus"], doc["strategy"], doc["fits"], doc["peak_phase"]) == (2, "fsdp", False, "load")


def test_nothing_fits_on_one_gpu_names_the_fewest_gpus():
    r = run("plan", "qwen2.5-14b", "--gpu", "rtx4090", "--seq-len", "4096")
    assert r.exit_code == 1
    assert "  fits on 2 x NVIDIA GeForce RTX 4090 with FSDP: qfit plan qwen2.5-14b --gpu rtx4090 --num-gpus 2 " \
           "(with the options above)" in r.output.splitlines()
    plain = run("plan", "qwen2.5-14b", "--gpu", "t4")  # nothing fixed: the hint's command is the whole story
    assert plain.exit_code == 1
    # loaded shard by shard, the whole 4-bit model never sits on one T4: two hold it
    assert "  fits on 2 x NVIDIA T4 with FSDP: qfit plan qwen2.5-14b --gpu t4 --num-gpus 2" in plain.output.splitlines()
    seventy = run("plan", "llama-3.1-70b", "--gpu", "rtx4090")
    assert seventy.exit_code == 1 and "fits on 2 x NVIDIA GeForce RTX 4090 with FSDP + CPU offload" in seventy.output


def test_partial_checkpointing_in_the_plan_text_and_json():
    """The planner fills spare memory by leaving the last layers uncheckpointed, says so, and the
    saved settings carry the count (qfit run --plan reads it back)."""
    r = CliRunner().invoke(cli, ["plan", "mistral-7b", "--gpu", "t4", "--json"])
    doc = json.loads(r.output)
    n = doc["settings"]["uncheckpointed_layers"]
    assert doc["settings"]["gradient_checkpointing"] and 0 < n < 32
    r = CliRunner().invoke(cli, ["plan", "mistral-7b", "--gpu", "t4"])
    assert f"gradient checkpointing on for {32 - n} of 32 layers" in r.output
    assert f"the last {n} of 32 layers are not checkpointed" in r.output
    fixed = json.loads(CliRunner().invoke(cli, ["plan", "mistral-7b", "--gpu", "t4", "--json",
                                                "--uncheckpointed-layers", "0"]).output)
    assert fixed["settings"]["uncheckpointed_layers"] == 0
    assert fixed["memory"]["peak_allocated_bytes"] < doc["memory"]["peak_allocated_bytes"]


def _user_errors():
    from planner.data import DataError
    from planner.errors import QfitError
    from planner.fitmap import MatplotlibMissing
    from planner.introspect import IntrospectionError
    from planner.profiles import ProfileError

    return [QfitError, ProfileError, DataError, IntrospectionError, MatplotlibMissing]


@pytest.mark.parametrize("error", _user_errors(), ids=lambda e: e.__name__)
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_every_user_error_is_one_line_exit_2(error, as_json):
    """One handler (planner.cli_errors) for every user error class, in a command run on its own."""
    import click

    from planner.cli_errors import QfitCommand

    @click.command(cls=QfitCommand)
    @click.option("--json", "as_json", is_flag=True)
    def cmd(as_json):
        raise error("bad value\n  for --x: use 3")

    r = CliRunner().invoke(cmd, ["--json"] if as_json else [])
    assert r.exit_code == 2
    if as_json:
        assert json.loads(r.stdout) == {"error": "bad value for --x: use 3"}
    else:
        assert r.stderr == "error: bad value for --x: use 3\n" and r.stdout == ""


def test_one_cli_error_handler():
    """Only planner/cli_errors.py wraps click's main (no per-command error wrappers)."""
    import ast

    owners = []
    for path in sorted((Path(__file__).resolve().parent.parent / "planner").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(isinstance(f, ast.FunctionDef) and f.name in ("main", "parse_args")
                                                      for f in node.body):
                owners.append(path.name)
    assert owners == ["cli_errors.py"]
