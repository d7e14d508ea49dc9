"""The QLoRA stack exactly as users run it: build, load in 4-bit, prepare, wrap with LoRA, Trainer.

Shared by `qfit run` and `qfit calibrate`, so that what is measured is what is run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback, TrainingArguments

from planner.specs import LoraSettings, TrainSettings

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# transformers 5.x renamed gradient_checkpointing -> activation_checkpointing (the old name is a deprecated alias)
_TA_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}
CKPT_ARG = "activation_checkpointing" if "activation_checkpointing" in _TA_FIELDS else "gradient_checkpointing"


def hf_config(config_fields: dict, num_hidden_layers: int | None = None):
    cfg = {k: v for k, v in config_fields.items() if k not in ("model_type", "architectures")}
    if num_hidden_layers is not None:
        cfg["num_hidden_layers"] = num_hidden_layers
    return AutoConfig.for_model(config_fields["model_type"], **cfg)


def save_random_model(config, path: str, dtype: torch.dtype, device: str = "cpu") -> None:
    """Random weights for an architecture (memory does not depend on values), saved as a checkpoint."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path, safe_serialization=True)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def bnb_config(compute_dtype: str, double_quant: bool) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=TORCH_DTYPES[compute_dtype])


def load_4bit(path: str, compute_dtype: str, double_quant: bool, device_map=None):
    """from_pretrained with BitsAndBytesConfig, then prepare_model_for_kbit_training.

    use_gradient_checkpointing=False here: prepare_model_for_kbit_training would otherwise turn
    checkpointing on whatever the plan says; the Trainer turns it on only when the plan asks.
    """
    from peft import prepare_model_for_kbit_training

    kwargs = {"quantization_config": bnb_config(compute_dtype, double_quant), "dtype": TORCH_DTYPES[compute_dtype]}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False
    return model


INT8_LOGGER = "bitsandbytes.autograd._functions"


class OnceFilter(logging.Filter):
    """Lets each distinct message through once. bitsandbytes 0.50's MatMul8bitLt warns on every forward call of every
    int8 linear that its input will be cast to float16: tens of thousands of identical lines in a lora-8bit run."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def quiet_int8_repeats() -> None:
    """Install OnceFilter on MatMul8bitLt's logger (once per process)."""
    log = logging.getLogger(INT8_LOGGER)
    if not any(isinstance(f, OnceFilter) for f in log.filters):
        log.addFilter(OnceFilter())


def load_base(path: str, train: TrainSettings, device_map=None):
    """The frozen base as train.method holds it (planner.specs.METHODS):
      qlora      load_4bit (BitsAndBytesConfig(load_in_4bit=True, nf4) + prepare_model_for_kbit_training);
      lora-8bit  BitsAndBytesConfig(load_in_8bit=True) (LLM.int8, outlier threshold 6.0) +
                 prepare_model_for_kbit_training (it upcasts the non-int8 parameters to fp32, as for 4-bit);
      lora       from_pretrained(dtype=compute dtype), no quantization and no k-bit preparation (peft's LoRA
                 recipe); get_peft_model freezes every base parameter.
    Under gradient checkpointing the Trainer's activation_checkpointing_enable calls enable_input_require_grads
    itself (transformers modeling_utils.py, any causal LM), so no method adds that hook here (a second one would
    outlive disable_input_require_grads, which removes only the last).
    """
    if train.method == "qlora":
        return load_4bit(path, train.compute_dtype, train.double_quant, device_map=device_map)
    kwargs = {"dtype": TORCH_DTYPES[train.compute_dtype]}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if train.method == "lora-8bit":
        from peft import prepare_model_for_kbit_training

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        quiet_int8_repeats()
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    return model


def lora_config(lora: LoraSettings, target_names: tuple[str, ...]):
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(target_names), bias="none", task_type="CAUSAL_LM")


def training_arguments(output_dir: str, train: TrainSettings, **extra) -> TrainingArguments:
    args = {
        "output_dir": output_dir,
        "per_device_train_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "optim": train.optim,
        "bf16": train.compute_dtype == "bf16",
        "fp16": train.compute_dtype == "fp16",
        CKPT_ARG: train.gradient_checkpointing,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        "remove_unused_columns": False,
    }
    if not torch.cuda.is_available():
        args["use_cpu"] = True  # CPU autocast in the compute dtype (tests, the demo)
    args.update(extra)
    return TrainingArguments(**args)


class FixedLengthDataset(torch.utils.data.Dataset):
    """Full-length synthetic sequences (random token ids): the worst case a plan must hold."""

    def __init__(self, n: int, seq_len: int, vocab_size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab_size, (n, seq_len), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def decoder_layers(model) -> list:
    """The model's checkpointable decoder layers, first to last (transformers' GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def uncheckpoint_last_layers(model, n: int) -> int:
    """Partial checkpointing: once checkpointing is on, turn it off for the last n decoder layers (they
    keep their activations; backward reaches them first, so their memory is freed before any
    checkpointed layer is recomputed). transformers checks each layer's flag at every forward.
    Returns how many layers are still checkpointed."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if i >= len(layers) - n:
            layer.gradient_checkpointing = False
    return sum(bool(layer.gradient_checkpointing) for layer in layers)


class PartialCheckpointing(TrainerCallback):
    """Applies uncheckpoint_last_layers after the Trainer has turned checkpointing on (in train(),
    before on_train_begin)."""

    def __init__(self, n: int):
        self.n = n

    def on_train_begin(self, args, state, control, model=None, **kw):
        if model is not None:
            uncheckpoint_last_layers(model, self.n)


def checkpoint_callbacks(train: TrainSettings) -> list:
    """The callbacks a Trainer needs for these settings' checkpointing (none unless partial)."""
    return [PartialCheckpointing(train.uncheckpointed_layers)] if train.gradient_checkpointing and train.uncheckpointed_layers else []


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (synchronized), for tokens/s."""

    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kw):
        self._sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)


def library_versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "cuda": torch.version.cuda or "",
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}

