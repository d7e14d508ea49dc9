"""`qfit run`'s options and result: what the user asked for (RunOptions, checked on construction), what a
run returns (RunResult), the one error a user can fix (RunError) and the training recipe's defaults.

Standard library and light planner modules only, so `qfit run --help` and option errors are instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from planner import data as qdata
from planner.errors import QfitError
from planner.specs import COMPUTE_DTYPES, OPTIMIZERS

# Training recipe defaults (QLoRA, Dettmers et al. 2023, github.com/artidoro/qlora: lr 2e-4 for
# 7B/13B, max_grad_norm 0.3, warmup_ratio 0.03); the schedule is cosine as `qfit run` promises.
DEFAULT_LEARNING_RATE = 2e-4
DEFAULT_WARMUP = 0.03  # below 1: a fraction of the steps (transformers 5 warmup_steps accepts a ratio)
MAX_GRAD_NORM = 0.3
SAVE_TOTAL_LIMIT = 2  # checkpoints kept (each: adapter + optimizer state, about 3x the adapter)
AUTO_SAVE_FRACTION = 10  # with no --save-steps: a checkpoint every tenth of the run...
AUTO_SAVE_MAX_STEPS = 500  # ...but at least every 500 steps
LOG_POINTS = 500  # about this many loss values logged per run
# "longest": each micro-batch padded to its longest row (the default); "max-length": every row padded to
# --seq-len, as classic recipes do with tokenizer(padding="max_length"): same memory, more computed tokens
PADDINGS = ("longest", "max-length")
SCHEDULERS = ("cosine", "linear", "constant")  # --scheduler; constant keeps the warmup (constant_with_warmup)
REPORT_TO = ("tensorboard", "wandb", "none")  # --report-to; default: tensorboard when installed, else none
# Validation split when neither --eval-dataset nor --eval-fraction is given: 5% of the rows, at most 200, held
# back from training, and only when the data has at least 100 rows (fewer: every row is needed for training)
DEFAULT_EVAL_FRACTION = 0.05
DEFAULT_EVAL_MAX_ROWS = 200
DEFAULT_EVAL_MIN_ROWS = 100
AUTO_EVAL_POINTS = 10  # with no --eval-steps: an evaluation every tenth of the run (and one at the end)
SAMPLE_MAX_NEW_TOKENS = 40  # --sample-prompt: greedy completion length


class RunError(QfitError):
    """A problem the user can fix (options, output directory, model, fit): one line, says what to do."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one line of at most `limit` characters (its first line, or its type's name)."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


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
    packing: bool | None = None  # rows packed into micro-batches (planner/packing.py); None: on when rows are shorter
    optimize: str = "quality"  # planner.search.OPTIMIZE
    method: str | None = None  # planner.search.METHOD_CHOICES; None: the saved plan's, else qlora
    num_gpus: int | None = None  # > 1: planner.train.dist_run launches one process per GPU through accelerate
    strategy: str | None = None  # with num_gpus > 1: "ddp" or "fsdp"; None: DDP when it fits, else FSDP
    loading: str | None = None  # FSDP's load: "sharded" (planner.train.sharded_load; None means it) or "full"
    num_machines: int | None = None  # several nodes: every node runs the same command with its own machine_rank
    machine_rank: int | None = None
    main_process_ip: str | None = None  # machine 0's address (torchrun's static rendezvous)
    main_process_port: int | None = None
    dry_run: bool = False  # with --num-gpus: plan, write the launch files, print the command; do not train
    seed: int = 42
    scheduler: str | None = None  # SCHEDULERS; None: cosine
    report_to: str | None = None  # REPORT_TO; None: tensorboard when installed, else none
    eval_dataset: str | None = None  # a validation file, tokenized and packed like the training data
    eval_fraction: float | None = None  # share of the training rows held back (0: no validation); None: default
    eval_steps: int | None = None  # evaluate every N steps (None: a tenth of the run) and at the end
    sample_prompt: str | None = None  # after training: a greedy completion of this prompt with the adapter
    progress: bool = True  # the tqdm bar (stderr)

    def __post_init__(self) -> None:
        for flag, value in (("--max-steps", self.max_steps), ("--seq-len", self.seq_len),
                            ("--effective-batch", self.effective_batch), ("--batch-size", self.batch_size),
                            ("--rank", self.rank), ("--alpha", self.alpha), ("--save-steps", self.save_steps),
                            ("--eval-steps", self.eval_steps)):
            if value is not None and value < 1:
                raise RunError(f"{flag} must be a positive integer, got {value}")
        if self.epochs is not None and self.epochs <= 0:
            raise RunError(f"--epochs must be positive, got {self.epochs}")
        if self.warmup is not None and (self.warmup < 0 or (self.warmup >= 1 and self.warmup != int(self.warmup))):
            raise RunError(f"--warmup must be a fraction of the steps (0 to 1) or a whole number of steps, got {self.warmup}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise RunError(f"--seed must be an integer from 0 to 4294967295, got {self.seed!r}")
        if self.method not in (None, "qlora") and (self.num_gpus or 1) > 1:
            raise RunError(f"--method {self.method} trains on one GPU: multi-GPU runs are QLoRA only "
                           "(drop --method or --num-gpus)")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise RunError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.report_to is not None and self.report_to not in REPORT_TO:
            raise RunError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        if self.eval_fraction is not None and not 0 <= self.eval_fraction < 0.5:
            raise RunError(f"--eval-fraction must be from 0 (no validation) to below 0.5, got {self.eval_fraction}")
        if self.eval_dataset is not None and self.eval_fraction:
            raise RunError("give --eval-dataset or --eval-fraction, not both")
        if self.eval_steps is not None and (self.eval_fraction == 0 and self.eval_dataset is None):
            raise RunError("--eval-steps needs a validation set: drop --eval-fraction 0 or give --eval-dataset")
        if (self.num_gpus or 1) > 1 and (self.eval_dataset or self.eval_fraction or self.eval_steps):
            raise RunError("validation (--eval-dataset, --eval-fraction, --eval-steps) runs on one GPU for now: "
                           "drop it or --num-gpus")
        if self.sample_prompt is not None and not self.sample_prompt.strip():
            raise RunError("--sample-prompt needs some text, e.g. --sample-prompt 'Name three colors.'")
        if self.report_to not in (None, "none") and (self.num_gpus or 1) > 1:
            raise RunError("--report-to runs on one GPU for now (several GPUs log to run_report.json): drop it or --num-gpus")
        if self.sample_prompt is not None and (self.num_gpus or 1) > 1:
            raise RunError("--sample-prompt runs on one GPU for now: drop it or --num-gpus")
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
        if self.loading is not None and self.loading not in ("sharded", "full"):
            raise RunError(f"--loading must be sharded or full, got {self.loading!r}")
        if self.loading is not None and self.strategy == "ddp":
            raise RunError("--loading is FSDP's (under DDP every rank loads the whole model): drop it or use --strategy fsdp")
        if self.loading is not None and (self.num_gpus or 1) < 2:
            raise RunError("--loading needs --num-gpus 2 or more (it is how FSDP loads the model)")
        if self.strategy is not None and (self.num_gpus or 1) < 2:
            raise RunError("--strategy needs --num-gpus 2 or more (one GPU needs no strategy)")
        if self.padding is not None and self.padding not in PADDINGS:
            raise RunError(f"--padding must be one of {', '.join(PADDINGS)}, got {self.padding!r}")
        if self.packing and self.padding == "max-length":
            raise RunError("--packing fills every row with whole examples; --padding max-length pads each row: "
                           "give one of them")
        if self.optimize not in ("quality", "speed"):
            raise RunError(f"--optimize must be quality or speed, got {self.optimize!r}")
        if self.targets is not None and not self.targets:
            raise RunError("--targets must be attn, all-linear, or a comma list of module names")
        if self.epochs is not None and self.max_steps is not None:
            raise RunError("give --epochs or --max-steps, not both")
        if self.batch_size and self.effective_batch and self.effective_batch % self.batch_size:
            raise RunError(f"--effective-batch {self.effective_batch} is not a multiple of --batch-size {self.batch_size}")


# options that --resume takes from the saved run (giving them again would change the run midway)
RESUME_FIXED = ("model", "dataset", "demo", "epochs", "max_steps", "seq_len", "effective_batch", "batch_size",
                "plan_path", "rank", "alpha", "lora_dropout", "targets", "gradient_checkpointing", "optim",
                "compute_dtype", "fmt", "save_steps", "learning_rate", "warmup", "overwrite",
                "scheduler", "eval_dataset", "eval_fraction", "eval_steps", "padding", "packing", "num_gpus",
                "strategy", "loading", "num_machines", "main_process_ip", "method")


@dataclass(slots=True)
class RunResult:
    status: str  # "completed" or "interrupted"
    output_dir: Path
    report: dict
    exit_code: int = 0  # 0, or 128 + the signal number when stopped by SIGINT/SIGTERM
    checkpoint: str | None = None




@dataclass(frozen=True, slots=True)
class PreparedData:
    """The training data after it was read, tokenized and cut to the run's sequence length."""

    path: str  # the file as given (the demo's data file for --demo)
    fmt: str
    seq_len: int
    examples: list  # planner.data tokenized examples, each within seq_len
    info: dict  # run_report.json's "data": source, format, rows, examples, dropped rows, lengths, truncation
    tokenizer: object = None  # the model's tokenizer (planner.train.source.load_tokenizer), set up to pad
    eval_examples: list = ()  # the validation split (held back from `examples`, or --eval-dataset), within seq_len


def eval_split_size(rows: int, fraction: float | None) -> int:
    """How many of `rows` training examples are held back for validation. fraction None: the default
    (DEFAULT_EVAL_FRACTION, at most DEFAULT_EVAL_MAX_ROWS, none below DEFAULT_EVAL_MIN_ROWS); 0: none."""
    if fraction is None:
        if rows < DEFAULT_EVAL_MIN_ROWS:
            return 0
        return min(DEFAULT_EVAL_MAX_ROWS, max(1, round(rows * DEFAULT_EVAL_FRACTION)))
    if fraction <= 0:
        return 0
    n = max(1, round(rows * fraction))
    if n >= rows:
        raise RunError(f"--eval-fraction {fraction} of {rows} rows leaves none to train on: lower it")
    return n
