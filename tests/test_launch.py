"""planner.launch: the accelerate config a multi-GPU plan runs with, read back by accelerate itself,
and a real 2-process launch on the CPU (gloo) through the argv launch_argv builds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from planner.launch import (
    DECODER_LAYER_CLS,
    accelerate_config,
    decoder_layer_cls,
    launch_argv,
    launch_command_text,
    write_config,
)
from planner.profiles import load_model, model_names

TESTS = Path(__file__).resolve().parent
# the keys `accelerate config` writes for fsdp_version 2 (accelerate 1.15 commands/config/cluster.py)
FSDP2_KEYS = {"fsdp_version", "fsdp_reshard_after_forward", "fsdp_offload_params", "fsdp_auto_wrap_policy",
              "fsdp_transformer_layer_cls_to_wrap", "fsdp_state_dict_type", "fsdp_cpu_ram_efficient_loading",
              "fsdp_activation_checkpointing"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(path))


# =========================================================================== decoder layers

def test_every_shipped_model_type_has_a_wrap_class():
    types = {load_model(name).model_type for name in model_names()}
    assert types <= set(DECODER_LAYER_CLS), types - set(DECODER_LAYER_CLS)


@pytest.mark.parametrize("model_type", sorted(DECODER_LAYER_CLS))
def test_wrap_class_exists_in_transformers(model_type):
    import importlib

    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    assert hasattr(module, decoder_layer_cls(model_type))


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(ValueError, match="gemma2, llama, mistral, mixtral, phi3, qwen2"):
        decoder_layer_cls("gpt2")


# =========================================================================== configs

def test_ddp_config(tmp_path):
    cfg = accelerate_config("ddp", 2, compute_dtype="bf16", model_type="llama")
    assert cfg["distributed_type"] == "MULTI_GPU" and cfg["num_processes"] == 2 and cfg["num_machines"] == 1
    assert cfg["mixed_precision"] == "bf16" and cfg["use_cpu"] is False
    assert "fsdp_config" not in cfg and "main_process_ip" not in cfg
    write_config(tmp_path / "ddp.json", cfg)
    loaded = _load(tmp_path / "ddp.json")
    assert type(loaded).__name__ == "ClusterConfig"
    assert loaded.distributed_type.value == "MULTI_GPU" and loaded.num_processes == 2
    assert loaded.mixed_precision == "bf16" and loaded.fsdp_config == {}


def test_ddp_cpu_config_runs_on_torchrun_with_gloo():
    cfg = accelerate_config("ddp", 2, compute_dtype="bf16", model_type="llama", cpu=True)
    # MULTI_CPU would go through accelerate's simple_launcher: one process without mpirun
    assert cfg["distributed_type"] == "MULTI_GPU" and cfg["use_cpu"] is True and cfg["mixed_precision"] == "no"
    with pytest.raises(ValueError, match="FSDP needs CUDA"):
        accelerate_config("fsdp", 2, compute_dtype="bf16", model_type="llama", cpu=True)


@pytest.mark.parametrize("cpu_offload", [False, True])
def test_fsdp_config(tmp_path, cpu_offload):
    cfg = accelerate_config("fsdp", 4, compute_dtype="fp16", model_type="qwen2", cpu_offload=cpu_offload,
                            activation_checkpointing=True)
    fsdp = cfg["fsdp_config"]
    assert set(fsdp) == FSDP2_KEYS
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"
    assert fsdp["fsdp_offload_params"] is cpu_offload and fsdp["fsdp_cpu_ram_efficient_loading"] is False
    assert fsdp["fsdp_activation_checkpointing"] is True
    assert cfg["distributed_type"] == "FSDP" and cfg["mixed_precision"] == "fp16"
    write_config(tmp_path / "fsdp.json", cfg)
    loaded = _load(tmp_path / "fsdp.json")
    assert loaded.distributed_type.value == "FSDP" and loaded.num_processes == 4
    assert loaded.fsdp_config == fsdp


def test_fsdp_config_as_the_launcher_reads_it(tmp_path):
    """accelerate launch's own parsing: the file's fsdp_config becomes the FSDP_* environment of every rank."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = tmp_path / "fsdp.json"
    write_config(path, accelerate_config("fsdp", 2, compute_dtype="bf16", model_type="mistral", cpu_offload=True,
                                         cpu_ram_efficient_loading=False, main_process_port=_free_port()))
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "planner.train", "x"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert args.use_fsdp and args.module and args.training_script == "planner.train"
    assert args.nproc_per_node == "2" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["FSDP_VERSION"] == "2" and env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "MistralDecoderLayer"
    assert env["FSDP_OFFLOAD_PARAMS"] == "true" and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"


def test_two_node_config(tmp_path):
    cfg = accelerate_config("fsdp", 4, compute_dtype="bf16", model_type="llama", num_machines=2, machine_rank=1,
                            main_process_ip="10.0.0.1", main_process_port=29555)
    assert (cfg["num_machines"], cfg["machine_rank"], cfg["num_processes"]) == (2, 1, 4)  # 4 = total, 2 per node
    assert (cfg["main_process_ip"], cfg["main_process_port"], cfg["rdzv_backend"], cfg["same_network"]) == (
        "10.0.0.1", 29555, "static", True)
    path = tmp_path / "node.json"
    write_config(path, cfg)
    loaded = _load(path)
    assert (loaded.num_machines, loaded.machine_rank, loaded.main_process_ip, loaded.num_processes) == (2, 1, "10.0.0.1", 4)
    # what accelerate launch makes of it on node 1: 2 processes here, 2 nodes, rendezvous at node 0
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "-m", "m"]))
    prepare_multi_gpu_env(args)
    assert (args.nproc_per_node, args.nnodes, args.node_rank, args.rdzv_endpoint) == ("2", "2", 1, "10.0.0.1:29555")


@pytest.mark.parametrize("kwargs,message", [
    ({"num_machines": 2}, "needs main_process_ip"),
    ({"num_machines": 2, "main_process_ip": "10.0.0.1", "machine_rank": 2}, "machine_rank must be in 0..1"),
    ({"num_machines": 3, "main_process_ip": "10.0.0.1"}, "multiple of num_machines"),
    ({"compute_dtype": "fp32"}, "compute_dtype"),
    ({"strategy": "zero3"}, "strategy must be one of ddp, fsdp"),
    ({"num_processes": 0}, "num_processes must be a positive integer"),
    ({"model_type": "gpt2", "strategy": "fsdp"}, "no FSDP wrap class"),
])
def test_config_errors(kwargs, message):
    args = {"strategy": "ddp", "num_processes": 4, "compute_dtype": "bf16", "model_type": "llama", **kwargs}
    strategy, n = args.pop("strategy"), args.pop("num_processes")
    with pytest.raises(ValueError, match=message):
        accelerate_config(strategy, n, **args)


# =========================================================================== argv and shell line

def test_launch_argv(tmp_path):
    gpu, cpu = tmp_path / "gpu.json", tmp_path / "cpu.json"
    write_config(gpu, accelerate_config("ddp", 2, compute_dtype="bf16", model_type="llama"))
    write_config(cpu, accelerate_config("ddp", 2, compute_dtype="bf16", model_type="llama", cpu=True))
    assert launch_argv(str(gpu), "planner.train", ["--plan", "p.json"]) == [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(gpu), "-m", "planner.train",
        "--plan", "p.json"]
    assert launch_argv(str(cpu), "m", []) == ["env", "ACCELERATE_USE_CPU=true", sys.executable, "-m",
                                              "accelerate.commands.launch", "--config_file", str(cpu), "-m", "m"]
    assert launch_argv(str(cpu), "m", [], cpu=False)[0] == sys.executable


def test_launch_command_text(tmp_path):
    path = tmp_path / "my cfg.json"
    write_config(path, accelerate_config("fsdp", 16, compute_dtype="bf16", model_type="llama", num_machines=2,
                                         main_process_ip="10.0.0.1"))
    line = launch_command_text(str(path), "planner.train", ["--out", "a b"], machine_rank=1)
    assert line == f"accelerate launch --config_file '{path}' --machine_rank 1 -m planner.train --out 'a b'"
    assert "--machine_rank" not in launch_command_text(str(path), "m", [])
    assert launch_command_text(str(path), "m", [], cpu=True).startswith("ACCELERATE_USE_CPU=true accelerate launch")


def test_module_is_pure():
    code = ("import sys, planner.launch; bad = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', "
            "'accelerate', 'pandas', 'yaml') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=TESTS.parent)


# =========================================================================== a real launch

def test_two_process_cpu_launch(tmp_path):
    """accelerate launch starts 2 processes (torchrun), each joins a gloo group through accelerate's state
    and all-reduces its rank: both see 0 + 1 = 1."""
    cfg = tmp_path / "cpu.json"
    write_config(cfg, accelerate_config("ddp", 2, compute_dtype="bf16", model_type="llama", cpu=True,
                                        main_process_port=_free_port()))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # launch_argv must provide it
    proc = subprocess.run(launch_argv(str(cfg), "launch_worker", [str(out)]), cwd=TESTS, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [d["rank"] for d in docs] == [0, 1]
    for d in docs:
        assert d["sum"] == 1.0 and d["world_size"] == 2
        assert d["backend"] == "gloo" and d["distributed_type"] == "DistributedType.MULTI_CPU"
