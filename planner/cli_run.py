"""`qfit run`: the command-line shell around planner.train.runner (parse -> call -> print -> exit).

The `qfit` group loads this module only when `qfit run` is invoked (planner.cli_errors.QfitGroup.LAZY);
user errors are QfitErrors, turned into one line and exit code 2 by planner.cli_errors. Module level imports
the standard library, click and light planner modules only: torch is imported when training starts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from planner.cli_errors import QfitCommand
from planner.data import FORMATS
from planner.errors import QfitError
from planner.specs import COMPUTE_DTYPES, OPTIMIZERS

EXIT_INTERRUPTED = 130  # 128 + SIGINT, also for Ctrl-C before training starts


class RunCommand(QfitCommand):
    """`qfit run` on its own (outside the `qfit` group) answers usage errors as the group does."""

    default_prog_name = "qfit run"


def _targets(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(t.strip() for t in value.split(",") if t.strip())
    if not names:
        raise click.BadParameter("name attn, all-linear, or a comma list of module names", param_hint="--targets")
    return names


@click.command("run", cls=RunCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False)
@click.option("--dataset", metavar="FILE|HF_ID",
              help="Training data: a .json, .jsonl, .csv or .parquet file (alpaca, chat or text rows). "
                   "Example: --dataset data/train.jsonl")
@click.option("--demo", is_flag=True,
              help="Fine-tune a tiny built-in model on built-in data, on the CPU, in well under a minute "
                   "(no download). Example: qfit run --demo --output /tmp/demo")
@click.option("--output", "-o", metavar="DIR",
              help="Where the adapter, checkpoints, plan.json and run_report.json go; refused if it holds "
                   "files unless --overwrite or --resume. Example: --output runs/mistral-alpaca")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier qfit run in --output (other directories are never deleted). "
                   "Example: --output runs/a --overwrite")
@click.option("--resume", metavar="DIR",
              help="Continue the run saved in DIR from its last checkpoint, with its saved settings; no step "
                   "is lost. Example: qfit run --resume runs/mistral-alpaca")
@click.option("--epochs", type=float, metavar="X",
              help="Passes over the data (default 1). Example: --epochs 3")
@click.option("--max-steps", type=int, metavar="N",
              help="Optimizer steps instead of --epochs. Example: --max-steps 500")
@click.option("--seq-len", type=int, metavar="N",
              help="Tokens per row (longer rows are cut); default: chosen from the data's lengths. Memory grows "
                   "with it. Example: --seq-len 1024")
@click.option("--effective-batch", type=int, metavar="N",
              help="Rows per optimizer step, = micro-batch x accumulation (default 16); never changed by the "
                   "OOM guard. Example: --effective-batch 32")
@click.option("--batch-size", type=int, metavar="N",
              help="Micro-batch per forward/backward (default: the planned one). Example: --batch-size 4")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), metavar="PLAN.JSON",
              help="Use the settings of a plan saved by `qfit plan MODEL --save PLAN.JSON`; options given "
                   "here override it. Example: --plan plan.json")
@click.option("--rank", type=int, metavar="N",
              help="LoRA rank; higher: more capacity and memory. Example: --rank 16")
@click.option("--alpha", type=int, metavar="N", help="LoRA alpha (default 2 x rank). Example: --alpha 32")
@click.option("--lora-dropout", type=float, metavar="P",
              help="LoRA dropout (default 0.05). Example: --lora-dropout 0.1")
@click.option("--targets", metavar="attn|all-linear|NAMES",
              help="Modules to adapt: attn, all-linear, or a comma list of names. Example: --targets q_proj,v_proj")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute activations in backward (less memory, ~30% slower); default: planned. "
                   "Example: --gradient-checkpointing")
@click.option("--uncheckpointed-layers", type=click.IntRange(min=0), metavar="N",
              help="With checkpointing on, the last N decoder layers keep their activations (no recompute); "
                   "default: planned, as many as fit. Example: --uncheckpointed-layers 0")
@click.option("--optim", type=click.Choice(OPTIMIZERS),
              help="Optimizer (default: planned). Example: --optim paged_adamw_8bit")
@click.option("--compute-dtype", type=click.Choice(COMPUTE_DTYPES),
              help="Compute dtype (default bf16 where the GPU has it, else fp16). Example: --compute-dtype fp16")
@click.option("--format", "fmt", type=click.Choice(FORMATS),
              help="Row format instead of detecting it from the first row. Example: --format chat")
@click.option("--save-steps", type=int, metavar="N",
              help="Checkpoint every N steps (default: a tenth of the run, at most 500). Example: --save-steps 100")
@click.option("--learning-rate", type=float, metavar="LR",
              help="Peak learning rate of the cosine schedule (default 2e-4; demo 5e-3). Example: --learning-rate 1e-4")
@click.option("--warmup", type=float, metavar="X",
              help="Learning-rate warmup: below 1 a fraction of the steps, else a number of steps (default 0.03; "
                   "demo 0.05). Example: --warmup 100")
@click.option("--scheduler", type=click.Choice(("cosine", "linear", "constant")),
              help="Learning-rate schedule after the warmup (default cosine). Example: --scheduler linear")
@click.option("--seed", type=int, metavar="N",
              help="Seed of the LoRA init, data order and validation split (default 42). Example: --seed 7")
@click.option("--report-to", type=click.Choice(("tensorboard", "wandb", "none")),
              help="Where the Trainer also logs loss and validation loss (default: tensorboard when installed, "
                   "else none). Example: --report-to none")
@click.option("--eval-dataset", metavar="FILE|HF_ID",
              help="Validation data, read and packed like --dataset. Default: 5% of the training rows (at most "
                   "200) are held back when there are 100 or more. Example: --eval-dataset data/val.jsonl")
@click.option("--eval-fraction", type=float, metavar="F",
              help="Share of the training rows held back for validation (0 disables it). Example: --eval-fraction 0.1")
@click.option("--eval-steps", type=int, metavar="N",
              help="Validation loss every N steps and at the end (default: a tenth of the run). Memory: eval runs "
                   "at the training micro-batch without gradients. Example: --eval-steps 50")
@click.option("--sample-prompt", metavar="TEXT",
              help="After training, print a short greedy completion (40 tokens) of TEXT by the tuned model, "
                   "formatted like the training rows. Example: --sample-prompt 'Name three colors.'")
@click.option("--padding", type=click.Choice(("longest", "max-length")),
              help="longest (default): each micro-batch padded to its longest row; max-length: every row padded to "
                   "--seq-len, as classic recipes do (same memory, more tokens computed). Example: --padding max-length")
@click.option("--packing/--no-packing", default=None,
              help="Pack whole rows into micro-batches of --seq-len tokens (no padding computed; each row attends only "
                   "to itself). Default: on when rows are shorter than --seq-len. Example: --no-packing")
@click.option("--optimize", type=click.Choice(("quality", "speed")), default="quality", show_default=True,
              help="quality: the largest LoRA adapter that fits; speed: the fastest plan of any adapter tier. "
                   "Example: --optimize speed")
@click.option("--method", type=click.Choice(("qlora", "lora", "lora-8bit", "auto")), default=None,
              help="How the frozen base is held: qlora (4-bit NF4, default), lora (16-bit), lora-8bit (LLM.int8), "
                   "auto (the best-ranked method that fits). The adapter is a standard PEFT adapter either way. "
                   "Example: --method lora")
@click.option("--num-gpus", type=click.IntRange(min=1), metavar="N",
              help="Train on N GPUs of this machine, one process each, launched by accelerate (default 1). "
                   "Example: --num-gpus 2")
@click.option("--strategy", type=click.Choice(("ddp", "fsdp")),
              help="With --num-gpus: ddp (every GPU holds the whole 4-bit model; fastest) or fsdp (the model is "
                   "sharded; for models one GPU cannot hold). Default: ddp when it fits. Example: --strategy fsdp")
@click.option("--loading", type=click.Choice(("sharded", "full")),
              help="FSDP's load: sharded (default: built on meta, sharded, the checkpoint streamed tensor by tensor and "
                   "quantized per rank; never the whole model on a GPU) or full (transformers loads the whole 4-bit model "
                   "on every GPU, then FSDP shards it). Example: --loading full")
@click.option("--num-machines", type=click.IntRange(min=1), metavar="N",
              help="Nodes in a multi-node run; run the same command on each with its own --machine-rank. "
                   "Example: --num-machines 2 --machine-rank 0 --main-process-ip 10.0.0.1")
@click.option("--machine-rank", type=click.IntRange(min=0), metavar="K", help="This node's index, 0..N-1. Example: --machine-rank 1")
@click.option("--main-process-ip", metavar="IP", help="Node 0's address. Example: --main-process-ip 10.0.0.1")
@click.option("--main-process-port", type=click.IntRange(1, 65535), metavar="PORT",
              help="Node 0's rendezvous port (default 29500). Example: --main-process-port 29501")
@click.option("--gpu", "gpu", metavar="NAME",
              help="Plan for this catalog GPU and cap the allocator to its memory on the (bigger) GPU found: what the "
                   "run would do on that card (QFIT_EMULATE_GPU). Example: --gpu t4")
@click.option("--json", "as_json", is_flag=True,
              help="Print run_report.json on stdout at the end; progress goes to stderr. Example: --json")
@click.option("--dry-run", is_flag=True,
              help="With --num-gpus: plan, write accelerate_config.json and job.json to --output and print the "
                   "launch command, without training. Example: --num-gpus 2 --dry-run")
def run_cmd(model, dataset, demo, output, overwrite, resume, epochs, max_steps, seq_len, effective_batch, batch_size,
            plan_path, rank, alpha, lora_dropout, targets, gradient_checkpointing, uncheckpointed_layers, optim, compute_dtype, fmt,
            save_steps, learning_rate, warmup, scheduler, seed, report_to, eval_dataset, eval_fraction, eval_steps,
            sample_prompt, padding, packing, optimize, method, num_gpus, strategy, loading, num_machines, machine_rank, main_process_ip,
            main_process_port, gpu, as_json, dry_run):
    """Fine-tune with QLoRA using the planned settings; an out-of-memory error never loses progress.

    Plans for the GPU found (its free memory), prints the plan, trains (4-bit NF4 base, LoRA,
    transformers' Trainer), and writes a standard PEFT adapter plus run_report.json to --output.
    Without a GPU it trains on the CPU. Ctrl-C or SIGTERM saves a checkpoint; --resume continues.

    MODEL is a profile name (`qfit models`), a Hugging Face id, or a local model directory.

    \b
    Example:
      qfit run --demo --output /tmp/qfit-demo
      qfit run mistral-7b --dataset train.jsonl --output runs/m7 --epochs 2
      qfit run --resume runs/m7
    """
    from planner.train import runner  # light at import time; torch is imported when training starts

    if resume and output and output != resume:
        raise QfitError(f"--resume {resume} continues the run in that directory: drop --output {output}")
    if resume and seed is not None:
        raise QfitError("--resume continues a run with its saved settings: drop --seed")
    if not resume and not output:
        raise QfitError("--output DIR is required (where the adapter and checkpoints go), or --resume DIR")
    if gpu:
        from planner.profiles import load_gpu

        load_gpu(gpu)  # an unknown name is one line, before anything loads
        os.environ["QFIT_EMULATE_GPU"] = gpu  # planner.train.device reads it
    echo = (lambda m: click.echo(m, err=True)) if as_json else click.echo  # with --json stdout holds the report
    try:
        opts = runner.RunOptions(
            output=resume or output, model=model, dataset=dataset, demo=demo, overwrite=overwrite,
            resume=bool(resume), epochs=epochs, max_steps=max_steps, seq_len=seq_len, effective_batch=effective_batch,
            batch_size=batch_size, plan_path=plan_path, rank=rank, alpha=alpha, lora_dropout=lora_dropout,
            targets=_targets(targets), gradient_checkpointing=gradient_checkpointing,
            uncheckpointed_layers=uncheckpointed_layers, optim=optim,
            compute_dtype=compute_dtype, fmt=fmt, save_steps=save_steps, learning_rate=learning_rate, padding=padding,
            warmup=warmup, scheduler=scheduler, report_to=report_to, eval_dataset=eval_dataset,
            eval_fraction=eval_fraction, eval_steps=eval_steps, sample_prompt=sample_prompt,
            **({"seed": seed} if seed is not None else {}),
            packing=packing, optimize=optimize, method=method,
            num_gpus=num_gpus, strategy=strategy, loading=loading, num_machines=num_machines, machine_rank=machine_rank,
            main_process_ip=main_process_ip, main_process_port=main_process_port, dry_run=dry_run)
        result = runner.run(opts, echo=echo)
    except runner.RunError as exc:  # a QfitError once planner.train.runner subclasses it; one line either way
        raise QfitError(str(exc)) from None
    except click.BadParameter as exc:  # raised by the runner, after parsing: one line without the --help pointer
        raise QfitError(exc.format_message()) from None
    except KeyboardInterrupt:
        click.echo("\n" + interrupted_line(resume or output), err=True)
        sys.exit(EXIT_INTERRUPTED)
    if as_json:
        click.echo(json.dumps(result.report, indent=2))
    if result.exit_code:
        sys.exit(result.exit_code)
    return 0


def interrupted_line(output: str | None) -> str:
    """What a Ctrl-C that stopped qfit at once (before training, or a second one during it) left on disk."""
    from planner.train.output import last_checkpoint

    ckpt = last_checkpoint(Path(output)) if output and Path(output).is_dir() else None
    if ckpt is None:
        return "interrupted: no checkpoint was saved yet"
    report = Path(output) / "run_report.json"
    if not report.exists():  # the session had no time to write its own
        report.write_text(json.dumps({"status": "interrupted", "stopped_by": "a second SIGINT", "checkpoint": str(ckpt),
                                      "resume": f"qfit run --resume {output}"}, indent=2) + "\n")
    return (f"interrupted at once (a second Ctrl-C): the current step was not saved; the last checkpoint is {ckpt}; "
            f"continue with: qfit run --resume {output}")
