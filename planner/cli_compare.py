"""`qfit compare`: parse -> planner.compare.compare -> planner.report_compare. The `qfit` group loads it
when the command is invoked (planner.cli_errors.QfitGroup.LAZY); `python -m planner.cli_compare ...` runs it alone.

Errors are QfitErrors, turned into one line by planner.cli_errors (stderr `error: ...`, or with --json
`{"error": "..."}` on stdout; exit code 2); never a traceback. Module level imports only the standard library, click and
planner modules (tabulate through planner.report_compare); matplotlib is imported by --plot only.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import click

from planner.cli import build_request, plan_options
from planner.cli_errors import QfitCommand, check_output_path
from planner.compare import SORT_KEYS, Workload, compare, workload_from_records
from planner.errors import QfitError
from planner.fitmap import require_matplotlib
from planner.profiles import all_gpus, load_gpu, load_model

_COUNT_RE = re.compile(r"^\s*([0-9][0-9_,]*(?:\.[0-9]+)?|[0-9]*\.[0-9]+)(?:e([0-9]+))?\s*([kKmMbB]?)\s*$")
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}


class CompareCommand(QfitCommand):
    """`qfit compare`'s usage errors point to its --help in its own words."""

    default_prog_name = "qfit compare"

    @staticmethod
    def usage_hint(command_path: str) -> str:
        return "`qfit compare --help` shows the options"


# --------------------------------------------------------------------------- parsing helpers

def parse_count(text: str, flag: str) -> int:
    """'5250000', '5,250,000', '5.25M', '2e6', '800k' -> int."""
    m = _COUNT_RE.match(text)
    if not m:
        raise QfitError(f"{flag} must be a positive whole number such as 2000000, 2M or 800k, got {text!r}")
    try:
        value = float(m.group(1).replace(",", "").replace("_", "")) * 10 ** int(m.group(2) or 0)
        return round(value * _SUFFIX[m.group(3).lower()])
    except OverflowError:
        raise QfitError(f"{flag} {text} is too large to be a token count") from None


def parse_gpus(text: str) -> list:
    if text.strip().lower() == "all":
        return all_gpus()
    names = [t for t in (s.strip() for s in text.split(",")) if t]
    if not names:
        raise QfitError("--gpu must name at least one GPU (comma-separated) or be 'all'")
    gpus, seen = [], set()
    for n in names:
        gpu = load_gpu(n)  # ProfileError with did-you-mean
        if gpu.name not in seen:
            seen.add(gpu.name)
            gpus.append(gpu)
    return gpus


def parse_prices(items: tuple[str, ...]) -> dict[str, float]:
    """('h200=3.10', 'rtx4090=$0.50') -> {'h200': 3.1, 'rtx4090': 0.5}."""
    out = {}
    for item in items:
        gpu_text, sep, price_text = item.rpartition("=")
        if not sep or not gpu_text.strip():
            raise QfitError(f"--price takes GPU=USD_PER_HOUR, e.g. --price h200=3.10; got {item!r}")
        try:
            price = float(price_text.strip().lstrip("$"))
        except ValueError:
            raise QfitError(f"--price {item}: the price must be a number of USD per GPU-hour, "
                            f"e.g. --price {gpu_text.strip()}=3.10") from None
        if not 0 <= price < float("inf"):
            raise QfitError(f"--price {item}: the price must be zero or positive (USD per GPU-hour)")
        out[load_gpu(gpu_text.strip()).name] = price
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_records(path: str):
    """Records of a .jsonl, .json or .csv dataset, read with the standard library (no tokenizer)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise QfitError(f"--dataset: no such file: {path}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".jsonl":
            records = []
            with p.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise QfitError(f"--dataset {path}: line {lineno} is not valid JSON ({exc.msg})") from None
            return records
        if suffix == ".json":
            try:
                doc = json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise QfitError(f"--dataset {path} is not valid JSON ({exc.msg}, line {exc.lineno}); "
                                "one JSON object per line needs the .jsonl extension") from None
            if isinstance(doc, list):
                return doc
            if isinstance(doc, dict):  # {"train": [...]} or {"data": [...]}: the one list of records inside
                lists = [v for v in doc.values() if isinstance(v, list)]
                if len(lists) == 1:
                    return lists[0]
            raise QfitError(f"--dataset {path}: expected a JSON list of examples (or an object holding one list)")
        if suffix == ".csv":
            with p.open(encoding="utf-8", newline="") as fh:
                # numeric cells (ids, scores) are not text
                return [{k: v for k, v in row.items() if isinstance(v, str) and not _is_number(v)}
                        for row in csv.DictReader(fh)]
    except UnicodeDecodeError:
        raise QfitError(f"--dataset {path} is not UTF-8 text") from None
    raise QfitError(f"--dataset must be a .jsonl, .json or .csv file, got {p.name}")


def build_workload(dataset, examples, avg_tokens, tokens, epochs) -> Workload:
    given = [name for name, v in (("--dataset", dataset), ("--examples", examples), ("--tokens", tokens)) if v is not None]
    if not given and avg_tokens is None:
        raise QfitError("give the workload: --examples N --avg-tokens T, --tokens N, or --dataset FILE")
    if len(given) > 1:
        raise QfitError(f"give one workload, not {' and '.join(given)}: "
                        "--examples N --avg-tokens T, --tokens N, or --dataset FILE")
    if epochs is not None and not epochs > 0:
        raise QfitError(f"--epochs must be a positive number, got {epochs:g}")
    epochs = 1.0 if epochs is None else epochs
    if dataset is not None:
        if avg_tokens is not None:
            raise QfitError("--avg-tokens goes with --examples; --dataset counts its own tokens")
        return workload_from_records(read_records(dataset), epochs)
    if tokens is not None:
        if avg_tokens is not None:
            raise QfitError("--avg-tokens goes with --examples, not with --tokens")
        return Workload.from_tokens(parse_count(tokens, "--tokens"), epochs)
    if examples is None:
        raise QfitError("--avg-tokens needs --examples N (how many examples)")
    if avg_tokens is None:
        raise QfitError("--examples needs --avg-tokens T (average tokens per example)")
    return Workload.from_examples(examples, avg_tokens, epochs)


# --------------------------------------------------------------------------- the command

@click.command("compare", cls=CompareCommand)
@click.argument("model")
@click.option("--dataset", metavar="FILE", help="A .jsonl/.json/.csv dataset: tokens approximated as "
              "1 per 4 characters of its text fields (no tokenizer).")
@click.option("--examples", type=int, metavar="N", help="Number of training examples (with --avg-tokens).")
@click.option("--avg-tokens", type=float, metavar="T", help="Average tokens per example.")
@click.option("--tokens", metavar="N", help="Tokens in one epoch of the dataset (2000000, 2M, 800k).")
@click.option("--epochs", type=float, metavar="E", help="Passes over the data (default 1); total tokens scale with it.")
@click.option("--gpu", "gpus", default="all", show_default=True, metavar="LIST",
              help="Comma-separated catalog GPUs or capacities (t4,l4,h100-sxm,24GiB) or 'all'.")
@click.option("--gpus", "gpus_alias", metavar="LIST", hidden=True)  # the older name of --gpu
@plan_options
@click.option("--num-gpus", type=int, default=1, show_default=True, metavar="N",
              help="Hold the GPU count fixed: plan every GPU kind on N of them, as `qfit plan --num-gpus N` does.")
@click.option("--price", "prices", multiple=True, metavar="GPU=USD",
              help="Price per GPU-hour, overriding the profile's indicative price (repeatable).")
@click.option("--max-hours", type=float, metavar="H", help="Drop GPUs whose estimated wall time exceeds H hours.")
@click.option("--max-cost", type=float, metavar="USD", help="Drop GPUs whose estimated cost exceeds USD.")
@click.option("--sort", "sort_by", type=click.Choice(SORT_KEYS), default="cost", show_default=True,
              help="Order of the fitting GPUs.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of per-GPU objects (GPUs over the limits are left out).")
@click.option("--plot", metavar="FILE.png", help="Write a cost-vs-time scatter (needs matplotlib).")
def compare_cmd(model, dataset, examples, avg_tokens, tokens, epochs, gpus, gpus_alias, num_gpus, prices, max_hours,
                max_cost, sort_by, as_json, plot, **knobs):
    """Which GPU, how long, at what cost: the best QLoRA plan on every GPU for one workload.

    Time is total tokens / estimated tokens/s (calibrated on H200 runs, other GPUs scaled by
    datasheet ratios); cost is time x price per GPU-hour. GPUs the model does not fit on say why,
    and how many of them an FSDP-sharded run would need (per-GPU memory calibrated on 2 x H200).

    The plan options are `qfit plan`'s: every GPU is planned with them (e.g. --rank 8 --seq-len 1024).

    Example: qfit compare mistral-7b --examples 5000 --avg-tokens 350 --epochs 3
    """
    from planner.coefficients import load_coefficients
    from planner.documents import compare_document
    from planner.report_compare import cost_time_png, render_text
    if plot is not None:
        if not plot.lower().endswith(".png"):
            raise QfitError(f"--plot writes a PNG: give a file name ending in .png, got {plot!r}")
        require_matplotlib("--plot")  # before the work: a missing dependency is one line, exit 2
    if gpus_alias is not None:
        if gpus != "all":
            raise QfitError("give the GPUs once: --gpu LIST (--gpus is its older name)")
        gpus = gpus_alias
    check_output_path(plot, "--plot")
    if num_gpus < 1:
        raise QfitError(f"--num-gpus must be a positive integer, got {num_gpus}")
    request = build_request(**knobs)
    if request.seq_len == 0:
        raise QfitError("--seq-len auto plans one GPU (`qfit plan`); compare GPUs at one length, e.g. --seq-len 1024")
    workload = build_workload(dataset, examples, avg_tokens, tokens, epochs)
    spec = load_model(model)
    if request.seq_len and request.seq_len > spec.max_position_embeddings:
        raise QfitError(f"--seq-len {request.seq_len} exceeds {spec.display_name}'s max_position_embeddings "
                        f"({spec.max_position_embeddings})")
    gpu_list = parse_gpus(gpus)
    price_map = parse_prices(prices)
    result = compare(spec, workload, gpu_list, load_coefficients(), request=request,
                     prices=price_map, max_hours=max_hours, max_cost=max_cost, sort=sort_by, num_gpus=num_gpus)
    if plot is not None:  # before any output, so that a failure leaves one error and nothing else
        try:
            cost_time_png(result, plot)
        except OSError as exc:
            raise QfitError(f"--plot: cannot write {plot}: {exc.strerror or exc}") from None
    if as_json:
        click.echo(json.dumps(compare_document(result), indent=2))
    else:
        click.echo(render_text(result))
    if plot is not None:
        click.echo(f"plot: wrote {plot} (cost vs time, Pareto front in red)", err=as_json)
    return 0 if result.fitting else 1  # as `qfit plan`: 1 when no GPU fits (within the limits)


if __name__ == "__main__":
    compare_cmd()
