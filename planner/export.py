"""`qfit plan --export trl|axolotl|accelerate FILE`: the recommended plan as the configuration another tool reads.

  trl         the flat config `trl sft --config FILE` reads: SFTConfig arguments (per_device_train_batch_size,
              gradient_accumulation_steps, gradient_checkpointing, optim, bf16/fp16, max_length, packing) and
              TRL's ModelConfig fields, which build the peft LoraConfig (use_peft, lora_r, lora_alpha, lora_dropout,
              lora_target_modules) and the BitsAndBytesConfig (load_in_4bit, bnb_4bit_quant_type,
              use_bnb_nested_quant; compute dtype = dtype). YAML, or JSON when FILE ends in .json.
  axolotl     an axolotl YAML (adapter: qlora, load_in_4bit (lora-8bit: adapter lora, load_in_8bit; lora: neither), lora_*, sequence_len, sample_packing,
              micro_batch_size, gradient_accumulation_steps, gradient_checkpointing, optimizer, bf16/fp16).
  accelerate  an accelerate config (`accelerate launch --config_file FILE`): one process, no distribution,
              the plan's mixed precision.

Pure builders (plan -> dict) and a small YAML writer (standard library: `qfit plan` stays light). What the other
tool cannot express is said in `caveats` (written as comments at the top of a YAML file): partial gradient
checkpointing (the tools checkpoint every layer or none) and the allocator setting qfit run makes.
"""

from __future__ import annotations

import json

from planner.errors import QfitError
from planner.memory import resolve_targets
from planner.specs import Plan

EXPORT_FORMATS = ("trl", "axolotl", "accelerate")
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def caveats(plan: Plan) -> list[str]:
    """What the exported configuration does differently from the plan, one line each."""
    from planner.report import gib_str

    t, layers = plan.train, plan.model.num_hidden_layers
    out = [f"qfit plan {plan.model.name} --gpu {plan.gpu.name}: needs {gib_str(plan.memory.needs_bytes)} GiB of "
           f"{gib_str(plan.gpu.memory_bytes)} GiB on the card"]
    if t.gradient_checkpointing and t.uncheckpointed_layers:
        out.append(f"the plan checkpoints {t.checkpointed_layers(layers)} of {layers} layers; this config checkpoints "
                   "every layer (less memory than planned, somewhat slower)")
    if t.expandable_segments:
        out.append("planned with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: set it in the environment")
    return out


def _targets(plan: Plan) -> list[str]:
    return list(resolve_targets(plan.model, plan.lora.targets))


def _model_id(plan: Plan) -> str:
    return plan.model.hf_id or plan.model.name


def _trl_quant(plan: Plan) -> dict:
    """trl ModelConfig's quantization fields for the plan's method."""
    t = plan.train
    if t.method == "qlora":
        return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": t.double_quant}
    if t.method == "lora-8bit":
        return {"load_in_8bit": True}
    return {}


def trl_config(plan: Plan) -> dict:
    """Flat keys of trl's SFTConfig + ModelConfig (what `trl sft --config` parses)."""
    t, lora = plan.train, plan.lora
    return {
        "model_name_or_path": _model_id(plan),
        "dtype": TORCH_DTYPES[t.compute_dtype],
        # BitsAndBytesConfig (trl.get_quantization_config): NF4, double quant, compute dtype = dtype; or LLM.int8
        # (load_in_8bit) for lora-8bit; none for a 16-bit base (lora)
        **_trl_quant(plan),
        # peft LoraConfig (trl.get_peft_config)
        "use_peft": True,
        "lora_r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "lora_target_modules": _targets(plan),
        # SFTConfig (a transformers TrainingArguments)
        "output_dir": f"outputs/{plan.model.name.replace('/', '-')}-{t.method}",
        "per_device_train_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_checkpointing": t.gradient_checkpointing,
        "optim": t.optim,
        "bf16": t.compute_dtype == "bf16",
        "fp16": t.compute_dtype == "fp16",
        "max_length": t.seq_len,
        "packing": t.packing,
    }


def axolotl_config(plan: Plan) -> dict:
    t, lora = plan.train, plan.lora
    return {
        "base_model": _model_id(plan),
        **({"load_in_4bit": True} if t.method == "qlora" else {"load_in_8bit": True} if t.method == "lora-8bit" else {}),
        "adapter": "qlora" if t.method == "qlora" else "lora",
        "lora_r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "lora_target_modules": _targets(plan),
        **({"bnb_config_kwargs": {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": t.double_quant}}
           if t.method == "qlora" else {}),
        "sequence_len": t.seq_len,
        "sample_packing": t.packing,
        "pad_to_sequence_len": t.packing,
        "micro_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_checkpointing": t.gradient_checkpointing,
        "optimizer": t.optim,
        "bf16": t.compute_dtype == "bf16",
        "fp16": t.compute_dtype == "fp16",
        "output_dir": f"./outputs/{plan.model.name.replace('/', '-')}-{t.method}",
    }


def accelerate_config(plan: Plan) -> dict:
    """accelerate's config file (`accelerate config` writes the same keys) for one GPU."""
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "NO",
        "mixed_precision": plan.train.compute_dtype,
        "num_machines": 1,
        "num_processes": 1,
        "machine_rank": 0,
        "gpu_ids": "all",
        "use_cpu": False,
        "downcast_bf16": "no",
        "debug": False,
    }


BUILDERS = {"trl": trl_config, "axolotl": axolotl_config, "accelerate": accelerate_config}


def _yaml_scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a double-quoted YAML string


def to_yaml(doc: dict, comments: list[str] = ()) -> str:
    """A flat or one-level-nested dict of scalars and lists of scalars as YAML (block style)."""
    lines = [f"# {c}" for c in comments]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"{k}:")
            lines += [f"  {kk}: {_yaml_scalar(vv)}" for kk, vv in v.items()]
        elif isinstance(v, (list, tuple)):
            lines.append(f"{k}:")
            lines += [f"  - {_yaml_scalar(x)}" for x in v]
        else:
            lines.append(f"{k}: {_yaml_scalar(v)}")
    return "\n".join(lines) + "\n"


def export_text(fmt: str, plan: Plan, path: str) -> str:
    """The file's text: YAML (with the caveats as comments), or JSON for a trl file named *.json."""
    if fmt not in BUILDERS:
        raise QfitError(f"--export takes {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    doc = BUILDERS[fmt](plan)
    if path.lower().endswith(".json"):
        if fmt != "trl":
            raise QfitError(f"--export {fmt} writes YAML: name the file .yaml (JSON is for --export trl)")
        return json.dumps(doc, indent=2) + "\n"
    return to_yaml(doc, [f"written by qfit plan --export {fmt}"] + caveats(plan))
