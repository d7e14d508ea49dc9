"""`qfit merge RUN_DIR --output DIR`: the run's LoRA adapter merged into its base model, saved as a standard
transformers model (16-bit) + tokenizer that loads without peft or bitsandbytes.

The base is loaded in 16 bits (not 4: merging into NF4 weights would round the adapter away), the adapter is
applied (peft.PeftModel.from_pretrained) and folded into the weights (merge_and_unload), then saved. The memory
it needs is planned before anything is loaded (merge_memory) and checked against the machine (available_memory):
a merge that cannot fit is refused with one line instead of being killed by the OOM killer halfway.

Module level is light (standard library, planner modules); torch, transformers and peft are imported inside.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from planner.profiles import load_model
from planner.report import gib_str
from planner.specs import ModelSpec
from planner.train.options import RunError, one_line
from planner.train.output import RUN_CONFIG
from planner.units import DTYPE_BYTES

MERGE_DTYPES = ("bf16", "fp16")


@dataclass(frozen=True, slots=True)
class MergeMemory:
    """What a merge holds at its peak, bytes."""

    base_weights_bytes: int  # every base parameter in the 16-bit dtype
    layer_bytes: int  # one decoder layer's weights again: the delta B @ A and its sum are made linear by linear
    adapter_bytes: int  # the LoRA weights as saved (adapter_model.safetensors)

    @property
    def needs_bytes(self) -> int:
        return self.base_weights_bytes + self.layer_bytes + self.adapter_bytes


def merge_memory(spec: ModelSpec, dtype: str, adapter_bytes: int) -> MergeMemory:
    """base params x dtype bytes + one decoder layer (its linears and norms) in the dtype + the adapter file."""
    b = DTYPE_BYTES[dtype]
    layer = spec.layer_linear_weight_count + spec.layer_linear_bias_count + spec.layer_other_params
    return MergeMemory(spec.total_param_count * b, layer * b, adapter_bytes)


def available_memory() -> tuple[str, int, int]:
    """(device, free bytes, total bytes) where the merge runs: the GPU (torch.cuda.mem_get_info) when there is one,
    else the CPU's available RAM (psutil, or MemAvailable in /proc/meminfo)."""
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        return "cuda", int(free), int(total)
    try:
        import psutil

        vm = psutil.virtual_memory()
        return "cpu", int(vm.available), int(vm.total)
    except ImportError:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024  # kB
        return "cpu", info["MemAvailable"], info["MemTotal"]


def read_run(run_dir: str) -> tuple[dict, Path]:
    """run_config.json of a finished `qfit run` and its directory; RunError when there is no adapter to merge."""
    path = Path(run_dir).expanduser()
    if not (path / RUN_CONFIG).is_file():
        raise RunError(f"{run_dir} is not a qfit run directory (no {RUN_CONFIG}): pass the --output of `qfit run`")
    if not (path / "adapter_config.json").is_file():
        raise RunError(f"{run_dir} has no adapter yet (the run did not finish): continue it with qfit run --resume {run_dir}")
    try:
        config = json.loads((path / RUN_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"cannot read {path / RUN_CONFIG}: {one_line(exc)}") from None
    return config, path


def base_model(config: dict) -> tuple[ModelSpec, str]:
    """The run's base model: (its spec, what from_pretrained gets), from run_config.json's model reference."""
    if config.get("demo"):
        from planner import demo

        return load_model(demo.MODEL_PROFILE), str(demo.prepare())
    from planner.train.source import resolve_model

    src = resolve_model(config["model"])
    return src.spec, src.ref


def check_output_dir(output: str, run_dir: Path) -> Path:
    out = Path(output).expanduser()
    if out.resolve() == run_dir.resolve():
        raise RunError("--output must be a new directory, not the run directory (the adapter lives there)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"--output {output} exists and is not empty: choose a new directory")
    return out


def merge(run_dir: str, output: str, dtype: str = "bf16", echo=print) -> dict:
    """Plan, check, load, merge, save. -> {"output", "device", "dtype", "memory": {...}, "seconds"}."""
    if dtype not in MERGE_DTYPES:
        raise RunError(f"--dtype must be one of {', '.join(MERGE_DTYPES)}, got {dtype!r}")
    config, run_path = read_run(run_dir)
    out = check_output_dir(output, run_path)
    spec, ref = base_model(config)
    adapter = sum(f.stat().st_size for f in run_path.glob("adapter_model.*"))
    mem = merge_memory(spec, dtype, adapter)
    device, free, total = available_memory()
    where = "GPU" if device == "cuda" else "RAM"
    echo(f"qfit merge: {spec.display_name} ({spec.total_param_count:,} params) in {dtype} + the adapter "
         f"of {run_path}")
    echo(f"memory: base {gib_str(mem.base_weights_bytes)} + one layer {gib_str(mem.layer_bytes)} + adapter "
         f"{gib_str(mem.adapter_bytes)} = {gib_str(mem.needs_bytes)} GiB; {gib_str(free)} GiB {where} free on {device}")
    if mem.needs_bytes > free:
        raise RunError(f"merging needs {gib_str(mem.needs_bytes)} GiB ({spec.display_name} in {dtype} + one layer); "
                       f"this machine has {gib_str(free)} GiB {where} free of {gib_str(total)}: free memory or merge on "
                       "a larger machine")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from planner.train.stack import TORCH_DTYPES

    t0 = time.perf_counter()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # qfit prints what happens; the loading bars and info lines are noise here
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        try:
            base = AutoModelForCausalLM.from_pretrained(ref, dtype=TORCH_DTYPES[dtype],
                                                        device_map={"": 0} if device == "cuda" else None)
        except (OSError, ValueError) as exc:
            raise RunError(f"cannot load {ref} in {dtype} ({one_line(exc, 160)})") from None
        with warnings.catch_warnings():  # peft reads the deprecated is_gradient_checkpointing (transformers 5)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(base, str(run_path))
        merged = model.merge_and_unload()
        out.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(str(out))
        AutoTokenizer.from_pretrained(str(run_path)).save_pretrained(str(out))
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    seconds = time.perf_counter() - t0
    peak = int(torch.cuda.max_memory_allocated()) if device == "cuda" else None
    echo(f"merged in {seconds:.1f} s: {out} (config.json, model.safetensors, tokenizer); load it with:")
    echo("import torch")
    echo("from transformers import AutoModelForCausalLM, AutoTokenizer")
    echo(f"model = AutoModelForCausalLM.from_pretrained({str(out.resolve())!r}, dtype={TORCH_DTYPES[dtype]})")
    echo(f"tokenizer = AutoTokenizer.from_pretrained({str(out.resolve())!r})")
    return {"output": str(out), "device": device, "dtype": dtype, "seconds": round(seconds, 2),
            "memory": {"needs_bytes": mem.needs_bytes, "base_weights_bytes": mem.base_weights_bytes,
                       "layer_bytes": mem.layer_bytes, "adapter_bytes": mem.adapter_bytes, "free_bytes": free,
                       "measured_peak_allocated_bytes": peak}}
