"""`qfit merge`: the command-line shell around planner.train.merge (parse -> call -> print).

Module level imports click and light planner modules only: torch is imported when the merge starts.
"""

from __future__ import annotations

import click

from planner.cli_errors import QfitCommand


@click.command("merge", cls=QfitCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", metavar="RUN_DIR")
@click.option("--output", "-o", required=True, metavar="DIR",
              help="A new directory for the merged model (config, safetensors, tokenizer). Example: --output runs/m7-merged")
@click.option("--dtype", type=click.Choice(("bf16", "fp16")), default="bf16", show_default=True,
              help="Dtype of the merged weights; both need 2 bytes per parameter. Example: --dtype fp16")
def merge_cmd(run_dir, output, dtype):
    """Merge the LoRA adapter of a finished `qfit run` into its base model and save a standard model.

    Loads the base model named in RUN_DIR/run_config.json in 16 bits (on the GPU when there is one, else
    the CPU), applies the adapter and folds it into the weights. The memory it needs (base in DTYPE +
    one layer) is checked first; a merge that cannot fit is refused.

    \b
    Example:
      qfit merge runs/m7 --output runs/m7-merged
    """
    from planner.train.merge import merge

    merge(run_dir, output, dtype, echo=click.echo)
    return 0
