"""Planning a `qfit run`: the checks of the options against the model (before any data is read), the
planner request (a saved --plan plus what the user gave on top), the best plan for the device, the plan as
printed and as saved (plan.json), and the number of steps and the checkpoint interval.

Standard library and light planner modules only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from planner.coefficients import load_coefficients
from planner.memory import resolve_targets
from planner.profiles import ProfileError, load_model
from planner.report import gib_str
from planner.search import DEFAULT_EFFECTIVE_BATCH, Request, search
from planner.specs import ModelSpec, Plan
from planner.train.device import Device
from planner.train.options import AUTO_SAVE_FRACTION, AUTO_SAVE_MAX_STEPS, RunError, RunOptions


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
    for key in ("batch_size", "grad_accum", "seq_len", "rank", "alpha", "uncheckpointed_layers"):
        value = settings.get(key)
        if value is None and key in ("alpha", "uncheckpointed_layers"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "uncheckpointed_layers" else 1):
            raise RunError(f"--plan {path}: settings.{key} must be a positive whole number, got {value!r}; "
                           f"save the plan again with `qfit plan MODEL --save {path}` or fix the value")
    for key in ("optim", "compute_dtype"):
        if not isinstance(settings[key], str):
            raise RunError(f"--plan {path}: settings.{key} must be a name, got {settings[key]!r}")
    targets = settings["targets"]
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))):
        raise RunError(f"--plan {path}: settings.targets must be a module name or a list of them, got {targets!r}")
    return doc


def build_request(opts: RunOptions, plan_doc: dict | None, seq_len: int, packing: bool = False) -> tuple[Request, list[str]]:
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
                    expandable_segments=s.get("expandable_segments", True), method=s.get("method", "qlora"))
    given = {k: getattr(opts, k) for k in ("rank", "alpha", "lora_dropout", "targets", "gradient_checkpointing",
                                           "uncheckpointed_layers", "optim", "compute_dtype", "method")
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
    base["packing"] = packing
    base["optimize"] = opts.optimize
    if base.get("uncheckpointed_layers") and base.get("gradient_checkpointing") is None:
        base["gradient_checkpointing"] = True  # leaving some layers uncheckpointed means checkpointing the others
    if base.get("lora_dropout") is None:
        base.pop("lora_dropout", None)
    if base.get("method", "qlora") != "qlora" and (opts.num_gpus or 1) > 1:  # e.g. a saved lora plan with --num-gpus
        raise RunError(f"--method {base['method']} trains on one GPU: multi-GPU runs are QLoRA only "
                       "(drop --num-gpus, or plan again with --method qlora)")
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
        same = [p for p in result.fitting if p.lora == best.lora and p.train.seq_len == best.train.seq_len
                and p.train.method == best.train.method]
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


def planned_steps(num_examples: int, effective_batch: int, epochs: float | None, max_steps: int | None) -> int:
    """Optimizer steps of the run: --max-steps, or epochs x ceil(examples / effective batch)."""
    if max_steps:
        return max_steps
    return max(1, math.ceil((epochs or 1.0) * math.ceil(num_examples / effective_batch)))


def auto_save_steps(total_steps: int) -> int:
    return max(1, min(AUTO_SAVE_MAX_STEPS, math.ceil(total_steps / AUTO_SAVE_FRACTION)))


def check_new_run(opts: RunOptions) -> None:
    if opts.demo:
        if opts.model or opts.dataset or opts.plan_path:
            raise RunError("--demo brings its own model and data: drop MODEL, --dataset and --plan")
        return
    if not opts.model and not opts.plan_path:
        raise RunError("name a MODEL (a profile such as mistral-7b, a Hugging Face id or a local directory), "
                       "or use --demo")
    if not opts.dataset:
        raise RunError("--dataset is required (a .json, .jsonl, .csv or .parquet file), or use --demo")


def check_against_model(opts: RunOptions, spec: ModelSpec) -> None:
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


def check_plan_model(plan_doc: dict, spec: ModelSpec, plan_path: str) -> None:
    """The saved plan must be for this architecture (a local copy of the same model is fine)."""
    try:
        planned = load_model(str(plan_doc.get("model")))
    except ProfileError:
        return  # a plan for a local model directory: nothing to compare against
    facts = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
    if any(getattr(planned, f) != getattr(spec, f) for f in facts):
        raise RunError(f"the plan {plan_path} is for {planned.name}, not {spec.display_name}: "
                       "pass the plan's model or drop --plan")


def plan_file_doc(plan: Plan, spec: ModelSpec, device: Device, plan_json) -> dict:
    """plan.json in the `qfit plan --save` layout (usable with --plan), plus the device it was made for."""
    from planner.search import SearchResult

    coeffs = load_coefficients(device.spec.name if device.kind == "cuda" else None)
    doc = plan_json(SearchResult(plans=(plan,), best=plan if plan.fits else None, notes=()), spec, coeffs)
    doc["device"] = {"kind": device.kind, "name": device.name, "total_bytes": device.total_bytes,
                     "free_bytes": device.free_bytes}
    return doc


# --------------------------------------------------------------------------- packing (one GPU and several)

def choose_packing(opts: RunOptions, saved: dict | None, examples: list, seq_len: int) -> bool:
    """--packing/--no-packing, the resumed run's choice, or on by default when some row is shorter than the
    sequence (rows then fill rows of seq_len tokens); never with --padding max-length."""
    if saved is not None:
        return bool(saved.get("packing", False))
    if opts.packing is not None:
        return opts.packing
    return opts.padding != "max-length" and any(len(e) < seq_len for e in examples)


def plan_seq_len(examples: list, seq_len: int, packing: bool, padding: str | None) -> int:
    """The sequence length the memory plan is made for: packed rows are exactly seq_len long; unpacked micro-batches
    are padded to their longest row, so the worst one is micro-batch x the longest row (not the rounded seq_len);
    --padding max-length pads every row to seq_len."""
    if packing or padding == "max-length":
        return seq_len
    return min(seq_len, max(len(e) for e in examples))


def training_items(data, packing: bool, padding: str | None, plan_seq: int, echo) -> int:
    """Rows the Trainer iterates over (packed rows, or examples), saying what packing did; with packing the
    statistics go into data.info["packing"] (run_report.json)."""
    if not packing:
        if padding != "max-length":
            echo(f"no packing: micro-batches are padded to their longest row (at most {plan_seq} tokens)")
        return len(data.examples)
    from planner.packing import PackedDataset

    stats = PackedDataset(data.examples, data.seq_len).stats()
    data.info["packing"] = stats.as_dict()
    echo(f"packing: {stats.rows} rows into {stats.packed_rows} rows of {stats.seq_len} tokens "
         f"({stats.fill:.1%} real tokens, the rest padding)")
    return stats.packed_rows
