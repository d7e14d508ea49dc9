"""The `qfit` command line: parse -> call -> render. Only this module (and the cli_* command modules)
echo or exit. Module level imports the standard library, click and light planner modules only;
heavy libraries are imported inside the commands that need them.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

from planner import __version__
from planner.cli_errors import QfitGroup, check_output_path, write_output
from planner.cli_merge import merge_cmd
from planner.coefficients import CALIBRATION_DIR, load_coefficients
from planner.errors import QfitError
from planner.multigpu import (
    LOADINGS,
    choose_multi,
    multigpu_calibrated,
)
from planner.profiles import capacity_gpu, gpu_names, load_gpu, load_model, match_gpu_name, model_names
from planner.search import METHOD_CHOICES, Request
from planner.specs import COMPUTE_DTYPES, OPTIMIZERS


@click.group(cls=QfitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qfit")
def cli():
    """qfit: will this QLoRA fine-tune fit, with which settings, and how fast.

    \b
    Example:
      qfit plan mistral-7b --gpu t4
    """


# --------------------------------------------------------------------------- qfit plan

def _seq_len(value: str | None) -> int | None:
    if value is None:
        return None
    if value == "auto":
        return 0
    try:
        n = int(value)
    except ValueError:
        raise QfitError(f"--seq-len must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise QfitError(f"--seq-len must be a positive integer, got {n}")
    return n


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise QfitError(f"{name} must be a positive integer, got {value}")


def _targets(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(t.strip() for t in value.split(",") if t.strip())
    if not names:
        raise QfitError("--targets must be attn, all-linear, or a comma list of module names")
    return names


def detect_gpu_spec():
    """GPU 0 via NVML: its catalog profile, or (not in the catalog) its memory planned like a catalog card of
    the same memory class (planner.profiles.capacity_gpu), under the name NVML reports."""
    from planner.hardware import detect_gpu

    found = detect_gpu()
    if found is None:
        raise QfitError("no NVIDIA GPU found (NVML): pass --gpu NAME or --gpu 24GiB")
    name, total = found
    return match_gpu_name(name) or capacity_gpu(total, f"{total}B", display_name=name)


def build_request(seq_len, batch_size, grad_accum, effective_batch, rank, alpha, lora_dropout, targets,
                  gradient_checkpointing, optim, compute_dtype, double_quant, expandable_segments,
                  uncheckpointed_layers=None, packing=True, optimize="quality", method="qlora") -> Request:
    for flag, v in (("--batch-size", batch_size), ("--grad-accum", grad_accum),
                    ("--effective-batch", effective_batch), ("--rank", rank), ("--alpha", alpha)):
        _positive(flag, v)
    if not 0.0 <= lora_dropout < 1.0:
        raise QfitError(f"--lora-dropout must be in [0, 1), got {lora_dropout}")
    if batch_size and grad_accum and effective_batch and batch_size * grad_accum != effective_batch:
        raise QfitError(f"--batch-size {batch_size} x --grad-accum {grad_accum} != --effective-batch {effective_batch}")
    if uncheckpointed_layers is not None and uncheckpointed_layers < 0:
        raise QfitError(f"--uncheckpointed-layers must be 0 or more, got {uncheckpointed_layers}")
    if uncheckpointed_layers and gradient_checkpointing is False:
        raise QfitError("--uncheckpointed-layers needs checkpointing: drop --no-gradient-checkpointing")
    if uncheckpointed_layers and gradient_checkpointing is None:
        gradient_checkpointing = True  # leaving some layers uncheckpointed means checkpointing the others
    if effective_batch and batch_size and effective_batch % batch_size:
        raise QfitError(f"--effective-batch {effective_batch} is not a multiple of --batch-size {batch_size}")
    return Request(batch_size=batch_size, grad_accum=grad_accum, effective_batch=effective_batch,
                   seq_len=_seq_len(seq_len), rank=rank, alpha=alpha, lora_dropout=lora_dropout,
                   targets=_targets(targets), gradient_checkpointing=gradient_checkpointing, optim=optim,
                   compute_dtype=compute_dtype, double_quant=double_quant, expandable_segments=expandable_segments,
                   uncheckpointed_layers=uncheckpointed_layers, packing=packing, optimize=optimize, method=method)


def plan_options(f):
    """The plan knobs, shared by `qfit plan` and `qfit run`."""
    opts = [
        click.option("--seq-len", metavar="N|auto", help="Tokens per sequence (default 512; 'auto': longest that fits). Memory grows with it."),
        click.option("--batch-size", type=int, help="Micro-batch per step (default: searched). Memory grows with it."),
        click.option("--grad-accum", type=int, help="Gradient accumulation steps (default: effective batch / micro-batch)."),
        click.option("--effective-batch", type=int, help="Sequences per optimizer step, kept exact (default 16)."),
        click.option("--rank", type=int, help="LoRA rank (default 16, lowered only if nothing fits). Higher: more memory."),
        click.option("--alpha", type=int, help="LoRA alpha (default 2 x rank)."),
        click.option("--lora-dropout", type=float, default=0.05, show_default=True, help="LoRA dropout; > 0 saves a mask per adapted input."),
        click.option("--targets", help="attn, all-linear, or a comma list of module names (default all-linear)."),
        click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
                     help="Fix checkpointing on or off (default: searched). On: less memory, ~30% more compute."),
        click.option("--uncheckpointed-layers", type=int, metavar="N",
                     help="With checkpointing on, leave the last N decoder layers uncheckpointed (they keep their "
                          "activations and skip the recompute). Default: searched, as many as fit; 0: every layer."),
        click.option("--optim", type=click.Choice(OPTIMIZERS), help="Optimizer (default: searched, paged_adamw_32bit first)."),
        click.option("--compute-dtype", type=click.Choice(COMPUTE_DTYPES), help="Compute dtype (default bf16 where the GPU has it, else fp16)."),
        click.option("--double-quant/--no-double-quant", default=True, show_default=True, help="bitsandbytes double quantization of the 4-bit scales."),
        click.option("--expandable-segments/--no-expandable-segments", default=True, show_default=True,
                     help="Model PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (what qfit run sets)."),
        click.option("--packing/--no-packing", default=True, show_default=True,
                     help="Pack rows into full micro-batches (no padding; what qfit run does). Off: one row per sequence."),
        click.option("--optimize", type=click.Choice(("quality", "speed")), default="quality", show_default=True,
                     help="quality: the largest LoRA adapter that fits, fastest settings for it; speed: the fastest plan "
                          "of any adapter tier (r16 all-linear, r8 all-linear, r8 attention)."),
        click.option("--method", type=click.Choice(METHOD_CHOICES), default="qlora", show_default=True,
                     help="How the frozen base is held: qlora (4-bit NF4), lora (16-bit, the compute dtype: more memory, "
                          "no dequantization), lora-8bit (bitsandbytes LLM.int8), or auto: every method, the best-ranked "
                          "that fits (the plan says why). lora and lora-8bit are measured on an H100 (calibration/REPORT.md, "
                          "Methods)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@cli.command("plan")
@click.argument("model")
@click.option("--gpu", default="auto", show_default=True, help="Catalog name (`qfit gpus`), a capacity like 24GiB, or auto (NVML).")
@plan_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (schema in the README).")
@click.option("--save", type=click.Path(dir_okay=False), help="Also write the plan JSON to this file (for `qfit run --plan`).")
@click.option("--coefficients", type=click.Path(exists=True, dir_okay=False), help="Use this coefficients file instead of the calibrated one.")
@click.option("--plot", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Write the fit map: a PNG heatmap of micro-batch x sequence length with the recommended plan's settings, fits or not, GiB per cell (needs matplotlib).")
@click.option("--fit-map", type=click.Path(dir_okay=False), hidden=True)  # the older name of --plot
@click.option("--export", "export", nargs=2, type=(click.Choice(("trl", "axolotl", "accelerate")), click.Path(dir_okay=False)),
              metavar="trl|axolotl|accelerate FILE",
              help="Also write the recommended plan as that tool's config: trl (`trl sft --config`, YAML or .json), axolotl YAML, accelerate config.")
@click.option("--exact", is_flag=True, help="Also trace the recommended step on fake tensors (real transformers + peft + bitsandbytes; needs the train extra) and simulate the CUDA caching allocator over it for peak reserved (~1 s per decoder layer).")
@click.option("--num-gpus", type=int, default=1, show_default=True,
              help="GPUs of one host. 2+: per-GPU memory under DDP or FSDP (NCCL buffers and FSDP measured on 2 x H200; the notes say whether the coefficients carry that calibration).")
@click.option("--strategy", type=click.Choice(["auto", "ddp", "fsdp"]),
              help="With --num-gpus 2+: auto (default) picks DDP when it fits (faster), else FSDP (shards the model).")
@click.option("--cpu-offload/--no-cpu-offload", default=None,
              help="FSDP: keep parameter, gradient and optimizer shards in CPU memory (default: only if nothing fits without). Less GPU memory, much slower.")
@click.option("--loading", type=click.Choice(LOADINGS),
              help="FSDP load: sharded (default: built on meta, sharded, the checkpoint streamed tensor by tensor; estimate); full (measured: every rank loads the whole 4-bit model before FSDP shards it); rank0_cpu is refused with the measurement that rules it out for 4-bit models.")
def plan_cmd(model, gpu, as_json, save, coefficients, plot, fit_map, export, exact, num_gpus, strategy, cpu_offload, loading, **knobs):
    """Plan a QLoRA fine-tune: peak memory by named term, and the fastest settings that fit.

    MODEL is a short name (`qfit models`), a Hugging Face id, or a path to a config.json.
    With --num-gpus N the settings are per rank and the global batch is N x micro-batch x accumulation.

    \b
    Example:
      qfit plan mistral-7b --gpu t4
      qfit plan meta-llama/Llama-3.1-8B --gpu 24GiB --seq-len 2048 --json
      qfit plan llama-3.1-70b --gpu rtx4090 --num-gpus 2
    """
    from planner.documents import plan_document
    from planner.reasons import explain
    from planner.report import render_advice, render_no_fit, render_plan

    if plot and fit_map:
        raise QfitError("give the fit map once: --plot FILE.png (--fit-map is its older name)")
    map_flag = "--fit-map" if fit_map else "--plot"
    fit_map = fit_map or plot
    if num_gpus < 1:
        raise QfitError(f"--num-gpus must be a positive integer, got {num_gpus}")
    if num_gpus == 1:
        offload_flag = "--cpu-offload" if cpu_offload else "--no-cpu-offload"
        for flag, value in (("--strategy", strategy), (offload_flag, cpu_offload),
                            ("--loading", loading)):
            if value is not None:
                raise QfitError(f"{flag} needs --num-gpus 2 or more (one GPU has no DDP or FSDP)")
    elif fit_map or exact:
        raise QfitError(f"{map_flag} and --exact plan one GPU: drop them, or drop --num-gpus")
    export_fmt, export_path = export or (None, None)
    if export and num_gpus > 1:
        raise QfitError("--export writes one-GPU plans: drop --num-gpus")
    check_output_path(export_path, f"--export {export_fmt}")
    check_output_path(save, "--save")
    check_output_path(fit_map, map_flag)
    if fit_map:
        from planner.fitmap import require_matplotlib

        require_matplotlib(map_flag)  # before the work: nothing half-written
    spec = load_model(model)
    gpu_spec = detect_gpu_spec() if gpu == "auto" else load_gpu(gpu)
    req = build_request(**knobs)
    if req.seq_len and req.seq_len > spec.max_position_embeddings:
        raise QfitError(f"--seq-len {req.seq_len} exceeds {spec.display_name}'s max_position_embeddings "
                        f"({spec.max_position_embeddings})")
    if req.uncheckpointed_layers and req.uncheckpointed_layers >= spec.num_hidden_layers:
        raise QfitError(f"--uncheckpointed-layers {req.uncheckpointed_layers}: {spec.display_name} has "
                        f"{spec.num_hidden_layers} decoder layers; for none checkpointed use --no-gradient-checkpointing")
    if req.uncheckpointed_layers and num_gpus > 1:
        raise QfitError("--uncheckpointed-layers plans one GPU: drop it with --num-gpus")
    if req.method != "qlora" and num_gpus > 1:
        raise QfitError(f"--method {req.method} plans one GPU: multi-GPU plans are QLoRA only (drop --method or --num-gpus)")
    coeffs = load_coefficients(gpu_spec.name, coefficients)
    if num_gpus > 1:
        return _plan_multi(spec, gpu_spec, req, coeffs, num_gpus, strategy, cpu_offload, loading, as_json, save,
                           model_arg=model, fixed=req != Request() or coefficients is not None)
    result = explain(spec, gpu_spec, req, coeffs)
    doc = plan_document(result, spec, coeffs)
    if save:
        write_output(save, json.dumps(doc, indent=2) + "\n", "--save")
    if export and result.best is None:
        raise QfitError(f"--export {export_fmt}: nothing fits, so there is no plan to export")
    if export:
        from planner.export import export_text

        write_output(export_path, export_text(export_fmt, result.best, export_path), f"--export {export_fmt}")
    if fit_map:
        from planner.fitmap import fit_map_png

        fit_map_png(spec, gpu_spec, req, coeffs, fit_map, recommended=result.best)
    exact_text = None
    if exact and result.best is not None:
        exact_text = _exact(spec, result.best, doc, coeffs)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    elif result.best is None:
        head = render_plan(result, spec, coeffs, gpu_spec.display_name).split("\n")[:2]
        click.echo("\n".join(head))
        click.echo(f"qfit plan {spec.name} --gpu {gpu_spec.name}: " + "\n".join(render_no_fit(result, spec)))
        click.echo("\n".join(render_advice(result.advice, model, gpu_spec, fixed=req != Request() or coefficients is not None,
                                            calibrated=multigpu_calibrated(coeffs))))
    else:
        click.echo(render_plan(result, spec, coeffs, gpu_spec.display_name))
        if exact_text:
            click.echo("\n" + exact_text)
    if save and not as_json:
        click.echo(f"\nplan saved to {save} (use it with `qfit run --plan {save}`)")
    if export:
        click.echo(f"{export_fmt} config written to {export_path}", err=as_json)
    return 0 if result.best is not None else 1


def _plan_multi(spec, gpu_spec, req: Request, coeffs, n: int, strategy, cpu_offload, loading, as_json: bool, save,
                model_arg: str, fixed: bool) -> int:
    """`qfit plan --num-gpus N` (N >= 2): choose DDP or FSDP, render per-GPU memory; 1 when nothing fits."""
    from planner.documents import multi_plan_document
    from planner.reasons import multi_no_fit_advice
    from planner.report import render_multi_advice, render_multi_header, render_multi_no_fit, render_multi_plan

    choice = choose_multi(spec, gpu_spec, req, coeffs, n, strategy, cpu_offload, loading)
    advice = None if choice.best else multi_no_fit_advice(spec, gpu_spec, req, coeffs, n, strategy, cpu_offload, loading)
    doc = multi_plan_document(choice, spec, coeffs, advice)
    if save:
        write_output(save, json.dumps(doc, indent=2) + "\n", "--save")
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    elif choice.best is None:
        click.echo("\n".join(render_multi_header(choice, spec, coeffs, gpu_spec.display_name)))
        command = f"qfit plan {shlex.quote(model_arg)} --gpu {shlex.quote(gpu_spec.name)} --num-gpus {n}"
        click.echo(f"{command}: " + "\n".join(render_multi_no_fit(choice)))
        click.echo("\n".join(render_multi_advice(advice, model_arg, gpu_spec, calibrated=multigpu_calibrated(coeffs),
                                                  fixed=fixed or bool(strategy or loading) or cpu_offload is not None)))
    else:
        from planner.reasons import multi_why

        click.echo(render_multi_plan(choice, spec, coeffs, gpu_spec.display_name, multi_why(choice)))
    if save and not as_json:
        click.echo(f"\nplan saved to {save}")
    return 0 if choice.best is not None else 1


def _exact(spec, best, doc: dict, coeffs) -> str:
    """`--exact`: trace the recommended plan; adds doc["exact"] and returns the text section."""
    try:
        import torch  # noqa: F401  (the train extra)
    except ImportError:
        raise QfitError("--exact traces the real stack: install the train extra (pip install -e '.[train]')") from None
    from planner.exact import device_for, trace_step
    from planner.report_exact import exact_json, exact_section

    device = device_for(best.gpu)
    # the trace takes ~1 s per decoder layer: say so before the silence (stderr: --json stays one document)
    click.echo(f"--exact: tracing the recommended step on fake tensors, {spec.num_hidden_layers} decoder layers "
               f"(about {spec.num_hidden_layers} s)...", err=True)
    # the whole depth: exact allocated bytes with no extrapolation, partial checkpointing as planned,
    # and the allocation log complete for the allocator simulation (peak reserved)
    traced = trace_step(spec, best.lora, best.train, layers=spec.num_hidden_layers, device=device, budget=True)
    doc["exact"] = exact_json(spec, best.lora, best.train, best.memory, result=traced, device=device,
                              traced_uncheckpointed_layers=best.train.uncheckpointed_layers)
    return exact_section(spec, best.lora, best.train, best.memory, result=traced, device=device)


# --------------------------------------------------------------------------- catalogs

@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
def models_cmd(as_json):
    """List the shipped model profiles.

    \b
    Example:
      qfit models
    """
    from tabulate import tabulate

    from planner.documents import model_entry

    rows = [model_entry(load_model(name)) for name in model_names()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return 0
    click.echo(tabulate([[r["name"], r["hf_id"], f"{r['params']:,}", r["layers"], r["hidden"], f"{r['vocab']:,}",
                          "yes" if r["tied"] else ""] for r in rows],
                        headers=["name", "Hugging Face id", "params", "layers", "hidden", "vocab", "tied"],
                        disable_numparse=True))
    return 0


@cli.command("gpus")
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
def gpus_cmd(as_json):
    """List the GPU catalog (memory as the driver reports it, bf16, speed, indicative price).

    \b
    Example:
      qfit gpus
    """
    from tabulate import tabulate

    from planner.report import gib_str

    gpus = [load_gpu(n) for n in gpu_names()]
    if as_json:
        from planner.documents import gpu_entry

        click.echo(json.dumps([gpu_entry(g) for g in gpus], indent=2))
        return 0
    click.echo(tabulate([[g.name, g.display_name, gib_str(g.memory_bytes), g.compute_capability,
                          "yes" if g.bf16 else "no", "yes" if g.flash_attention_2 else "no",
                          f"{max(g.bf16_tflops, g.fp16_tflops):g}", f"{g.bandwidth_gb_s:g}",
                          f"{g.price_usd_per_hour:.2f} ({g.price_date})" if g.price_usd_per_hour else "-"] for g in gpus],
                        headers=["name", "device", "GiB", "cc", "bf16", "FA2", "TFLOP/s", "GB/s", "USD/h"],
                        disable_numparse=True))
    return 0


# --------------------------------------------------------------------------- qfit calibrate

@cli.command("calibrate")
@click.option("--refit", is_flag=True, help="Refit the coefficients from measured runs (CPU; no GPU needed).")
@click.option("--runs", "runs_glob", default=None,
              help="Measured runs to fit (glob; default: the package's calibration/runs/*.csv, from any folder).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="Coefficients file to write (default calibration/coefficients.json).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None, help="Also write the report (markdown) here.")
@click.option("--gpu", "gpu", default=None, help="auto: sweep this machine's GPU and write user coefficients for it.")
@click.option("--model", "target_model", default=None, help="With --gpu auto: the model the sweep times (default: a 7B-class architecture, random weights) and also sweeps for memory.")
@click.option("--from-runs", is_flag=True, help="Refit from your own `qfit run` measurements for this GPU.")
@click.option("--minutes", type=float, default=10.0, show_default=True,
              help="With --gpu auto: the time the sweep plans for (memory 40%, step timing the rest).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (what was fitted, where it was written); progress goes to stderr.")
def calibrate_cmd(refit, runs_glob, out_path, report_path, gpu, target_model, from_runs, minutes, as_json):
    """Fit the memory model's coefficients to measured QLoRA runs.

    \b
    Examples:
      qfit calibrate --refit --report calibration/REPORT.md     # CPU: refit the committed data
      qfit calibrate --gpu auto                                 # on a CUDA machine: sweep, fit, use
    """
    from planner.documents import calibrate_document
    from planner.refit import calibrate_this_gpu, expand_runs, refit_and_report, refit_from_user_runs

    def progress(message):  # with --json, stdout holds the one document
        click.echo(message, err=as_json)

    def done(doc: dict, line: str) -> int:
        click.echo(json.dumps(doc, indent=2) if as_json else line)
        return 0

    if gpu == "auto":
        path = calibrate_this_gpu(target_model, echo=progress, minutes=minutes)
        line = f"coefficients for this GPU written to {path}; `qfit plan ... --gpu auto` uses them."
        return done(calibrate_document("gpu_auto", path, summary=line), line)
    if from_runs:
        path = refit_from_user_runs(echo=progress)
        line = f"coefficients written to {path}"
        return done(calibrate_document("from_runs", path, summary=line), line)
    if not refit:
        raise QfitError("say what to do: --refit (CPU, committed data), --gpu auto (sweep this GPU) or --from-runs")
    paths = expand_runs(runs_glob or str(CALIBRATION_DIR / "runs" / "*.csv"))
    check_runs_csv(paths)
    check_output_path(out_path, "--out")
    check_output_path(report_path, "--report")
    summary = refit_and_report(paths, out_path, report_path)
    from planner.calibration_report import REPORT_FILE
    from planner.coefficients import FITTED_FILE

    return done(calibrate_document("refit", out_path or FITTED_FILE, report_path or REPORT_FILE, paths, summary),
                summary)


def check_runs_csv(paths: list[str]) -> None:
    """Each --runs file must be a CSV with the columns every committed calibration run has (the harness layout):
    one line naming the file and the missing columns instead of a pandas traceback deep in the fit."""
    import csv

    committed = sorted((CALIBRATION_DIR / "runs").glob("*.csv"))
    need = None
    for path in committed:
        with path.open(newline="") as fh:
            header = set(next(csv.reader(fh), []))
        need = header if need is None else need & header
    for path in paths:
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh), [])
        except (OSError, UnicodeDecodeError) as exc:
            raise QfitError(f"--runs {path}: cannot read it as CSV text ({getattr(exc, 'strerror', None) or exc})") from None
        missing = sorted((need or {"model", "status"}) - set(header))
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise QfitError(f"--runs {path} is not a calibration run file (missing columns: {shown}); give CSVs "
                            "written by the calibration harness or `qfit run` (calibration/runs/*.csv)")


# --------------------------------------------------------------------------- qfit profile

@cli.command("profile")
@click.argument("source")
@click.option("--name", help="Short name for the profile (default: from the file or id).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Write the profile here (default: print it).")
@click.option("--trust-remote-code", is_flag=True, help="Allow architectures whose code lives in the model repo (runs that code).")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as one JSON document (its TOML tables as data).")
def profile_cmd(source, name, out_path, trust_remote_code, as_json):
    """Write a model profile for any architecture transformers knows (needs the `train` extra).

    SOURCE is a local config.json (or its folder) or a Hugging Face id (its config.json from the local
    Hugging Face cache, else fetched alone from the hub unless HF_HUB_OFFLINE=1).

    \b
    Example:
      qfit profile ./my-model/config.json --name my-model --out profiles/models/my-model.toml
    """
    from planner.introspect import read_config_json, require_profile_fields
    from planner.profile_writer import profile_toml

    check_output_path(out_path, "--out")
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise QfitError(f"no such file: {path}")
        config = read_config_json(path)
        hf_id, src = "", str(path)
    else:
        from planner.hf_cache import config_json

        config = read_config_json(config_json(source))  # the local Hugging Face cache first, then the hub
        hf_id, src = source, f"https://huggingface.co/{source}/blob/main/config.json"
    if config.get("auto_map") and not trust_remote_code:
        raise QfitError("this model needs trust_remote_code (its code lives in the model repo); "
                        "pass --trust-remote-code if you trust it")
    require_profile_fields(config, src)
    config.pop("auto_map", None)
    short = name or (hf_id.split("/")[-1].lower() if hf_id else path.parent.name or "model")
    try:
        text = profile_toml(short, short, hf_id, src, config, trust_remote_code=trust_remote_code)
    except QfitError:  # planner.introspect.IntrospectionError: already one line
        raise
    except Exception as exc:  # transformers' own config validation: report it, do not crash
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise QfitError(f"transformers cannot build {source}: {first.strip()}") from None
    if out_path:
        write_output(out_path, text, "--out")
    if as_json:
        import tomllib

        from planner.documents import profile_document

        click.echo(json.dumps(profile_document(tomllib.loads(text), out_path), indent=2))
    elif out_path:
        click.echo(f"profile written to {out_path}")
    else:
        click.echo(text, nl=False)
    return 0


cli.add_command(merge_cmd)


def main() -> None:  # console entry point
    cli.main()


if __name__ == "__main__":
    main()
