"""`qfit run`: plan, then fine-tune with the planned settings, and never lose progress to an OOM.

The order of a run, and why:
  1. options, output directory, model source and data are checked first: every user mistake is a
     one-line RunError / DataError / ProfileError before any model is loaded;
  2. the GPU is read through NVML (its FREE memory is what the plan may use), the plan comes from
     planner.search with the user's choices fixed, and is printed;
  3. the model is loaded through the real QLoRA path (planner.train.stack: from_pretrained with NF4 +
     double quant, prepare_model_for_kbit_training(use_gradient_checkpointing=False)), wrapped with
     LoRA, and trained by transformers' Trainer exactly as planned;
  4. on CUDA a fit probe runs one forward + backward at the planned micro-batch and the longest
     sequence first. An out-of-memory error, then or during training, halves the micro-batch and
     doubles gradient accumulation (the effective batch never changes) and training resumes from a
     checkpoint of the last finished step, so no step is lost;
  5. SIGINT / SIGTERM finish the current step, save a checkpoint and return; `--resume DIR` continues;
  6. the adapter (standard PEFT files), tokenizer, plan.json and run_report.json are written; on CUDA
     the measured peak is appended to the user's calibration data.

Module level is light (standard library and planner modules), so `qfit run --help` and option
errors are instant; torch, transformers, peft and bitsandbytes are imported inside the functions.
"""

from __future__ import annotations

import csv
import gc
import json
import math
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from planner import data as qdata
from planner.coefficients import load_coefficients, user_cache_dir
from planner.memory import cuda_context_bytes, resolve_targets
from planner.profiles import ProfileError, load_gpu, load_model, match_gpu_name
from planner.report import gib_str
from planner.search import DEFAULT_EFFECTIVE_BATCH, Request, compute_dtype_for, make_plan, search
from planner.specs import COMPUTE_DTYPES, OPTIMIZERS, GpuSpec, LoraSettings, ModelSpec, Plan, TrainSettings, settings_dict

RUN_CONFIG = "run_config.json"  # what --resume needs to continue the run (settings in effect, data, steps)
RUN_REPORT = "run_report.json"
PLAN_FILE = "plan.json"
CONFIG_VERSION = 1

# Training recipe defaults (QLoRA, Dettmers et al. 2023, github.com/artidoro/qlora: lr 2e-4 for
# 7B/13B, max_grad_norm 0.3, warmup_ratio 0.03); the schedule is cosine as `qfit run` promises.
DEFAULT_LEARNING_RATE = 2e-4
DEFAULT_WARMUP = 0.03  # below 1: a fraction of the steps (transformers 5 warmup_steps accepts a ratio)
MAX_GRAD_NORM = 0.3
SAVE_TOTAL_LIMIT = 2  # checkpoints kept (each: adapter + optimizer state, about 3x the adapter)
AUTO_SAVE_FRACTION = 10  # with no --save-steps: a checkpoint every tenth of the run...
AUTO_SAVE_MAX_STEPS = 500  # ...but at least every 500 steps
LOG_POINTS = 500  # about this many loss values logged per run
OOM_MESSAGE = "CUDA out of memory."
# "longest": each micro-batch padded to its longest row (the default); "max-length": every row padded to
# --seq-len, as classic recipes do with tokenizer(padding="max_length"): same memory, more computed tokens
PADDINGS = ("longest", "max-length")
# QFIT_EMULATE_GPU=t4: plan for that catalog GPU and cap torch's allocator to its memory (see _cap_for_emulation)
EMULATE_ENV = "QFIT_EMULATE_GPU"


class RunError(ValueError):
    """A problem the user can fix (options, output directory, model, fit): one line, says what to do."""


# --------------------------------------------------------------------------- options

@dataclass(frozen=True, slots=True)
class RunOptions:
    """What the user asked for; None means 'planned' or the default."""

    output: str
    model: str | None = None  # profile name, Hugging Face id, or local model directory
    dataset: str | None = None
    demo: bool = False
    overwrite: bool = False
    resume: bool = False  # continue the run saved in `output`
    epochs: float | None = None
    max_steps: int | None = None
    seq_len: int | None = None
    effective_batch: int | None = None
    batch_size: int | None = None  # micro-batch; None: planned
    plan_path: str | None = None
    rank: int | None = None
    alpha: int | None = None
    lora_dropout: float | None = None
    targets: tuple[str, ...] | None = None
    gradient_checkpointing: bool | None = None
    uncheckpointed_layers: int | None = None  # partial checkpointing (None: planned)
    optim: str | None = None
    compute_dtype: str | None = None
    fmt: str | None = None
    save_steps: int | None = None
    learning_rate: float | None = None
    warmup: float | None = None  # >= 1: steps; below 1: fraction of the steps
    padding: str | None = None  # PADDINGS; None: "longest"
    num_gpus: int | None = None  # > 1: planner.train.dist_run launches one process per GPU through accelerate
    strategy: str | None = None  # with num_gpus > 1: "ddp" or "fsdp"; None: DDP when it fits, else FSDP
    num_machines: int | None = None  # several nodes: every node runs the same command with its own machine_rank
    machine_rank: int | None = None
    main_process_ip: str | None = None  # machine 0's address (torchrun's static rendezvous)
    main_process_port: int | None = None
    dry_run: bool = False  # with --num-gpus: plan, write the launch files, print the command; do not train
    seed: int = 42
    progress: bool = True  # the tqdm bar (stderr)

    def __post_init__(self) -> None:
        for flag, value in (("--max-steps", self.max_steps), ("--seq-len", self.seq_len),
                            ("--effective-batch", self.effective_batch), ("--batch-size", self.batch_size),
                            ("--rank", self.rank), ("--alpha", self.alpha), ("--save-steps", self.save_steps)):
            if value is not None and value < 1:
                raise RunError(f"{flag} must be a positive integer, got {value}")
        if self.epochs is not None and self.epochs <= 0:
            raise RunError(f"--epochs must be positive, got {self.epochs}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise RunError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.lora_dropout is not None and not 0.0 <= self.lora_dropout < 1.0:
            raise RunError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.optim is not None and self.optim not in OPTIMIZERS:
            raise RunError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise RunError(f"--compute-dtype must be bf16 or fp16, got {self.compute_dtype!r}")
        if self.fmt is not None and self.fmt not in qdata.FORMATS:
            raise RunError(f"--format must be one of {', '.join(qdata.FORMATS)}, got {self.fmt!r}")
        if self.num_gpus is not None and self.num_gpus < 1:
            raise RunError(f"--num-gpus must be a positive integer, got {self.num_gpus}")
        if self.strategy is not None and self.strategy not in ("ddp", "fsdp"):
            raise RunError(f"--strategy must be ddp or fsdp, got {self.strategy!r}")
        if (self.num_machines or 1) > 1:
            if not self.num_gpus:
                raise RunError("--num-machines needs --num-gpus N (the GPUs of each machine)")
            if not self.main_process_ip:
                raise RunError("--num-machines needs --main-process-ip (the address of the machine with --machine-rank 0)")
            if self.machine_rank is None or not 0 <= self.machine_rank < self.num_machines:
                raise RunError(f"--machine-rank must be 0..{self.num_machines - 1} (this machine's index)")
        elif self.machine_rank or self.main_process_ip:
            raise RunError("--machine-rank and --main-process-ip go with --num-machines 2 or more")
        if self.dry_run and not self.num_gpus:
            raise RunError("--dry-run goes with --num-gpus: it writes the launch files and prints the command")
        if self.strategy is not None and (self.num_gpus or 1) < 2:
            raise RunError("--strategy needs --num-gpus 2 or more (one GPU needs no strategy)")
        if self.padding is not None and self.padding not in PADDINGS:
            raise RunError(f"--padding must be one of {', '.join(PADDINGS)}, got {self.padding!r}")
        if self.targets is not None and not self.targets:
            raise RunError("--targets must be attn, all-linear, or a comma list of module names")
        if self.epochs is not None and self.max_steps is not None:
            raise RunError("give --epochs or --max-steps, not both")
        if self.batch_size and self.effective_batch and self.effective_batch % self.batch_size:
            raise RunError(f"--effective-batch {self.effective_batch} is not a multiple of --batch-size {self.batch_size}")


# options that --resume takes from the saved run (giving them again would change the run midway)
RESUME_FIXED = ("model", "dataset", "demo", "epochs", "max_steps", "seq_len", "effective_batch", "batch_size",
                "plan_path", "rank", "alpha", "lora_dropout", "targets", "gradient_checkpointing", "optim",
                "compute_dtype", "fmt", "save_steps", "learning_rate", "warmup", "overwrite", "padding", "num_gpus",
                "strategy", "num_machines", "main_process_ip")


@dataclass(slots=True)
class RunResult:
    status: str  # "completed" or "interrupted"
    output_dir: Path
    report: dict
    exit_code: int = 0  # 0, or 128 + the signal number when stopped by SIGINT/SIGTERM
    checkpoint: str | None = None


# --------------------------------------------------------------------------- device

@dataclass(frozen=True, slots=True)
class Device:
    kind: str  # "cuda" or "cpu"
    name: str
    total_bytes: int
    free_bytes: int
    visible_count: int
    spec: GpuSpec  # what the plan is made for: memory_bytes is the FREE memory
    notes: tuple[str, ...] = ()
    emulated_on: str = ""  # with QFIT_EMULATE_GPU: the real GPU's name (spec, name and sizes are the emulated card's)


def _ram_bytes() -> tuple[int, int]:
    """(total, available) physical memory of this machine."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):  # not Linux
        return 0, 0


def _visible_nvml_indices(count: int) -> list[int]:
    """NVML numbers every GPU; CUDA_VISIBLE_DEVICES picks and reorders them for CUDA."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return list(range(count))
    out = []
    for part in env.split(","):
        part = part.strip()
        if not part.isdigit():  # UUIDs / MIG ids: NVML order unknown
            return []
        if int(part) < count:
            out.append(int(part))
    return out


def detect_device(multi: bool = False) -> Device:
    """The GPU to train on (NVML: name, total and FREE memory), or the CPU when CUDA is not available.

    With QFIT_EMULATE_GPU=<catalog GPU> (e.g. t4) the device is that GPU, emulated on the real one."""
    import torch

    emulate = os.environ.get(EMULATE_ENV, "").strip()
    emulated = _emulated_gpu(emulate) if emulate else None  # an unknown name fails on any machine
    if not torch.cuda.is_available():
        total, avail = _ram_bytes()
        spec = replace(GpuSpec.bare_capacity(avail or total, "cpu"), display_name="the CPU (no CUDA GPU)")
        ignored = (f"{EMULATE_ENV}={emulate} ignored: it needs a CUDA GPU to emulate on",) if emulated else ()
        return Device("cpu", "cpu", total, avail, 0, spec,
                      ("no CUDA GPU: CPU mode (fine for the demo and tests; memory figures are not measured)",) + ignored)
    from planner.hardware import detect_gpus

    notes = []
    count = torch.cuda.device_count()
    if count > 1 and not multi:
        notes.append(f"{count} GPUs visible: qfit run trains on one (CUDA device 0); "
                     "set CUDA_VISIBLE_DEVICES to choose which")
    gpus = detect_gpus()
    visible = _visible_nvml_indices(len(gpus))
    if gpus and visible:
        g = gpus[visible[0]]
        name, total, free = g["name"], g["total_bytes"], g["free_bytes"]
    else:  # no NVML: the CUDA runtime's view (this creates the CUDA context first)
        free, total = torch.cuda.mem_get_info(0)
        name = torch.cuda.get_device_name(0)
    if emulated is not None:
        return _emulated_device(emulated, name, free, count, notes)
    bf16 = bool(torch.cuda.is_bf16_supported())
    catalog = match_gpu_name(name)
    if catalog is not None:
        spec = replace(catalog, memory_bytes=free)
    else:
        spec = replace(GpuSpec.bare_capacity(free, name), display_name=name, bf16=bf16)
        notes.append(f"{name} is not in qfit's GPU catalog: planning by its free memory alone (no speed estimate)")
    if total - free > total // 100:
        notes.append(f"{gib_str(total - free)} GiB of the {gib_str(total)} GiB are in use by other processes: "
                     f"planning for the {gib_str(free)} GiB free")
    return Device("cuda", name, total, free, count, spec, tuple(notes))


# --- GPU emulation (QFIT_EMULATE_GPU): a smaller card's memory on a bigger GPU, for benchmarks and checks.
# Only memory is emulated: speed is the real GPU's.

def _emulated_gpu(name: str) -> GpuSpec:
    """The catalog GPU that QFIT_EMULATE_GPU names (whatever `--gpu` accepts: t4, 'Tesla T4', 16GiB)."""
    try:
        return load_gpu(name)
    except ProfileError as exc:
        raise RunError(f"{EMULATE_ENV}={name}: {exc}") from None


def _emulated_device(gpu: GpuSpec, real_name: str, real_free: int, count: int, notes: list[str]) -> Device:
    """The emulated card as if installed and empty: the plan gets all its memory and its bf16 flag (a T4
    computes in fp16); _cap_for_emulation holds torch to that memory before the model loads."""
    notes.append(f"{EMULATE_ENV}: emulating {gpu.display_name} ({gib_str(gpu.memory_bytes)} GiB"
                 f"{'' if gpu.bf16 else ', no bf16'}) on {real_name}: torch's allocator is capped to its memory less "
                 "the CUDA context and paged optimizer state; speed is the real GPU's")
    if real_free < gpu.memory_bytes:
        notes.append(f"only {gib_str(real_free)} GiB are free on {real_name}, less than the emulated {gpu.display_name}'s "
                     f"{gib_str(gpu.memory_bytes)} GiB")
    name = f"{gpu.display_name} (emulated on {real_name})"
    return Device("cuda", name, gpu.memory_bytes, gpu.memory_bytes, count, gpu, tuple(notes), emulated_on=real_name)


def emulation_budget(gpu: GpuSpec, plan: Plan) -> dict:
    """What torch's allocator may hold so that this process uses no more than `gpu` would have.

    budget = card memory - calibrated CUDA context - the plan's paged optimizer state: both live outside
    torch's allocator, so a cap on it does not see them (bitsandbytes' paged state is CUDA managed memory,
    which a big GPU never has to evict). The convention of planner/train/validate.py, and the planner's own:
    needs = smallest allocator budget + context + paged state. All ints, bytes."""
    context = cuda_context_bytes(load_coefficients(gpu.name))
    paged = plan.memory.paged_optimizer_state
    return {"gpu": gpu.name, "display_name": gpu.display_name, "memory_bytes": gpu.memory_bytes,
            "cuda_context_bytes": context, "paged_optimizer_bytes": paged,
            "budget_bytes": gpu.memory_bytes - context - paged}


def _cap_for_emulation(device: Device, plan: Plan, echo) -> dict:
    """With QFIT_EMULATE_GPU, before the model loads: torch.cuda.set_per_process_memory_fraction(budget / the
    real GPU's total), so that going past the emulated card raises the usual CUDA out-of-memory error (which the
    back-off handles as on a real card). -> the emulation record for run_report.json ({} without emulation)."""
    if not device.emulated_on:
        return {}
    import torch

    emu = emulation_budget(device.spec, plan)
    total = torch.cuda.get_device_properties(0).total_memory  # the allocator's fraction is of this total
    budget = emu["budget_bytes"]
    if not 0 < budget <= total:
        raise RunError(f"{EMULATE_ENV}: cannot emulate {device.spec.display_name} on {device.emulated_on} (allocator "
                       f"budget {gib_str(budget)} GiB, the GPU has {gib_str(total)} GiB): choose a smaller card")
    torch.cuda.set_per_process_memory_fraction(budget / total, 0)
    echo(f"emulation: torch's allocator capped at {gib_str(budget)} GiB of {device.emulated_on}'s {gib_str(total)} GiB "
         f"({device.spec.display_name} {gib_str(emu['memory_bytes'])} GiB - CUDA context "
         f"{gib_str(emu['cuda_context_bytes'])} - paged optimizer state {gib_str(emu['paged_optimizer_bytes'])})")
    return {**emu, "emulated_on": device.emulated_on, "real_total_bytes": total, "fraction": budget / total}


def set_alloc_conf(expandable: bool) -> str | None:
    """PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True when the plan assumes it (the calibrated allocator
    reserve depends on it). Read when CUDA initialises, so this runs before anything touches the GPU.
    A value the user set is kept; -> a note when it differs from what the plan assumed."""
    import torch

    if not torch.cuda.is_available():  # (does not initialise CUDA)
        return None
    current = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if current is None:
        if expandable:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        return None
    if expandable != ("expandable_segments:True" in current):
        return (f"PYTORCH_CUDA_ALLOC_CONF={current} kept; the plan assumed expandable segments "
                f"{'on' if expandable else 'off'}, so the allocator reserve may differ from the prediction")
    return None


# --------------------------------------------------------------------------- model source

@dataclass(frozen=True, slots=True)
class ModelSource:
    spec: ModelSpec
    ref: str  # what from_pretrained gets: a local directory or a Hugging Face id
    local: bool


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_config(hf_id: str) -> str:
    """config.json of a Hub model from the local cache, or downloaded when online. -> local path."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(hf_id, "config.json")
    if isinstance(cached, str):
        return cached
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        raise RunError(f"{hf_id} is not in the local Hugging Face cache and the Hub is offline (HF_HUB_OFFLINE): "
                       f"download it first (huggingface-cli download {hf_id}) or pass a local model directory")
    try:
        return hf_hub_download(hf_id, "config.json")
    except Exception as exc:  # network, auth (gated), unknown repo: huggingface_hub raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"cannot get {hf_id} from the Hugging Face Hub ({first[:160]}): check the id, the network "
                       "and access (gated models need `huggingface-cli login`), or pass a local model directory") from None


def resolve_model(name: str) -> ModelSource:
    """A local model directory, a profile name (`qfit models`), or a Hugging Face id."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RunError(f"{name} has no config.json: pass a model directory saved with save_pretrained")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise RunError(f"{name} has a config.json but no weights (*.safetensors or *.bin)")
        try:
            spec = load_model(str(path))
        except ProfileError as exc:
            raise RunError(str(exc)) from None
        return ModelSource(spec, str(path.resolve()), True)
    try:
        spec = load_model(name)
        hf_id = spec.hf_id
    except ProfileError:
        if "/" not in name or name.startswith((".", "/", "~")):
            raise
        hf_id, spec = name, None
    if not hf_id:
        raise RunError(f"{name} has no Hugging Face id to load weights from: use --demo for the tiny demo model, "
                       "or pass a local model directory")
    config = _hub_config(hf_id)
    if spec is None:
        try:
            spec = load_model(config)
        except ProfileError as exc:
            raise RunError(str(exc)) from None
    return ModelSource(spec, hf_id, False)


# --------------------------------------------------------------------------- output directory

def last_checkpoint(output: Path) -> Path | None:
    """The newest complete Trainer checkpoint (trainer_state.json and adapter weights written)."""
    best = None
    for p in output.glob("checkpoint-*"):
        step = p.name.rsplit("-", 1)[-1]
        if not (step.isdigit() and (p / "trainer_state.json").is_file()):
            continue
        if not any((p / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            continue
        if best is None or int(step) > int(best.name.rsplit("-", 1)[-1]):
            best = p
    return best


def check_output(opts: RunOptions) -> Path:
    """Refuse an output directory in use (before anything slow happens); nothing is deleted here."""
    out = Path(opts.output).expanduser()
    if opts.resume:
        if not (out / RUN_CONFIG).is_file():
            raise RunError(f"nothing to resume in {out}: no {RUN_CONFIG} (start a run with --output {out})")
        if last_checkpoint(out) is None:
            raise RunError(f"{out} has no checkpoint to resume from (one is saved every --save-steps steps and on "
                           "Ctrl-C/SIGTERM): start again with --overwrite")
        return out
    if out.exists() and not out.is_dir():
        raise RunError(f"--output {out} is a file: pass a directory")
    if out.is_dir() and any(out.iterdir()):
        if not opts.overwrite:
            raise RunError(f"{out} exists and is not empty: pass --overwrite to replace it, "
                           f"or --resume {out} to continue the run in it")
        if not ((out / RUN_CONFIG).is_file() or (out / RUN_REPORT).is_file()):
            raise RunError(f"{out} was not written by qfit run, so --overwrite will not delete it: choose another --output")
    return out


def prepare_output(opts: RunOptions) -> Path:
    """check_output, then (new runs) replace an earlier qfit run there with --overwrite and create the directory."""
    out = check_output(opts)
    if not opts.resume and opts.overwrite and out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# --------------------------------------------------------------------------- planning

def read_plan_file(path: str) -> dict:
    """A plan saved by `qfit plan --save` ({"model", "gpu", "settings": {...}, ...})."""
    try:
        doc = json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        raise RunError(f"no such plan file: {path} (write one with `qfit plan MODEL --save {path}`)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"cannot read the plan {path}: {exc}") from None
    settings = doc.get("settings") if isinstance(doc, dict) else None
    need = ("batch_size", "grad_accum", "seq_len", "rank", "targets", "optim", "compute_dtype")
    if not isinstance(settings, dict) or any(k not in settings for k in need):
        raise RunError(f"{path} is not a plan saved by `qfit plan --save` (no settings with {', '.join(need)})")
    return doc


def build_request(opts: RunOptions, plan_doc: dict | None, seq_len: int) -> tuple[Request, list[str]]:
    """The planner request: the saved plan's settings (if any), then what the user gave on top."""
    notes = []
    base: dict = {}
    if plan_doc:
        s = plan_doc["settings"]
        targets = s["targets"] if isinstance(s["targets"], list) else [s["targets"]]
        base = dict(batch_size=s["batch_size"], grad_accum=s["grad_accum"], rank=s["rank"], alpha=s.get("alpha"),
                    lora_dropout=s.get("lora_dropout", 0.05), targets=tuple(targets),
                    gradient_checkpointing=s.get("gradient_checkpointing"),
                    uncheckpointed_layers=s.get("uncheckpointed_layers", 0), optim=s["optim"],
                    compute_dtype=s["compute_dtype"], double_quant=s.get("double_quant", True),
                    expandable_segments=s.get("expandable_segments", True))
    given = {k: getattr(opts, k) for k in ("rank", "alpha", "lora_dropout", "targets", "gradient_checkpointing",
                                           "uncheckpointed_layers", "optim", "compute_dtype")
             if getattr(opts, k) is not None}
    if plan_doc and (given or opts.effective_batch or (opts.seq_len and opts.seq_len != plan_doc["settings"]["seq_len"])):
        # the saved micro-batch was fitted to the saved settings: let the planner fit it again
        eff = base.pop("batch_size") * base.pop("grad_accum")
        base["effective_batch"] = eff
        notes.append("options given on top of --plan: the micro-batch is planned again (effective batch kept)")
        base.pop("uncheckpointed_layers", None)  # fitted with the micro-batch
    base.update(given)
    if opts.effective_batch:
        base["effective_batch"] = opts.effective_batch
        base.pop("batch_size", None)
        base.pop("grad_accum", None)
    if opts.batch_size:
        base["batch_size"] = opts.batch_size
        base.pop("grad_accum", None)
        base.setdefault("effective_batch", max(opts.batch_size, DEFAULT_EFFECTIVE_BATCH))
    base["seq_len"] = seq_len
    if base.get("uncheckpointed_layers") and base.get("gradient_checkpointing") is None:
        base["gradient_checkpointing"] = True  # leaving some layers uncheckpointed means checkpointing the others
    if base.get("lora_dropout") is None:
        base.pop("lora_dropout", None)
    return Request(**base), notes


def plan_run(spec: ModelSpec, device: Device, req: Request) -> tuple[Plan, list[str]]:
    """The planner's best plan for this device, or a RunError saying by how much nothing fits."""
    coeffs = load_coefficients(device.spec.name if device.kind == "cuda" else None)
    try:
        result = search(spec, device.spec, req, coeffs)
    except ValueError as exc:  # a bad --targets name, an invalid combination
        raise RunError(str(exc)) from None
    notes = list(result.notes)
    if result.best is None:
        low = min(result.plans, key=lambda p: p.memory.needs_bytes)
        raise RunError(f"{spec.display_name} does not fit: the smallest configuration (micro-batch "
                       f"{low.train.batch_size}, seq {low.train.seq_len}, r{low.lora.rank}) needs "
                       f"{gib_str(low.memory.needs_bytes)} GiB and {device.spec.display_name} has "
                       f"{gib_str(device.spec.memory_bytes)} GiB free: try a shorter --seq-len, --gradient-checkpointing, "
                       f"a lower --rank or a smaller model (`qfit plan {spec.name}` shows the breakdown)")
    best = result.best
    if device.kind == "cpu":
        # no speed model for a CPU: fewer, larger micro-batches without recompute run fastest
        same = [p for p in result.fitting if p.lora == best.lora and p.train.seq_len == best.train.seq_len]
        best = min(same, key=lambda p: (p.train.gradient_checkpointing, -p.train.batch_size,
                                        p.train.optim != "adamw_torch"))
    return best, notes


def plan_lines(plan: Plan, device: Device) -> list[str]:
    from planner.report import breakdown_table, settings_line

    speed = f"est. {plan.tokens_per_s:,.0f} tokens/s" if plan.tokens_per_s else "no speed estimate for this device"
    lines = [f"plan: {plan.model.display_name} on {device.spec.display_name}",
             "      " + settings_line(plan), "      " + speed, "", breakdown_table(plan)]
    if device.kind == "cpu":
        lines.append("(the table is the CUDA memory model; a CPU run does not use GPU memory)")
    return lines


# --------------------------------------------------------------------------- small pure helpers

def backoff(batch_size: int, grad_accum: int) -> tuple[int, int]:
    """After an OOM: the micro-batch divided by its smallest prime factor (halved when even) and the
    accumulation multiplied by it, so batch_size * grad_accum (the effective batch) is unchanged."""
    if batch_size < 2:
        raise ValueError("micro-batch 1 cannot be reduced")
    p = next(d for d in range(2, batch_size + 1) if batch_size % d == 0)
    return batch_size // p, grad_accum * p


def is_cuda_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError, or a RuntimeError carrying the CUDA allocator's message."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and OOM_MESSAGE in str(exc)


def planned_steps(num_examples: int, effective_batch: int, epochs: float | None, max_steps: int | None) -> int:
    """Optimizer steps of the run: --max-steps, or epochs x ceil(examples / effective batch)."""
    if max_steps:
        return max_steps
    return max(1, math.ceil((epochs or 1.0) * math.ceil(num_examples / effective_batch)))


def auto_save_steps(total_steps: int) -> int:
    return max(1, min(AUTO_SAVE_MAX_STEPS, math.ceil(total_steps / AUTO_SAVE_FRACTION)))


def load_snippet(base_ref: str, adapter_dir: Path, compute_dtype: str) -> str:
    torch_dtype = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}[compute_dtype]
    return "\n".join([
        "import torch",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig",
        "",
        "bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\", bnb_4bit_use_double_quant=True,",
        f"                         bnb_4bit_compute_dtype={torch_dtype})",
        f"base = AutoModelForCausalLM.from_pretrained({base_ref!r}, quantization_config=bnb)",
        f"model = PeftModel.from_pretrained(base, {str(adapter_dir)!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({str(adapter_dir)!r})",
    ])


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _fingerprint(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        return {"source": path}
    st = p.stat()
    return {"source": str(p.resolve()), "size_bytes": st.st_size, "mtime": int(st.st_mtime)}


# --------------------------------------------------------------------------- signals

class StopFlag:
    """SIGINT/SIGTERM set this; training stops after the current optimizer step, with a checkpoint.
    A second SIGINT raises KeyboardInterrupt at once (the user insists)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


# --------------------------------------------------------------------------- the run

@dataclass(slots=True)
class _State:
    """What changes during a run (the settings in effect, OOM events, measurements)."""

    train: TrainSettings
    oom_events: list = field(default_factory=list)
    measured: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    emulation: dict = field(default_factory=dict)  # QFIT_EMULATE_GPU: the card and the allocator budget


def run(opts: RunOptions, echo: Callable[[str], None] = print, callbacks: tuple = ()) -> RunResult:
    """Plan and train. `callbacks` are extra transformers TrainerCallbacks (tests inject faults with them).

    Raises RunError, DataError or ProfileError (all ValueError) for anything the user can fix."""
    if opts.resume:
        opts, saved = _resume_options(opts)
    else:
        saved = None
        _check_new_run(opts)
        if opts.demo:
            from planner.demo import DEMO_RUN

            opts = replace(opts, max_steps=opts.max_steps or (None if opts.epochs else DEMO_RUN["max_steps"]),
                           effective_batch=opts.effective_batch or DEMO_RUN["effective_batch"],
                           learning_rate=opts.learning_rate or DEMO_RUN["learning_rate"],
                           warmup=DEMO_RUN["warmup"] if opts.warmup is None else opts.warmup)
    check_output(opts)
    if opts.strategy == "fsdp":  # before the data is read: accelerate runs FSDP on GPUs only
        import torch

        if not torch.cuda.is_available():
            raise RunError("--strategy fsdp needs CUDA GPUs (accelerate runs FSDP on GPUs only); use --strategy ddp on the CPU")

    # --- model source and data: all checks before any model is loaded
    plan_doc = read_plan_file(opts.plan_path) if opts.plan_path and not opts.resume else None
    if opts.demo:
        from planner import demo

        spec = load_model(demo.MODEL_PROFILE)
        _check_against_model(opts, spec)
        src = ModelSource(spec, str(demo.prepare()), True)  # built on first use, then cached
        dataset = str(demo.DATA_FILE)
    else:
        src = resolve_model(opts.model or plan_doc["model"])
        if plan_doc:
            _check_plan_model(plan_doc, src.spec, opts.plan_path)
        _check_against_model(opts, src.spec)
        dataset = opts.dataset
    rows, fmt = qdata.load_rows(dataset, opts.fmt)
    tokenizer = _load_tokenizer(src)
    examples, data_notes = qdata.tokenize_rows(rows, fmt, tokenizer)
    lengths = [len(e) for e in examples]
    stats = qdata.length_stats(lengths)
    max_pos = src.spec.max_position_embeddings
    if opts.seq_len:
        seq_len, seq_from = opts.seq_len, "the saved run" if opts.resume else "--seq-len"
    elif plan_doc:
        seq_len, seq_from = int(plan_doc["settings"]["seq_len"]), "the plan"
    else:
        seq_len, seq_from = qdata.choose_seq_len(stats, max_pos), "chosen from the data"
    if seq_len > max_pos:
        raise RunError(f"--seq-len {seq_len} exceeds {src.spec.display_name}'s max_position_embeddings ({max_pos})")
    examples, dropped = qdata.truncate(examples, seq_len)
    if not examples:
        raise qdata.DataError(f"no example has a response within the first {seq_len} tokens: raise --seq-len")
    trunc = qdata.truncation_rate(lengths, seq_len)
    echo(f"data: {len(rows)} rows ({fmt}) from {Path(dataset).name}; tokens per row min {stats.min} / median "
         f"{stats.median} / p95 {stats.p95} / max {stats.max}")
    echo(f"      seq {seq_len} ({seq_from}): {trunc:.1%} of rows truncated"
         + (f", {dropped} dropped (no response left)" if dropped else "")
         + (f"; every row is padded to {seq_len} tokens (--padding max-length)" if opts.padding == "max-length"
            else f"; micro-batches are padded to their longest row (at most {seq_len})"))
    for n in data_notes:
        echo(f"      note: {n}")
    if ((saved or {}).get("num_gpus") or opts.num_gpus or 1) > 1 or (opts.num_machines or 1) > 1:  # planner.train.dist_run
        from planner.train.dist_run import run_multi

        info = {"source": str(Path(dataset).resolve()) if Path(dataset).exists() else dataset, "format": fmt,
                "rows": len(rows), "examples": len(examples), "dropped_rows": dropped, "lengths": stats.as_dict(),
                "seq_len": seq_len, "seq_len_from": seq_from, "truncation_rate": round(trunc, 4), "notes": data_notes}
        return run_multi(opts, saved, plan_doc, src, dataset, fmt, seq_len, len(examples), info, echo)

    # --- device and plan
    settings = (saved or plan_doc or {}).get("settings", {})
    alloc_note = set_alloc_conf(settings.get("expandable_segments", True))  # before CUDA is initialised
    device = detect_device()
    for n in device.notes + ((alloc_note,) if alloc_note else ()):
        echo(f"note: {n}")
    if saved is not None:
        lora, train = _saved_settings(saved)
        dtype, dtype_note = compute_dtype_for(device.spec, train.compute_dtype)
        train = replace(train, compute_dtype=dtype)
        coeffs = load_coefficients(device.spec.name if device.kind == "cuda" else None)
        plan = make_plan(src.spec, device.spec, lora, train, coeffs)
        plan_notes = ["resuming with the run's saved settings (micro-batch as after any out-of-memory back-off)"]
        plan_notes += [dtype_note] if dtype_note else []
        if not plan.fits:
            plan_notes.append(f"these settings are predicted not to fit {device.spec.display_name}; "
                              "the out-of-memory guard will reduce the micro-batch if needed")
    else:
        req, req_notes = build_request(opts, plan_doc, seq_len)
        plan, plan_notes = plan_run(src.spec, device, req)
        plan_notes = req_notes + plan_notes
    for n in plan_notes:
        echo(f"note: {n}")
    for line in plan_lines(plan, device):
        echo(line)

    total_steps = saved["max_steps"] if saved else planned_steps(len(examples), plan.train.effective_batch,
                                                                opts.epochs, opts.max_steps)
    save_steps = opts.save_steps or auto_save_steps(total_steps)
    out = prepare_output(opts)
    config = saved or {
        "version": CONFIG_VERSION, "model": src.ref, "model_name": src.spec.name, "demo": opts.demo,
        "dataset": _fingerprint(dataset), "format": fmt, "seq_len": seq_len, "padding": opts.padding or "longest",
        "max_steps": total_steps,
        "learning_rate": opts.learning_rate or DEFAULT_LEARNING_RATE, "warmup": opts.warmup if opts.warmup is not None
        else DEFAULT_WARMUP, "save_steps": save_steps, "seed": opts.seed,
        "settings": settings_dict(plan.lora, plan.train, resolve_targets(src.spec, plan.lora.targets)),
    }
    if saved and _fingerprint(dataset) != saved.get("dataset"):
        echo(f"warning: {Path(dataset).name} changed since the run started (size or time): the data order may differ")
    _write_json(out / RUN_CONFIG, config)
    if not opts.resume:
        from planner.report import plan_json

        _write_json(out / PLAN_FILE, _plan_doc(plan, src.spec, device, plan_json))
    return _train(opts, out, src, tokenizer, examples, plan, device, config,
                  {"source": str(Path(dataset).resolve()) if Path(dataset).exists() else dataset, "format": fmt,
                   "rows": len(rows), "examples": len(examples), "dropped_rows": dropped,
                   "lengths": stats.as_dict(), "seq_len": seq_len, "seq_len_from": seq_from,
                   "truncation_rate": round(trunc, 4), "notes": data_notes},
                  echo, callbacks)


def _check_new_run(opts: RunOptions) -> None:
    if opts.demo:
        if opts.model or opts.dataset or opts.plan_path:
            raise RunError("--demo brings its own model and data: drop MODEL, --dataset and --plan")
        return
    if not opts.model and not opts.plan_path:
        raise RunError("name a MODEL (a profile such as mistral-7b, a Hugging Face id or a local directory), "
                       "or use --demo")
    if not opts.dataset:
        raise RunError("--dataset is required (a .json, .jsonl, .csv or .parquet file), or use --demo")


def _check_against_model(opts: RunOptions, spec: ModelSpec) -> None:
    """Options that only make sense for some models, checked before the data is read."""
    if opts.targets:
        try:
            resolve_targets(spec, opts.targets)
        except ValueError as exc:
            raise RunError(str(exc)) from None
    if opts.seq_len and opts.seq_len > spec.max_position_embeddings:
        raise RunError(f"--seq-len {opts.seq_len} exceeds {spec.display_name}'s max_position_embeddings "
                       f"({spec.max_position_embeddings})")
    if opts.uncheckpointed_layers:
        if opts.gradient_checkpointing is False:
            raise RunError("--uncheckpointed-layers needs checkpointing: drop --no-gradient-checkpointing")
        if opts.uncheckpointed_layers >= spec.num_hidden_layers:
            raise RunError(f"--uncheckpointed-layers {opts.uncheckpointed_layers}: {spec.display_name} has "
                           f"{spec.num_hidden_layers} decoder layers; for none checkpointed use --no-gradient-checkpointing")
        if (opts.num_gpus or 1) > 1:
            raise RunError("--uncheckpointed-layers plans one GPU: drop it with --num-gpus")


def _check_plan_model(plan_doc: dict, spec: ModelSpec, plan_path: str) -> None:
    """The saved plan must be for this architecture (a local copy of the same model is fine)."""
    try:
        planned = load_model(str(plan_doc.get("model")))
    except ProfileError:
        return  # a plan for a local model directory: nothing to compare against
    facts = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
    if any(getattr(planned, f) != getattr(spec, f) for f in facts):
        raise RunError(f"the plan {plan_path} is for {planned.name}, not {spec.display_name}: "
                       "pass the plan's model or drop --plan")


def _resume_options(opts: RunOptions) -> tuple[RunOptions, dict]:
    """--resume DIR: the saved run's options (given options must not change the run midway)."""
    given = [k for k in RESUME_FIXED if getattr(opts, k) not in (None, False)]
    if given:
        flags = ", ".join("--" + k.replace("_", "-").replace("fmt", "format").replace("plan-path", "plan")
                          for k in given)
        raise RunError(f"--resume continues a run with its saved settings: drop {flags}")
    path = Path(opts.output).expanduser() / RUN_CONFIG
    if not path.is_file():
        raise RunError(f"nothing to resume in {opts.output}: no {RUN_CONFIG} (start a run with --output {opts.output})")
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"cannot read {path}: {exc}") from None
    if saved.get("version") != CONFIG_VERSION:
        raise RunError(f"{path} was written by another qfit version: start again with --overwrite")
    report = Path(opts.output).expanduser() / RUN_REPORT
    if report.is_file():
        try:
            done = json.loads(report.read_text())
        except (OSError, json.JSONDecodeError):
            done = {}
        if done.get("status") == "completed":
            raise RunError(f"the run in {opts.output} is complete ({done['steps']['completed']} steps): "
                           "start a new one with another --output")
    dataset = saved["dataset"]["source"]
    restored = replace(opts, model=None if saved["demo"] else saved["model"], demo=saved["demo"],
                       dataset=None if saved["demo"] else dataset, fmt=saved["format"], seq_len=saved["seq_len"],
                       max_steps=saved["max_steps"], learning_rate=saved["learning_rate"], warmup=saved["warmup"],
                       save_steps=saved["save_steps"], seed=saved["seed"],
                       padding=saved.get("padding", "longest"))  # (runs saved before --padding existed: longest)
    return restored, saved


def _saved_settings(saved: dict) -> tuple[LoraSettings, TrainSettings]:
    s = saved["settings"]
    lora = LoraSettings(rank=s["rank"], alpha=s["alpha"], dropout=s["lora_dropout"], targets=tuple(s["targets"]))
    train = TrainSettings(batch_size=s["batch_size"], grad_accum=s["grad_accum"], seq_len=s["seq_len"],
                          gradient_checkpointing=s["gradient_checkpointing"], optim=s["optim"],
                          compute_dtype=s["compute_dtype"], double_quant=s["double_quant"],
                          expandable_segments=s["expandable_segments"],
                          uncheckpointed_layers=s.get("uncheckpointed_layers", 0))  # runs saved before it existed: 0
    return lora, train


def _plan_doc(plan: Plan, spec: ModelSpec, device: Device, plan_json) -> dict:
    """plan.json in the `qfit plan --save` layout (usable with --plan), plus the device it was made for."""
    from planner.search import SearchResult

    coeffs = load_coefficients(device.spec.name if device.kind == "cuda" else None)
    doc = plan_json(SearchResult(plans=(plan,), best=plan if plan.fits else None, notes=()), spec, coeffs)
    doc["device"] = {"kind": device.kind, "name": device.name, "total_bytes": device.total_bytes,
                     "free_bytes": device.free_bytes}
    return doc


def _load_tokenizer(src: ModelSource):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.ref)
    except Exception as exc:  # OSError (missing files), ValueError (unknown class), ...
        raise RunError(f"cannot load the tokenizer of {src.ref} ({_one_line(exc, 160)}): "
                       "the model directory needs its tokenizer files") from None
    if tok.pad_token_id is None:  # padding is masked out of the loss, so any existing token will do
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token_id is None:
        raise RunError(f"the tokenizer of {src.ref} has no pad, eos or unk token to pad micro-batches with")
    tok.padding_side = "right"
    return tok


# --------------------------------------------------------------------------- training (heavy)

def _train(opts, out: Path, src: ModelSource, tokenizer, examples, plan: Plan, device: Device, config: dict,
           data_info: dict, echo, callbacks) -> RunResult:
    import torch
    from peft import get_peft_model
    from transformers.utils import logging as hf_logging

    from planner.train import stack

    cuda = device.kind == "cuda"
    state = _State(train=plan.train)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # qfit prints its own progress; the Trainer's info lines are noise here
    t_load = time.perf_counter()
    try:
        if cuda:
            from planner.train.harness import nvml_used

            state.measured["nvml_baseline_bytes"] = _safe(lambda: nvml_used()[0])
            torch.cuda.reset_peak_memory_stats()
            state.emulation = _cap_for_emulation(device, plan, echo)  # before the load: the load must fit too
        try:
            model = stack.load_4bit(src.ref, plan.train.compute_dtype, plan.train.double_quant,
                                    device_map={"": 0} if cuda else None)
        except (OSError, ValueError) as exc:
            raise RunError(f"cannot load {src.ref} in 4-bit ({_one_line(exc, 160)})") from None
        if cuda:
            state.measured["load_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            state.measured["after_load_allocated_bytes"] = torch.cuda.memory_allocated()
        names = resolve_targets(src.spec, plan.lora.targets)
        with warnings.catch_warnings():  # peft reads the deprecated is_gradient_checkpointing (transformers 5)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, stack.lora_config(plan.lora, names))
        if cuda:
            state.measured["after_wrap_allocated_bytes"] = torch.cuda.memory_allocated()
        echo(f"loaded {src.spec.display_name} in 4-bit (NF4{', double quant' if plan.train.double_quant else ''}) "
             f"with LoRA on {', '.join(names)} in {time.perf_counter() - t_load:.1f} s")
        dataset = _ExampleDataset(examples)
        collator = PadCollator(tokenizer.pad_token_id,
                               pad_to=config["seq_len"] if config.get("padding") == "max-length" else None)
        ckpt = last_checkpoint(out) if opts.resume else None
        if ckpt is not None:
            echo(f"resuming from {ckpt.name} (step {int(ckpt.name.rsplit('-', 1)[-1])} of {config['max_steps']})")
        elif cuda:
            _fit_probe(model, state, src.spec.vocab_size, echo)
        return _train_loop(opts, out, src, tokenizer, model, dataset, collator, plan, device, config, data_info,
                           state, ckpt, echo, callbacks)
    finally:
        hf_logging.set_verbosity(verbosity)
        if state.emulation:  # the cap is per process: lift it for whatever this process does next
            torch.cuda.set_per_process_memory_fraction(1.0, 0)


def _safe(fn, default=0):
    try:
        return fn()
    except Exception:  # measurement extras (NVML) must never fail a run
        return default


class _ExampleDataset:
    """Tokenized examples for the Trainer (map-style: __len__ and __getitem__)."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "labels": ex.labels}


class PadCollator:
    """Pads each micro-batch to its longest row, or with pad_to every row to pad_to tokens (right padding;
    labels -100 and attention mask 0 on padding), and counts the padded tokens (what the device computed)
    and the longest micro-batch it produced."""

    def __init__(self, pad_id: int, pad_to: int | None = None):
        self.pad_id = pad_id
        self.pad_to = pad_to  # --padding max-length: --seq-len (rows are already truncated to it)
        self.tokens = 0
        self.padded_tokens = 0
        self.longest = 0

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        n = max(max(len(b["input_ids"]) for b in batch), self.pad_to or 0)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), qdata.IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.tensor(b["labels"], dtype=torch.long)
            mask[i, :k] = 1
        self.tokens += int(mask.sum())
        self.padded_tokens += len(batch) * n
        self.longest = max(self.longest, n)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _free_cuda() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fit_probe(model, state: _State, vocab_size: int, echo, device: str = "cuda") -> None:
    """One forward + backward at the planned micro-batch and the full sequence length (the worst
    micro-batch the data can produce), before any step: an OOM here reduces the micro-batch at once."""
    import torch

    from planner.train.stack import TORCH_DTYPES, uncheckpoint_last_layers

    cuda = device == "cuda"
    model.train()  # from_pretrained returns eval mode, where checkpointing and dropout are off
    while True:
        t = state.train
        if t.gradient_checkpointing:
            # transformers 5.x renamed gradient_checkpointing_enable -> activation_checkpointing_enable (5.17 has
            # only the old name, 5.24 both): the one this install has
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
            uncheckpoint_last_layers(model, t.uncheckpointed_layers)
        oom = None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            ids = torch.randint(3, vocab_size, (t.batch_size, t.seq_len), device=device)
            with torch.autocast(device, dtype=TORCH_DTYPES[t.compute_dtype]):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            del loss, ids
        except Exception as exc:
            if not is_cuda_oom(exc):
                raise
            oom = _one_line(exc)
        model.zero_grad(set_to_none=True)
        _free_cuda()
        if oom is None:
            peak = torch.cuda.max_memory_allocated() if cuda else 0
            state.measured["probe_peak_allocated_bytes"] = peak
            state.measured["probe_peak_reserved_bytes"] = torch.cuda.max_memory_reserved() if cuda else 0
            echo(f"fit probe: micro-batch {t.batch_size} x {t.seq_len} tokens ran"
                 + (f", peak {gib_str(peak)} GiB allocated" if cuda else ""))
            return
        _record_backoff(state, step=0, phase="probe", message=oom, checkpoint=None, echo=echo)


def _record_backoff(state: _State, step: int, phase: str, message: str, checkpoint: str | None, echo) -> None:
    t = state.train
    where = f"resuming from {Path(checkpoint).name}" if checkpoint else "starting from step 1"
    if t.gradient_checkpointing and t.uncheckpointed_layers:
        # partial checkpointing first: checkpoint every layer again before the micro-batch shrinks
        state.oom_events.append({"phase": phase, "step": step + 1, "message": message,
                                 "micro_batch_before": t.batch_size, "grad_accum_before": t.grad_accum,
                                 "micro_batch_after": t.batch_size, "grad_accum_after": t.grad_accum,
                                 "uncheckpointed_layers_before": t.uncheckpointed_layers,
                                 "uncheckpointed_layers_after": 0, "resumed_from": checkpoint})
        state.train = replace(t, uncheckpointed_layers=0)
        echo(f"out of memory ({phase}, step {step + 1}) with {t.uncheckpointed_layers} layers uncheckpointed: "
             f"now every layer is checkpointed (micro-batch {t.batch_size} kept), {where}; no step lost")
        return
    if t.batch_size < 2:
        raise RunError(f"out of memory at micro-batch 1 x {t.seq_len} tokens ({phase}, step {step + 1}): "
                       "try --gradient-checkpointing, a shorter --seq-len, a lower --rank or a smaller model")
    mb, accum = backoff(t.batch_size, t.grad_accum)
    state.oom_events.append({"phase": phase, "step": step + 1, "message": message,
                             "micro_batch_before": t.batch_size, "grad_accum_before": t.grad_accum,
                             "micro_batch_after": mb, "grad_accum_after": accum, "resumed_from": checkpoint})
    state.train = replace(t, batch_size=mb, grad_accum=accum)
    echo(f"out of memory ({phase}, step {step + 1}) at micro-batch {t.batch_size}: now micro-batch {mb} x "
         f"accumulation {accum} (effective batch {mb * accum} unchanged), {where}; no step lost")


def _trainer(model, tokenizer, dataset, collator, out: Path, train: TrainSettings, config: dict, cbs: list):
    import importlib.util

    from transformers import PrinterCallback, Trainer

    from planner.train import stack

    total = config["max_steps"]
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    args = stack.training_arguments(
        str(out), train, max_steps=total, learning_rate=config["learning_rate"], lr_scheduler_type="cosine",
        warmup_steps=config["warmup"], max_grad_norm=MAX_GRAD_NORM, save_strategy="steps",
        save_steps=config["save_steps"], save_total_limit=SAVE_TOTAL_LIMIT, logging_strategy="steps",
        logging_steps=max(1, total // LOG_POINTS), report_to=["tensorboard"] if tensorboard else [],
        seed=config["seed"], disable_tqdm=True, include_num_input_tokens_seen="non_padding")
    if args.n_gpu > 1:
        args._n_gpu = 1  # one GPU: otherwise the Trainer multiplies the micro-batch by the GPU count
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      processing_class=tokenizer, callbacks=[*cbs, *stack.checkpoint_callbacks(train)])
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; qfit's own bar shows the loss
    return trainer


def _emergency_checkpoint(trainer, out: Path) -> str | None:
    """After an OOM: the optimizer state is that of the last finished step (the failed step's partial
    gradients are dropped), so saving now loses nothing. Falls back to the last periodic checkpoint."""
    step = trainer.state.global_step
    path = out / f"checkpoint-{step}"
    if step > 0 and not (path / "trainer_state.json").is_file():
        try:
            trainer._save_checkpoint(trainer.model, trial=None)  # the Trainer's own save: resumable as usual
        except Exception:  # still short of memory, disk full: use the last periodic checkpoint
            pass
    ckpt = last_checkpoint(out)
    return str(ckpt) if ckpt is not None else None


def _train_loop(opts, out, src, tokenizer, model, dataset, collator, plan, device, config, data_info, state,
                ckpt, echo, callbacks) -> RunResult:
    import torch

    cuda = device.kind == "cuda"
    stop_cls, progress_cls = callback_classes()
    stop = StopFlag()
    installed = stop.install()
    progress = progress_cls(collator, cuda, opts.progress)
    initial = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    resume_from = str(ckpt) if ckpt is not None else None
    resumed_from = resume_from
    trainer = None
    echo(f"training: {config['max_steps']} steps of {state.train.effective_batch} rows; checkpoint every "
         f"{config['save_steps']} steps in {out}" + ("; Ctrl-C saves and stops" if installed else ""))
    try:
        while True:
            cbs = [progress, *callbacks, stop_cls(stop)]  # the stop check last: it sees signals the others caused
            trainer = _trainer(model, tokenizer, dataset, collator, out, state.train, config, cbs)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            oom = None
            try:
                trainer.train(resume_from_checkpoint=resume_from)
            except Exception as exc:
                if not is_cuda_oom(exc):
                    raise
                oom = _one_line(exc)
            if oom is None:
                break
            # outside the except block: the traceback and the activations its frames held are released
            step = trainer.state.global_step
            model.zero_grad(set_to_none=True)
            _free_cuda()
            resume_from = _emergency_checkpoint(trainer, out)
            # the model keeps accelerate's autocast wrapper (marked prepared, it is not wrapped twice)
            trainer.accelerator.free_memory()
            trainer = None
            _free_cuda()
            if resume_from is None:  # nothing saved yet: back to the weights the run started with
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if n in initial:
                            p.copy_(initial[n])
            _record_backoff(state, step=step, phase="train", message=oom, checkpoint=resume_from, echo=echo)
            config["settings"].update(batch_size=state.train.batch_size, grad_accum=state.train.grad_accum)
            _write_json(out / RUN_CONFIG, config)  # a later --resume continues with the reduced micro-batch
        progress.close()
        # the handlers stay until the adapter is saved: a signal now must not cut the final save short
        return _finish(opts, out, src, tokenizer, model, trainer, collator, plan, device, config, data_info, state,
                       progress, stop, resumed_from, echo)
    finally:
        progress.close()
        if installed:
            stop.restore()


@lru_cache(maxsize=1)
def callback_classes() -> tuple[type, type]:
    """(StopCallback, ProgressCallback): TrainerCallback subclasses, defined on first use so that
    importing this module does not import transformers."""
    from transformers import TrainerCallback

    class StopCallback(TrainerCallback):
        """Turns a received SIGINT/SIGTERM into 'save a checkpoint after this step, then stop'."""

        def __init__(self, stop: StopFlag):
            self.stop = stop

        def on_step_end(self, args, state, control, **kwargs):
            if self.stop.signum is not None and state.global_step < state.max_steps:
                control.should_save = True  # the Trainer saves checkpoint-<step> right after this
                control.should_training_stop = True
            return control

    class ProgressCallback(TrainerCallback):
        """A tqdm bar with loss, tokens/s and GPU memory; also times the steps for the report."""

        def __init__(self, collator: PadCollator, cuda: bool, enabled: bool = True):
            self.collator, self.cuda, self.enabled = collator, cuda, enabled
            self.bar = None
            self.loss = None
            self.train_seconds = 0.0
            self.train_tokens = 0
            self.train_padded_tokens = 0
            self.steps_run = 0
            self._t = 0.0
            self._tok = 0
            self._pad = 0
            self._rate = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            if self.enabled and self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="qfit run", unit="step",
                                dynamic_ncols=True, mininterval=0.5)
            elif self.bar is not None:  # a restart after an OOM back-off
                self.bar.n = state.global_step
                self.bar.refresh()
            self._mark(state)

        def _mark(self, state):
            self._t, self._tok, self._pad = time.perf_counter(), state.num_input_tokens_seen, self.collator.padded_tokens

        def on_step_end(self, args, state, control, **kwargs):
            dt = time.perf_counter() - self._t
            tok = state.num_input_tokens_seen - self._tok  # the Trainer's count of non-padding tokens
            self.train_seconds += dt
            self.train_tokens += tok
            self.train_padded_tokens += self.collator.padded_tokens - self._pad
            self.steps_run += 1
            self._rate = tok / dt if dt > 0 else 0.0
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
                self._postfix()
            self._mark(state)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])
                if self.bar is not None:
                    self._postfix()

        def on_save(self, args, state, control, **kwargs):
            self._mark(state)  # saving is not training time

        def _postfix(self):
            parts = {"loss": f"{self.loss:.3f}" if self.loss is not None else "-", "tok/s": f"{self._rate:,.0f}"}
            if self.cuda:
                import torch

                parts["mem GiB"] = f"{gib_str(torch.cuda.memory_allocated())}/{gib_str(torch.cuda.max_memory_allocated())}"
            self.bar.set_postfix(parts, refresh=False)

        def close(self):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return StopCallback, ProgressCallback


# --------------------------------------------------------------------------- read-back and report

def settings_in_effect(trainer, model, seq_len: int) -> dict:
    """The settings as the model and trainer hold them after training (not as planned)."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    from planner.train.stack import decoder_layers

    args = trainer.args
    base = model.get_base_model()
    ckpt = base.is_activation_checkpointing if hasattr(type(base), "is_activation_checkpointing") \
        else base.is_gradient_checkpointing
    q4 = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    w = q4[0].weight if q4 else None
    qs = getattr(w, "quant_state", None)
    lcfg = model.peft_config[model.active_adapter]
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    dtype_names = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}
    trainable, total = model.get_nb_trainable_parameters()
    return {
        "batch_size": args.per_device_train_batch_size,
        "grad_accum": args.gradient_accumulation_steps,
        "effective_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps,
        "seq_len": seq_len,
        "gradient_checkpointing": bool(ckpt),
        # partial checkpointing: decoder layers whose flag is off while checkpointing is on
        "uncheckpointed_layers": sum(not layer.gradient_checkpointing for layer in decoder_layers(base)) if ckpt else 0,
        "optim": str(getattr(args.optim, "value", args.optim)),
        "optimizer_class": type(opt).__name__ if opt is not None else "",
        "compute_dtype": dtype_names.get(str(q4[0].compute_dtype), str(q4[0].compute_dtype)) if q4 else "",
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "quant_type": getattr(w, "quant_type", ""),
        "double_quant": bool(getattr(qs, "nested", False)),
        "quantized_linears": len(q4),
        "rank": lcfg.r, "alpha": lcfg.lora_alpha, "lora_dropout": lcfg.lora_dropout,
        "targets": sorted(lcfg.target_modules) if not isinstance(lcfg.target_modules, str) else [lcfg.target_modules],
        "lora_layers": sum(1 for m in model.modules() if isinstance(m, LoraLayer)),
        "trainable_params": int(trainable), "total_params": int(total),
        "learning_rate": args.learning_rate,
        "lr_scheduler": type(trainer.lr_scheduler).__name__ + f" ({getattr(args.lr_scheduler_type, 'value', '')})",
        "warmup_steps": args.get_warmup_steps(args.max_steps),
        "max_grad_norm": args.max_grad_norm,
        "device": str(args.device),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") if str(args.device).startswith("cuda") else "",
    }


def _finish(opts, out, src, tokenizer, model, trainer, collator, plan, device, config, data_info, state,
            progress, stop, resumed_from, echo) -> RunResult:
    import torch

    from planner.train import stack

    cuda = device.kind == "cuda"
    total = config["max_steps"]
    step = trainer.state.global_step
    completed = step >= total
    measured = dict(state.measured)
    if cuda:
        torch.cuda.synchronize()
        measured["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        measured["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        from planner.train.harness import nvml_used

        measured["nvml_used_bytes"] = _safe(lambda: nvml_used()[0])
        memory_note = "measured since the last (re)start of training: torch.cuda.max_memory_allocated/reserved"
    else:
        measured.update(peak_allocated_bytes=0, peak_reserved_bytes=0)
        memory_note = "CPU run: no CUDA memory to measure (0); the prediction is for a GPU"
    effect = settings_in_effect(trainer, model, config["seq_len"])
    effect["padding"] = "max-length" if collator.pad_to else "longest"  # as the collator padded
    planned = settings_dict(plan.lora, plan.train, resolve_targets(plan.model, plan.lora.targets))
    differs = [k for k in ("batch_size", "grad_accum", "gradient_checkpointing", "uncheckpointed_layers", "optim", "compute_dtype", "rank",
                           "alpha", "double_quant") if k in planned and effect.get(k) != planned[k]]
    notes = list(state.notes)
    if differs:
        why = " (after out-of-memory back-off)" if state.oom_events else ""
        notes.append(f"in effect differs from the plan in {', '.join(differs)}{why}")
    seconds = progress.train_seconds
    tok_s = progress.train_tokens / seconds if seconds else 0.0
    history = [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate")}
               for h in trainer.state.log_history if "loss" in h]
    ckpt = last_checkpoint(out)
    report = {
        "status": "completed" if completed else "interrupted",
        "model": {"name": src.spec.name, "source": src.ref},
        "data": data_info,
        "device": {"kind": device.kind, "name": device.name, "total_bytes": device.total_bytes,
                   "free_bytes": device.free_bytes, "notes": list(device.notes),
                   "emulation": state.emulation or None},  # QFIT_EMULATE_GPU: card, allocator budget (bytes)
        "planned": planned,
        "in_effect": effect,
        "memory": {
            "predicted": {"peak_allocated_bytes": plan.memory.peak_allocated_bytes,
                          "peak_reserved_bytes": plan.memory.peak_reserved_bytes,
                          "needs_bytes": plan.memory.needs_bytes, "peak_phase": plan.memory.peak_phase},
            "measured": measured,
            "longest_micro_batch_tokens": collator.longest,
            "note": memory_note,
        },
        "speed": {"tokens_per_s": round(tok_s, 1),
                  "padded_tokens_per_s": round(progress.train_padded_tokens / seconds, 1) if seconds else 0.0,
                  "predicted_tokens_per_s": round(plan.tokens_per_s, 1), "train_seconds": round(seconds, 2),
                  "train_tokens": progress.train_tokens, "train_padded_tokens": progress.train_padded_tokens,
                  "note": "tokens/s counts non-padding tokens; padded counts what the device computed"},
        "steps": {"planned": total, "completed": step, "run_in_this_process": progress.steps_run,
                  "resumed_from": resumed_from, "effective_batch": effect["effective_batch"]},
        "oom_events": state.oom_events,
        "loss": {"first": history[0]["loss"] if history else None, "last": history[-1]["loss"] if history else None,
                 "history": history},
        "stopped_by": stop.name or None,
        "checkpoint": str(ckpt) if ckpt else None,
        "library_versions": stack.library_versions(),
        "notes": notes,
    }
    if not completed:
        _write_json(out / RUN_REPORT, report)
        echo(f"stopped by {stop.name or 'the trainer'} at step {step} of {total}; checkpoint saved in {ckpt}")
        echo(f"continue with: qfit run --resume {out}")
        code = 128 + stop.signum if stop.signum else 1
        return RunResult("interrupted", out, report, exit_code=code, checkpoint=str(ckpt) if ckpt else None)

    model.save_pretrained(str(out))  # adapter_config.json + adapter_model.safetensors
    tokenizer.save_pretrained(str(out))
    report["adapter_dir"] = str(out)
    calib = _append_calibration(report, plan, device, config, measured, progress, collator) if cuda else None
    report["calibration_row"] = calib
    _write_json(out / RUN_REPORT, report)

    echo("")
    loss = report["loss"]
    if loss["first"] is not None:
        echo(f"done: {step} steps, loss {loss['first']:.3f} -> {loss['last']:.3f}, {tok_s:,.0f} tokens/s")
    else:
        echo(f"done: {step} steps, {tok_s:,.0f} tokens/s")
    if cuda:
        echo(f"peak memory: measured {gib_str(measured['peak_allocated_bytes'])} GiB allocated / "
             f"{gib_str(measured['peak_reserved_bytes'])} GiB reserved; predicted "
             f"{gib_str(plan.memory.peak_allocated_bytes)} / {gib_str(plan.memory.peak_reserved_bytes)} GiB")
        echo(f"calibration: run appended to {calib}" if calib else "calibration: not appended (see run_report.json)")
    else:
        echo("peak memory: not measured on the CPU; calibration data not appended (CUDA runs only)")
    if state.oom_events:
        echo(f"out-of-memory events: {len(state.oom_events)} (micro-batch now {state.train.batch_size}, "
             f"effective batch {state.train.effective_batch}); see run_report.json")
    echo(f"adapter: {out} (adapter_config.json, adapter_model.safetensors); report: {out / RUN_REPORT}")
    echo("load it with:")
    echo(load_snippet(src.ref, out.resolve(), effect["compute_dtype"] or plan.train.compute_dtype))
    return RunResult("completed", out, report, exit_code=0, checkpoint=str(ckpt) if ckpt else None)


def _append_calibration(report: dict, plan: Plan, device: Device, config: dict, measured: dict, progress,
                        collator) -> str | None:
    """One row in the calibration CSV layout (planner.train.harness.FIELDS) at <qfit cache>/runs.csv.

    seq_len is the longest padded micro-batch actually run (the data decides it, not the plan), so the
    row states the shape whose memory was measured."""
    from planner.train.harness import FIELDS

    if not measured.get("peak_allocated_bytes"):
        return None
    e = report["in_effect"]
    versions = report["library_versions"]
    targets = plan.lora.targets[0] if len(plan.lora.targets) == 1 else ",".join(plan.lora.targets)
    step_s = progress.train_seconds / progress.steps_run if progress.steps_run else 0.0
    row = {
        "run_id": f"qfit-run|{plan.model.name}|{time.strftime('%Y%m%d-%H%M%S')}",
        "model": plan.model.name, "compute_dtype": e["compute_dtype"], "double_quant": e["double_quant"],
        "alloc_conf": e["alloc_conf"], "batch_size": e["batch_size"], "grad_accum": e["grad_accum"],
        "seq_len": collator.longest or config["seq_len"], "gradient_checkpointing": e["gradient_checkpointing"],
        "uncheckpointed_layers": e.get("uncheckpointed_layers", 0),
        "rank": e["rank"], "alpha": e["alpha"], "lora_dropout": e["lora_dropout"], "targets": targets,
        "optim": e["optim"], "status": "ok",
        "budget_bytes": ((report.get("device") or {}).get("emulation") or {}).get("budget_bytes", 0),  # capped run
        "load_peak_allocated_bytes": measured.get("load_peak_allocated_bytes", ""),
        "after_load_allocated_bytes": measured.get("after_load_allocated_bytes", ""),
        "after_wrap_allocated_bytes": measured.get("after_wrap_allocated_bytes", ""),
        "peak_allocated_bytes": measured["peak_allocated_bytes"], "peak_reserved_bytes": measured["peak_reserved_bytes"],
        "nvml_used_bytes": measured.get("nvml_used_bytes", ""), "nvml_baseline_bytes": measured.get("nvml_baseline_bytes", ""),
        "context_bytes": "", "leak_bytes": "", "step_time_s": round(step_s, 4),
        "tokens_per_s": report["speed"]["padded_tokens_per_s"], "steps": progress.steps_run, "error": "",
        "gpu_name": device.name, "gpu_total_bytes": device.total_bytes, "driver": "",
        "torch": versions.get("torch", ""), "transformers": versions.get("transformers", ""),
        "peft": versions.get("peft", ""), "bitsandbytes": versions.get("bitsandbytes", ""),
        "cuda": versions.get("cuda", ""), "date": time.strftime("%Y-%m-%d"),
    }
    path = user_cache_dir() / "runs.csv"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.is_file() or path.stat().st_size == 0
        if not new:
            with path.open(newline="") as fh:
                old = csv.DictReader(fh)
                rows = list(old) if old.fieldnames != list(FIELDS) else None
            if rows is not None:  # written by an older qfit: the same rows under today's columns
                with path.open("w", newline="") as fh:
                    w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
                    w.writeheader()
                    w.writerows(rows)
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
    except OSError:
        return None
    return str(path)


__all__ = ["RunOptions", "RunResult", "RunError", "Device", "ModelSource", "run", "detect_device", "set_alloc_conf",
           "resolve_model", "check_output", "prepare_output", "last_checkpoint", "read_plan_file", "build_request",
           "plan_run", "plan_lines", "backoff", "is_cuda_oom", "planned_steps", "auto_save_steps", "load_snippet",
           "settings_in_effect", "PadCollator", "callback_classes", "StopFlag", "PADDINGS", "EMULATE_ENV",
           "emulation_budget"]
