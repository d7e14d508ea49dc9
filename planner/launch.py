"""The accelerate launch configuration matching a multi-GPU plan. PURE: standard library only.

accelerate_config() builds the dict that `accelerate launch --config_file cfg.json` reads (accelerate
1.15 commands/config/config_args.py: load_config_from_file takes a .json file as well as YAML, and
ClusterConfig.from_json_file rejects unknown keys, so only keys it knows are written). launch_argv()
is the subprocess argv, launch_command_text() the shell line a user runs on each node.

Facts checked in accelerate 1.15 (commands/launch.py, utils/launch.py):
- num_processes is the TOTAL over all machines: prepare_multi_gpu_env starts
  num_processes // num_machines processes per node (torchrun --nproc_per_node).
- `python -m accelerate.commands.launch` is the `accelerate launch` console script (it ends in
  `if __name__ == "__main__": main()`), and `-m/--module` runs the training script as `python -m`.
- DDP and FSDP go through multi_gpu_launcher (torch.distributed.run). distributed_type MULTI_CPU goes
  through simple_launcher, which starts ONE process unless an mpirun hostfile is configured, so a
  2-process CPU run with plain gloo needs distributed_type MULTI_GPU + use_cpu (torchrun path) and
  ACCELERATE_USE_CPU=true in the environment: multi_gpu_launcher does not export it, and without it
  Accelerator() sees no CUDA and runs every process alone (DistributedType.NO). launch_argv adds it.
- FSDP2 keys are what `accelerate config` writes for fsdp_version 2 (commands/config/cluster.py):
  fsdp_version, fsdp_reshard_after_forward (a bool in FSDP2), fsdp_offload_params,
  fsdp_auto_wrap_policy, fsdp_transformer_layer_cls_to_wrap, fsdp_state_dict_type,
  fsdp_cpu_ram_efficient_loading, fsdp_activation_checkpointing. fsdp_sync_module_states is obsolete in
  FSDP2 (the plugin warns and drops it) and the launcher's own default ("true") satisfies its
  cpu_ram_efficient_loading check, so it is not written.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from planner.errors import QfitError

DECODER_LAYER_CLS = {
    "llama": "LlamaDecoderLayer",
    "mistral": "MistralDecoderLayer",
    "qwen2": "Qwen2DecoderLayer",
    "gemma2": "Gemma2DecoderLayer",
    "phi3": "Phi3DecoderLayer",
    "mixtral": "MixtralDecoderLayer",
}
STRATEGIES = ("ddp", "fsdp")
MIXED_PRECISIONS = ("bf16", "fp16")
DEFAULT_PORT = 29500  # torch.distributed's and accelerate's default main_process_port
# FSDP2 + peft: a sharded checkpoint while training (accelerate's FSDP2 default, FSDP2_STATE_DICT_TYPE[0]);
# the adapter is gathered once at the end to save it.
FSDP_STATE_DICT_TYPE = "SHARDED_STATE_DICT"
CPU_ENV = "ACCELERATE_USE_CPU"  # read by AcceleratorState (accelerate/state.py) in every process


def decoder_layer_cls(model_type: str) -> str:
    """The transformers decoder-layer class FSDP wraps one unit at a time (TRANSFORMER_BASED_WRAP)."""
    try:
        return DECODER_LAYER_CLS[model_type]
    except KeyError:
        raise QfitError(f"no FSDP wrap class for model_type {model_type!r}; supported: "
                         f"{', '.join(sorted(DECODER_LAYER_CLS))}") from None


def accelerate_config(strategy: str, num_processes: int, *, compute_dtype: str, model_type: str,
                      num_machines: int = 1, machine_rank: int = 0, main_process_ip: str | None = None,
                      main_process_port: int = DEFAULT_PORT, cpu: bool = False, cpu_offload: bool = False,
                      cpu_ram_efficient_loading: bool = False, activation_checkpointing: bool = False) -> dict:
    """The accelerate config (ClusterConfig fields) for `strategy` over num_processes processes in all.

    - ddp: distributed_type MULTI_GPU; with cpu=True also MULTI_GPU (see the module docstring: MULTI_CPU
      would start one process), use_cpu true and mixed_precision "no".
    - fsdp: distributed_type FSDP, fsdp_config for FSDP2 full shard (reshard after forward), one unit per
      decoder layer; fsdp_offload_params = cpu_offload; fsdp_cpu_ram_efficient_loading off by default: measured on 2 x H200,
      it left each rank's load peak unchanged for a 4-bit checkpoint (transformers loads a quantized model whole
      on every rank; planner.multigpu.RANK0_CPU_MEASURED), and training ran the same either way.
    - cpu=True (ddp only; tests and CPU smoke runs): accelerate 1.15 turns a use_cpu FSDP config into
      DDP over gloo in every process, so FSDP with cpu=True is refused.
    - num_machines > 1: every node runs the same file with its own machine_rank (or `--machine_rank K`
      on the command line, which overrides the file); main_process_ip is machine 0's address, reached by
      torchrun's static rendezvous at main_process_ip:main_process_port. same_network is written as
      `accelerate config` writes it, but accelerate launch takes it only from its `--same_network` flag
      (the parser default False wins over the file); either way the rendezvous is that address.
    mixed_precision is the compute dtype (bf16/fp16): the 4-bit weights are stored in it (FSDP-QLoRA's
    bnb_4bit_quant_storage) and the LoRA matmuls run in it.
    """
    if strategy not in STRATEGIES:
        raise QfitError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if compute_dtype not in MIXED_PRECISIONS:
        raise QfitError(f"compute_dtype must be one of {', '.join(MIXED_PRECISIONS)}, got {compute_dtype!r}")
    if num_processes < 1:
        raise QfitError(f"num_processes must be a positive integer, got {num_processes}")
    if num_machines < 1:
        raise QfitError(f"num_machines must be a positive integer, got {num_machines}")
    if num_processes % num_machines:
        raise QfitError(f"num_processes ({num_processes}) is the total over all machines: it must be a multiple "
                         f"of num_machines ({num_machines})")
    if not 0 <= machine_rank < num_machines:
        raise QfitError(f"machine_rank must be in 0..{num_machines - 1}, got {machine_rank}")
    if num_machines > 1 and not main_process_ip:
        raise QfitError("num_machines > 1 needs main_process_ip (the address of the machine with machine_rank 0)")
    if cpu and strategy == "fsdp":
        raise QfitError("FSDP needs CUDA GPUs: accelerate runs a use_cpu config as DDP over gloo (MULTI_CPU), "
                         "not FSDP; use strategy 'ddp' with cpu=True")
    if not 0 <= main_process_port <= 65535:
        raise QfitError(f"main_process_port must be in 0..65535, got {main_process_port}")

    cfg = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP" if strategy == "fsdp" else "MULTI_GPU",
        "mixed_precision": "no" if cpu else compute_dtype,
        "use_cpu": cpu,
        "debug": False,
        "num_processes": num_processes,
        "num_machines": num_machines,
        "machine_rank": machine_rank,
        "gpu_ids": "all",
        "main_process_port": main_process_port,
        "rdzv_backend": "static",
        "same_network": True,
    }
    if num_machines > 1:
        cfg["main_process_ip"] = main_process_ip
    if strategy == "fsdp":
        cfg["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_reshard_after_forward": True,  # full shard: gather each layer for its forward and backward
            "fsdp_offload_params": cpu_offload,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": decoder_layer_cls(model_type),
            "fsdp_state_dict_type": FSDP_STATE_DICT_TYPE,
            "fsdp_cpu_ram_efficient_loading": cpu_ram_efficient_loading,
            "fsdp_activation_checkpointing": activation_checkpointing,
        }
    return cfg


def write_config(path, cfg: dict) -> None:
    """Write cfg as JSON; accelerate picks the JSON reader from the .json suffix, so path should end in .json."""
    Path(path).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _uses_cpu(config_path: str, cpu: bool | None) -> bool:
    if cpu is not None:
        return cpu
    try:
        return bool(json.loads(Path(config_path).read_text()).get("use_cpu", False))
    except (OSError, ValueError):
        return False


def launch_argv(config_path: str, module: str, module_args: list[str], *, cpu: bool | None = None) -> list[str]:
    """argv for subprocess: `python -m accelerate.commands.launch --config_file CFG -m MODULE ARGS...`.

    A CPU config (use_cpu true in the file, or cpu=True) is prefixed with `env ACCELERATE_USE_CPU=true`
    (POSIX env): accelerate's torchrun path does not export it and every process needs it to pick gloo.
    """
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path),
            "-m", module, *module_args]
    if _uses_cpu(str(config_path), cpu):
        argv = ["env", f"{CPU_ENV}=true", *argv]
    return argv


def launch_command_text(config_path: str, module: str, module_args: list[str], *, machine_rank: int | None = None,
                        cpu: bool | None = None) -> str:
    """The shell line equivalent to launch_argv, for a user to run (`accelerate launch` is the console
    script of accelerate.commands.launch). Multi-node: copy the same config file to every node and run
    this line on each, changing only the machine rank: machine_rank=K adds `--machine_rank K`, which
    accelerate takes over the file's value (node 0 is the one at main_process_ip)."""
    words = ["accelerate", "launch", "--config_file", str(config_path)]
    if machine_rank is not None:
        words += ["--machine_rank", str(machine_rank)]
    words += ["-m", module, *module_args]
    line = shlex.join(words)
    return f"{CPU_ENV}=true {line}" if _uses_cpu(str(config_path), cpu) else line
