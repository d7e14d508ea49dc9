"""The `qfit` command line: parse -> call -> render. Only this module (and the cli_* command modules)
echo or exit. Module level imports the standard library, click and light planner modules only;
heavy libraries are imported inside the commands that need them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import click

from planner import __version__
from planner.calibration import load_coefficients
from planner.profiles import ProfileError, all_gpus, gpu_names, load_gpu, load_model, match_gpu_name, model_names
from planner.search import AUTO_SEQ_LENS, Request, search
from planner.specs import COMPUTE_DTYPES, OPTIMIZERS

# modules of the `train` extra: a command that needs them says how to install them instead of a traceback
TRAIN_EXTRA_MODULES = {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "pandas", "numpy",
                       "pynvml", "tokenizers", "safetensors", "pyarrow"}


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2."""


class QfitGroup(click.Group):
    """Every user mistake becomes one line on stderr (or {"error": ...} with --json) and exit code 2.

    Commands in their own modules load only when invoked (click's "Further Deferring Imports"):
    `qfit plan` does not compile `qfit run`'s or `qfit compare`'s code.
    """

    LAZY = {"run": ("planner.cli_run", "run_cmd"), "compare": ("planner.cli_compare", "compare_cmd")}

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx, name):
        if name in self.LAZY:
            import importlib

            module, attr = self.LAZY[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        as_json = "--json" in args
        try:
            rv = super().main(args=args, prog_name=prog_name or "qfit", complete_var=complete_var,
                              standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("aborted.", err=True)
            sys.exit(1)
        except click.UsageError as exc:
            _fail(exc.format_message(), as_json, hint=exc.ctx.command_path if exc.ctx else "qfit")
        except (UserError, ProfileError, ValueError) as exc:
            _fail(str(exc), as_json)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
                raise
            _fail(f"this command needs the train extra (missing module '{exc.name}'): pip install -e '.[train]'", as_json)
        except click.ClickException as exc:
            _fail(exc.format_message(), as_json)
        sys.exit(rv if isinstance(rv, int) else 0)


def _fail(message: str, as_json: bool, hint: str | None = None) -> None:
    message = " ".join(message.split())
    if as_json:
        click.echo(json.dumps({"error": message}))
    else:
        suffix = f" (see `{hint} --help`)" if hint else ""
        click.echo(f"error: {message}{suffix}", err=True)
    sys.exit(2)


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
        raise UserError(f"--seq-len must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise UserError(f"--seq-len must be a positive integer, got {n}")
    return n


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"{name} must be a positive integer, got {value}")


def _targets(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(t.strip() for t in value.split(",") if t.strip())
    if not names:
        raise UserError("--targets must be attn, all-linear, or a comma list of module names")
    return names


def detect_gpu_name() -> str:
    """The catalog name of GPU 0 via NVML, or a bare capacity when it is not in the catalog."""
    from planner.hardware import detect_gpu

    found = detect_gpu()
    if found is None:
        raise UserError("no NVIDIA GPU found (NVML): pass --gpu NAME or --gpu 24GiB")
    name, total = found
    spec = match_gpu_name(name)
    return spec.name if spec else f"{total}B"


def build_request(seq_len, batch_size, grad_accum, effective_batch, rank, alpha, lora_dropout, targets,
                  gradient_checkpointing, optim, compute_dtype, double_quant, expandable_segments) -> Request:
    for flag, v in (("--batch-size", batch_size), ("--grad-accum", grad_accum),
                    ("--effective-batch", effective_batch), ("--rank", rank), ("--alpha", alpha)):
        _positive(flag, v)
    if not 0.0 <= lora_dropout < 1.0:
        raise UserError(f"--lora-dropout must be in [0, 1), got {lora_dropout}")
    if batch_size and grad_accum and effective_batch and batch_size * grad_accum != effective_batch:
        raise UserError(f"--batch-size {batch_size} x --grad-accum {grad_accum} != --effective-batch {effective_batch}")
    if effective_batch and batch_size and effective_batch % batch_size:
        raise UserError(f"--effective-batch {effective_batch} is not a multiple of --batch-size {batch_size}")
    return Request(batch_size=batch_size, grad_accum=grad_accum, effective_batch=effective_batch,
                   seq_len=_seq_len(seq_len), rank=rank, alpha=alpha, lora_dropout=lora_dropout,
                   targets=_targets(targets), gradient_checkpointing=gradient_checkpointing, optim=optim,
                   compute_dtype=compute_dtype, double_quant=double_quant, expandable_segments=expandable_segments)


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
        click.option("--optim", type=click.Choice(OPTIMIZERS), help="Optimizer (default: searched, paged_adamw_32bit first)."),
        click.option("--compute-dtype", type=click.Choice(COMPUTE_DTYPES), help="Compute dtype (default bf16 where the GPU has it, else fp16)."),
        click.option("--double-quant/--no-double-quant", default=True, show_default=True, help="bitsandbytes double quantization of the 4-bit scales."),
        click.option("--expandable-segments/--no-expandable-segments", default=True, show_default=True,
                     help="Model PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (what qfit run sets)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def no_fit_advice(model, req: Request, coeffs, gpu) -> list[str]:
    """What would fit: the smallest catalog GPU, and a shorter sequence on this one."""
    lines = []
    for other in all_gpus():
        if other.memory_bytes <= gpu.memory_bytes:
            continue
        if search(model, other, req, coeffs).best is not None:
            lines.append(f"  would fit: one {other.display_name} ({other.name}) or any larger catalog GPU "
                         "(multi-GPU sharding is not planned yet).")
            break
    else:
        lines.append("  no single catalog GPU fits this model with these settings.")
    if req.seq_len != 0:
        for seq in reversed(AUTO_SEQ_LENS):
            if seq < (req.seq_len or 512) and search(model, gpu, replace(req, seq_len=seq), coeffs).best is not None:
                lines.append(f"  on this card: --seq-len {seq} fits.")
                break
    return lines


@cli.command("plan")
@click.argument("model")
@click.option("--gpu", default="auto", show_default=True, help="Catalog name (`qfit gpus`), a capacity like 24GiB, or auto (NVML).")
@plan_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (schema in the README).")
@click.option("--save", type=click.Path(dir_okay=False), help="Also write the plan JSON to this file (for `qfit run --plan`).")
@click.option("--coefficients", type=click.Path(exists=True, dir_okay=False), help="Use this coefficients file instead of the calibrated one.")
@click.option("--fit-map", type=click.Path(dir_okay=False), help="Write a PNG heatmap of micro-batch x sequence length: fits or not, GiB per cell.")
@click.option("--exact", is_flag=True, help="Also trace the recommended step on fake tensors (real transformers + peft + bitsandbytes; needs the train extra, ~10 s).")
def plan_cmd(model, gpu, as_json, save, coefficients, fit_map, exact, **knobs):
    """Plan a QLoRA fine-tune: peak memory by named term, and the fastest settings that fit.

    MODEL is a short name (`qfit models`), a Hugging Face id, or a path to a config.json.

    \b
    Example:
      qfit plan mistral-7b --gpu t4
      qfit plan meta-llama/Llama-3.1-8B --gpu 24GiB --seq-len 2048 --json
    """
    from planner.report import plan_json, render_no_fit, render_plan

    spec = load_model(model)
    gpu_name = detect_gpu_name() if gpu == "auto" else gpu
    gpu_spec = load_gpu(gpu_name)
    req = build_request(**knobs)
    if req.seq_len and req.seq_len > spec.max_position_embeddings:
        raise UserError(f"--seq-len {req.seq_len} exceeds {spec.display_name}'s max_position_embeddings "
                        f"({spec.max_position_embeddings})")
    coeffs = load_coefficients(gpu_spec.name, coefficients)
    result = search(spec, gpu_spec, req, coeffs)
    doc = plan_json(result, spec, coeffs)
    if save:
        Path(save).write_text(json.dumps(doc, indent=2) + "\n")
    if fit_map:
        from planner.fitmap import fit_map_png

        fit_map_png(spec, gpu_spec, req, coeffs, fit_map)
    exact_text = None
    if exact and result.best is not None:
        exact_text = _exact(spec, result.best, doc)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    elif result.best is None:
        head = render_plan(result, spec, coeffs, gpu_spec.display_name).split("\n")[:2]
        click.echo("\n".join(head))
        click.echo(f"qfit plan {spec.name} --gpu {gpu_spec.name}: " + "\n".join(render_no_fit(result, spec)))
        click.echo("\n".join(no_fit_advice(spec, req, coeffs, gpu_spec)))
    else:
        click.echo(render_plan(result, spec, coeffs, gpu_spec.display_name))
        if exact_text:
            click.echo("\n" + exact_text)
    if save and not as_json:
        click.echo(f"\nplan saved to {save} (use it with `qfit run --plan {save}`)")
    return 0 if result.best is not None else 1


def _exact(spec, best, doc: dict) -> str:
    """`--exact`: trace the recommended plan; adds doc["exact"] and returns the text section."""
    try:
        import torch  # noqa: F401  (the train extra)
    except ImportError:
        raise UserError("--exact traces the real stack: install the train extra (pip install -e '.[train]')") from None
    from planner.cli_exact import exact_json, exact_section
    from planner.exact import device_for, trace_step

    device = device_for(best.gpu)
    traced = trace_step(spec, best.lora, best.train, device=device)
    doc["exact"] = exact_json(spec, best.lora, best.train, best.memory, result=traced, device=device)
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

    rows = []
    for name in model_names():
        m = load_model(name)
        rows.append({"name": m.name, "hf_id": m.hf_id, "params": m.total_param_count, "layers": m.num_hidden_layers,
                     "hidden": m.hidden_size, "vocab": m.vocab_size, "tied": m.tie_word_embeddings})
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
        click.echo(json.dumps([{"name": g.name, "display_name": g.display_name, "memory_bytes": g.memory_bytes,
                                "compute_capability": g.compute_capability, "bf16": g.bf16,
                                "flash_attention_2": g.flash_attention_2, "bf16_tflops": g.bf16_tflops,
                                "fp16_tflops": g.fp16_tflops, "bandwidth_gb_s": g.bandwidth_gb_s,
                                "price_usd_per_hour": g.price_usd_per_hour, "price_date": g.price_date}
                               for g in gpus], indent=2))
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
@click.option("--runs", "runs_glob", default="calibration/runs/*.csv", show_default=True, help="Measured runs to fit (glob).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None, help="Coefficients file to write (default calibration/coefficients.json).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None, help="Also write the report (markdown) here.")
@click.option("--gpu", "gpu", default=None, help="auto: sweep this machine's GPU and write user coefficients for it.")
@click.option("--model", "target_model", default=None, help="With --gpu auto: also sweep this model (default: a small one only).")
@click.option("--from-runs", is_flag=True, help="Refit from your own `qfit run` measurements for this GPU.")
def calibrate_cmd(refit, runs_glob, out_path, report_path, gpu, target_model, from_runs):
    """Fit the memory model's coefficients to measured QLoRA runs.

    \b
    Examples:
      qfit calibrate --refit --report calibration/REPORT.md     # CPU: refit the committed data
      qfit calibrate --gpu auto                                 # on a CUDA machine: sweep, fit, use
    """
    from planner import calibrate

    if gpu == "auto":
        path = calibrate.calibrate_this_gpu(target_model, echo=click.echo)
        click.echo(f"coefficients for this GPU written to {path}; `qfit plan ... --gpu auto` uses them.")
        return 0
    if from_runs:
        path = calibrate.refit_from_user_runs(echo=click.echo)
        click.echo(f"coefficients written to {path}")
        return 0
    if not refit:
        raise UserError("say what to do: --refit (CPU, committed data), --gpu auto (sweep this GPU) or --from-runs")
    paths = calibrate.expand_runs(runs_glob)
    summary = calibrate.refit_and_report(paths, out_path, report_path)
    click.echo(summary)
    return 0


# --------------------------------------------------------------------------- qfit profile

@cli.command("profile")
@click.argument("source")
@click.option("--name", help="Short name for the profile (default: from the file or id).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Write the profile here (default: print it).")
@click.option("--trust-remote-code", is_flag=True, help="Allow architectures whose code lives in the model repo (runs that code).")
def profile_cmd(source, name, out_path, trust_remote_code):
    """Write a model profile for any architecture transformers knows (needs the `train` extra).

    SOURCE is a local config.json (or its folder) or a Hugging Face id (needs network).

    \b
    Example:
      qfit profile ./my-model/config.json --name my-model --out profiles/models/my-model.toml
    """
    from planner.introspect import IntrospectionError, read_config_json
    from planner.profile_writer import profile_toml

    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise UserError(f"no such file: {path}")
        config = read_config_json(path)
        hf_id, src = "", str(path)
    else:
        try:
            from huggingface_hub import hf_hub_download

            config = read_config_json(hf_hub_download(source, "config.json"))
        except Exception as exc:  # offline, gated, unknown id
            raise UserError(f"cannot fetch config.json for '{source}' ({type(exc).__name__}); "
                            "download it and pass the file path") from None
        hf_id, src = source, f"https://huggingface.co/{source}/blob/main/config.json"
    if config.get("auto_map") and not trust_remote_code:
        raise UserError("this model needs trust_remote_code (its code lives in the model repo); "
                        "pass --trust-remote-code if you trust it")
    config.pop("auto_map", None)
    short = name or (hf_id.split("/")[-1].lower() if hf_id else path.parent.name or "model")
    try:
        text = profile_toml(short, short, hf_id, src, config, trust_remote_code=trust_remote_code)
    except IntrospectionError as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:  # transformers' own config validation: report it, do not crash
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UserError(f"transformers cannot build {source}: {first.strip()}") from None
    if out_path:
        Path(out_path).write_text(text)
        click.echo(f"profile written to {out_path}")
    else:
        click.echo(text, nl=False)
    return 0


def main() -> None:  # console entry point
    cli.main()


if __name__ == "__main__":
    main()
