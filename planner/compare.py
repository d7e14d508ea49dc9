"""`qfit compare`: which GPU, how long, at what cost. Pure: no printing, no file or network I/O.

For one model and one workload (total training tokens), every GPU asked gets a row: the best plan
planner.search picks on it, the predicted peak, the estimated tokens/s, wall hours and cost, and
for a GPU it does not fit on, why (the smallest configuration's need against the card) and how
many of that GPU an FSDP-sharded 4-bit base would need (planner.multigpu's FSDP model, the one
`qfit plan --num-gpus N` uses; `qfit run --num-gpus N` runs it). Rows within the limits (max hours,
max cost) are sorted and the cost-time Pareto set is marked.

What is measured and what is estimated:
- peak memory: predicted by planner.memory with coefficients fitted on H200 runs; the multi-GPU
  count by planner.multigpu (calibrated on 2 x H200 when the coefficients carry fsdp_margin_frac);
- tokens/s: planner.speed, CPU and GPU time terms fitted on measured steps (calibration/speed/*.csv; the
  coefficients name the GPU kind, `speed_calibrated_on`). On that GPU kind the speed is 'calibrated'; every
  other GPU is scaled by its datasheet TFLOP/s and bandwidth ('estimated from datasheet ratio'), an error
  not measured here;
- hours = total tokens / tokens_per_s / 3600, assuming packed sequences (no padding tokens);
- cost = hours x price per GPU-hour (the profile's indicative price, or --price).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from planner.errors import QfitError
from planner.multigpu import (
    DEFAULT_LOADING,
    FSDP_OPTIM,
    FsdpMemory,
    MultiPlan,
    choose_multi,
    fewest_gpus,
    fsdp_per_gpu,
    multigpu_calibrated,
)
from planner.search import Request, SearchResult, make_plan, search, smallest
from planner.specs import Coefficients, GpuSpec, ModelSpec, Plan

# Coefficient key naming the GPU profile(s) the speed model was fitted on (comma-separated).
SPEED_CALIBRATED_ON_KEY = "speed_calibrated_on"
SPEED_CALIBRATED = "calibrated"
SPEED_DATASHEET = "estimated from datasheet ratio"
SPEED_NONE = "no speed facts"
# Coefficient key of the cross-validated relative error of tokens/s (percent); absent -> 'unknown'.
SPEED_ERROR_KEY = "speed_cv_error_pct"
CHARS_PER_TOKEN = 4  # rough English average for BPE tokenizers; --dataset says it is an approximation
MULTI_GPU_COUNTS = range(2, 9)  # 2..8 GPUs of one host
SORT_KEYS = ("cost", "time")


# --------------------------------------------------------------------------- workload

@dataclass(frozen=True, slots=True)
class Workload:
    """How many tokens the fine-tune processes. total_tokens = tokens_per_epoch x epochs."""

    tokens_per_epoch: int
    epochs: float = 1.0
    examples: int | None = None  # None when given as a token count
    approximate: bool = False  # True when counted from characters (--dataset), not a tokenizer

    def __post_init__(self) -> None:
        if self.examples is not None and self.examples < 1:
            raise QfitError(f"--examples must be a positive integer, got {self.examples}")
        if self.tokens_per_epoch < 1:
            raise QfitError(f"the workload must have at least one token, got {self.tokens_per_epoch} "
                             "(--tokens, or --examples x --avg-tokens)")
        if not self.epochs > 0 or math.isinf(self.epochs):
            raise QfitError(f"--epochs must be a positive number, got {self.epochs}")

    @classmethod
    def from_examples(cls, examples: int, avg_tokens: float, epochs: float = 1.0,
                      approximate: bool = False) -> Workload:
        if examples < 1:
            raise QfitError(f"--examples must be a positive integer, got {examples}")
        if not (avg_tokens > 0 and math.isfinite(avg_tokens)):
            raise QfitError(f"--avg-tokens must be a positive number, got {avg_tokens}")
        return cls(tokens_per_epoch=round(examples * avg_tokens), epochs=epochs, examples=examples,
                   approximate=approximate)

    @classmethod
    def from_tokens(cls, tokens: int, epochs: float = 1.0) -> Workload:
        if tokens < 1:
            raise QfitError(f"--tokens must be a positive integer, got {tokens}")
        return cls(tokens_per_epoch=tokens, epochs=epochs)

    @property
    def total_tokens(self) -> int:
        return round(self.tokens_per_epoch * self.epochs)

    @property
    def avg_tokens(self) -> float | None:
        return self.tokens_per_epoch / self.examples if self.examples else None


def record_chars(record) -> int:
    """Characters in the text fields of one dataset record: every string, at any depth
    (chat 'messages' lists included); numbers, booleans and nulls are not text."""
    if isinstance(record, str):
        return len(record)
    if isinstance(record, Mapping):
        return sum(record_chars(v) for v in record.values())
    if isinstance(record, (list, tuple)):
        return sum(record_chars(v) for v in record)
    return 0


def approx_tokens(chars: int) -> int:
    """1 token per CHARS_PER_TOKEN characters, rounded up: an approximation, not a tokenizer."""
    return -(-chars // CHARS_PER_TOKEN)


def workload_from_records(records: Iterable, epochs: float = 1.0) -> Workload:
    """A dataset's records (dicts from json/jsonl/csv) -> an approximate Workload."""
    examples = tokens = 0
    for rec in records:
        examples += 1
        tokens += approx_tokens(record_chars(rec))
    if examples == 0:
        raise QfitError("--dataset holds no examples")
    if tokens == 0:
        raise QfitError("--dataset holds no text fields to count tokens in")
    return Workload(tokens_per_epoch=tokens, epochs=epochs, examples=examples, approximate=True)


# --------------------------------------------------------------------------- time and money

def wall_hours(total_tokens: int, tokens_per_s: float) -> float | None:
    """hours = tokens / tokens_per_s / 3600; None when there is no speed estimate."""
    if tokens_per_s <= 0:
        return None
    return total_tokens / tokens_per_s / 3600.0


def cost_usd(hours: float | None, price_usd_per_hour: float | None) -> float | None:
    """cost = hours x price per GPU-hour; None when either is unknown."""
    if hours is None or price_usd_per_hour is None:
        return None
    return hours * price_usd_per_hour


def pareto_flags(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (hours, cost) points: True where no other point is at least as good on both and
    strictly better on one (minimisation). Equal points are all on the front."""
    flags = []
    for i, (h, c) in enumerate(points):
        dominated = any(h2 <= h and c2 <= c and (h2 < h or c2 < c)
                        for j, (h2, c2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


# --------------------------------------------------------------------------- the search, shared

def search_all(model: ModelSpec, gpus: Sequence[GpuSpec], req: Request,
               coeffs: Coefficients) -> dict[str, SearchResult]:
    """planner.search.search for every GPU, with the memory estimates shared between GPUs (memory
    depends on the model and settings, not on the card): 15 GPUs cost ~2 x 120 estimates, not 15 x 120."""
    memo: dict = {}
    return {gpu.name: search(model, gpu, req, coeffs, memo) for gpu in gpus}


# --------------------------------------------------------------------------- multi-GPU count

@dataclass(frozen=True, slots=True)
class MultiGpuEstimate:
    """Per-GPU memory of FSDP full-shard QLoRA on `count` GPUs.

    The numbers come from planner.multigpu.fsdp_per_gpu (the single source of the FSDP model; see
    its docstring for the facts modelled), for the smallest single-GPU configuration's LoRA and
    batch settings with the optimizer switched to adamw_torch (bitsandbytes' optimizers do not
    work under FSDP2), loaded shard by shard (FSDP_LOADING = "sharded", planner.train.sharded_load; an estimate),
    with CPU offload when no count fits without it (cpu_offload; cpu_ram_bytes is then the node's host memory).
    The training phase reads
      training_needs = shard + replicated + gathered_layer, where
      shard          = this GPU's 1/N of the 4-bit base, constants, compute-dtype unquantized
                       weights, LoRA weights, gradients and AdamW state;
      gathered_layer = two decoder layers all-gathered (current + prefetch) and the root unit
                       (embeddings, lm_head, final norm) in the compute dtype;
      replicated     = per-rank activations, logits, allocator slack, FSDP margin, CUDA context, NCCL buffers.
    per_gpu_needs_bytes is the max of that and the load phase (memory.load_needs_bytes: the rank's shards, the
    whole quant_state and one tensor being quantized). calibrated: the coefficients carry the 2 x H200 multi-GPU calibration.
    Communication time and the speed of a sharded run are not modelled.
    """

    count: int
    per_gpu_needs_bytes: int
    sharded_bytes: int  # total, before dividing: everything FSDP shards over the GPUs
    shard_bytes: int  # per GPU: this GPU's shards
    replicated_bytes: int
    gathered_layer_bytes: int
    capacity_bytes: int
    memory: FsdpMemory
    calibrated: bool = False

    @property
    def peak_phase(self) -> str:
        return self.memory.peak_phase

    @property
    def cpu_offload(self) -> bool:
        return self.memory.cpu_offload

    @property
    def cpu_ram_bytes(self) -> int:
        """Host memory of the node (planner.multigpu.CpuRam): offloaded shards and the loaders' read buffers."""
        return self.memory.cpu_ram.total_bytes


# what `qfit plan --num-gpus` and `qfit run --strategy fsdp` do: the sharded loader (planner.train.sharded_load). The
# measured whole-model-first load ("full") stays in `qfit plan --loading full`; "rank0_cpu" is refused there.
FSDP_LOADING = DEFAULT_LOADING


def fsdp_per_gpu_bytes(plan: Plan, count: int, coeffs: Coefficients, cpu_offload: bool = False) -> MultiGpuEstimate:
    """The per-GPU memory above for one plan (normally the smallest single-GPU configuration)."""
    train = replace(plan.train, optim=FSDP_OPTIM)
    mem = fsdp_per_gpu(plan.model, plan.lora, train, coeffs, count, cpu_offload=cpu_offload, loading=FSDP_LOADING)
    shard_fields = ("quantized_weights", "quant_constants", "unquantized_weights", "lora_params", "lora_grads",
                    "optimizer_state")
    shard = sum(getattr(mem, f) for f in shard_fields)
    whole = fsdp_per_gpu(plan.model, plan.lora, train, coeffs, 1, loading=FSDP_LOADING)
    sharded = sum(getattr(whole, f) for f in shard_fields if f != "quant_constants" or FSDP_LOADING != "sharded")
    gathered = mem.gathered_layers + mem.gathered_root
    replicated = mem.training_needs_bytes - shard - gathered
    return MultiGpuEstimate(count=count, per_gpu_needs_bytes=mem.needs_bytes, sharded_bytes=sharded,
                            shard_bytes=shard, replicated_bytes=replicated, gathered_layer_bytes=gathered,
                            capacity_bytes=plan.capacity_bytes, memory=mem, calibrated=multigpu_calibrated(coeffs))


def smallest_multi_gpu(plan: Plan, req: Request, coeffs: Coefficients) -> MultiGpuEstimate | None:
    """The fewest GPUs (2..8) of plan.gpu on which FSDP fits, without CPU offload first, then with it
    (planner.multigpu.fewest_gpus, the one count search `qfit plan` uses too), with the per-GPU memory of `plan` (the
    smallest single-GPU configuration of `req`) on that many; None if even 8 do not fit."""
    found = fewest_gpus(plan.model, plan.gpu, req, coeffs, strategy="fsdp", cpu_offload=None,
                        loading=FSDP_LOADING, start=min(MULTI_GPU_COUNTS), max_n=max(MULTI_GPU_COUNTS))
    return None if found is None else fsdp_per_gpu_bytes(plan, found[0], coeffs, cpu_offload=found[2])


# --------------------------------------------------------------------------- the comparison

@dataclass(frozen=True, slots=True)
class GpuOption:
    """One GPU's row. Bytes are int; hours and USD are floats (None when unknown)."""

    gpu: GpuSpec
    plan: Plan | MultiPlan | None  # the best fitting plan (planner.search's pick, per rank when count > 1); None: does not fit
    smallest: Plan | MultiPlan  # the candidate that needs least memory (what 'does not fit' compares)
    price_usd_per_hour: float | None
    price_given: bool  # True when --price overrode the profile's price
    speed_basis: str  # SPEED_CALIBRATED, SPEED_DATASHEET or SPEED_NONE
    speed_error_pct: float | None  # cross-validated tokens/s error of the calibration; None: unknown
    hours: float | None
    cost_usd: float | None
    pareto: bool = False
    multi_gpu: MultiGpuEstimate | None = None  # only for a GPU the model does not fit on
    multi_gpu_max: MultiGpuEstimate | None = None  # the same on max(MULTI_GPU_COUNTS) GPUs, for those rows
    notes: tuple[str, ...] = ()  # what the search changed (bf16 -> fp16, ...)
    count: int = 1  # GPUs of this kind (--num-gpus); hours are wall hours, cost = hours x count x price
    strategy: str | None = None  # "ddp" or "fsdp" when count > 1 (planner.multigpu.choose_multi's choice)

    @property
    def fits(self) -> bool:
        return self.plan is not None

    @property
    def tokens_per_s(self) -> float:
        """Tokens/s of the whole run: one GPU's estimate, or count x one rank's (communication not modelled)."""
        if not self.plan:
            return 0.0
        if self.count > 1:
            return self.count * self.plan.tokens_per_s_per_gpu
        return self.plan.tokens_per_s

    @property
    def peak_reserved_bytes(self) -> int | None:
        """The plan's predicted peak reserved (per GPU); None when it does not fit, and under FSDP (its model
        predicts what each GPU needs, not the allocator's reserve)."""
        if not self.plan:
            return None
        mem = self.plan.memory
        if self.count == 1:
            return mem.peak_reserved_bytes
        return mem.single.peak_reserved_bytes + mem.grad_buckets if self.strategy == "ddp" else None

    @property
    def hours_range(self) -> tuple[float, float] | None:
        """hours at tokens/s x (1 +/- error): None when either is unknown."""
        if self.hours is None or self.speed_error_pct is None or self.speed_error_pct >= 100:
            return None
        e = self.speed_error_pct / 100.0
        return self.hours / (1.0 + e), self.hours / (1.0 - e)

    @property
    def largest_term(self) -> tuple[str, int]:
        """(memory field, bytes) of the largest term in the smallest configuration (per GPU when count > 1)."""
        mem = self.smallest.memory
        components = mem.single.components() if self.strategy == "ddp" else mem.components()
        return max(components.items(), key=lambda kv: kv[1])


@dataclass(frozen=True, slots=True)
class Comparison:
    model: ModelSpec
    workload: Workload
    request: Request
    options: tuple[GpuOption, ...]  # within the limits (fitting, sorted), then those that do not fit
    excluded: tuple[GpuOption, ...]  # fit, but over --max-hours or --max-cost
    sort: str
    max_hours: float | None
    max_cost: float | None
    speed_calibrated_on: tuple[str, ...]
    speed_error_pct: float | None
    num_gpus: int = 1

    @property
    def fitting(self) -> tuple[GpuOption, ...]:
        return tuple(o for o in self.options if o.fits)

    @property
    def not_fitting(self) -> tuple[GpuOption, ...]:
        return tuple(o for o in self.options if not o.fits)

    @property
    def pareto(self) -> tuple[GpuOption, ...]:
        return tuple(o for o in self.options if o.pareto)


def speed_basis(gpu: GpuSpec, calibrated_on: Sequence[str]) -> str:
    if (gpu.bf16_tflops <= 0 and gpu.fp16_tflops <= 0) or gpu.bandwidth_gb_s <= 0:
        return SPEED_NONE
    return SPEED_CALIBRATED if gpu.name in calibrated_on else SPEED_DATASHEET


def method_speed_basis(best: Plan | None, basis: str) -> str:
    """Only QLoRA steps were timed: a lora / lora-8bit plan's tokens/s is an estimate on every GPU."""
    if best is not None and best.train.method != "qlora" and basis == SPEED_CALIBRATED:
        return SPEED_DATASHEET
    return basis


def speed_calibrated_on(coeffs: Coefficients) -> tuple[str, ...]:
    """The GPU profiles the coefficients' speed model was fitted on (none: it is all datasheet scaling)."""
    return tuple(n for n in str(coeffs.values.get(SPEED_CALIBRATED_ON_KEY, "")).split(",") if n)


def speed_error_pct(coeffs: Coefficients) -> float | None:
    value = coeffs.values.get(SPEED_ERROR_KEY)
    return float(value) if value is not None else None


def _sort_key(sort: str):
    def key(o: GpuOption):
        # rows without a figure (no speed facts or no price) go after those with one
        h = o.hours if o.hours is not None else math.inf
        c = o.cost_usd if o.cost_usd is not None else math.inf
        return (c, h, o.gpu.name) if sort == "cost" else (h, c, o.gpu.name)
    return key


def _multi_row(model: ModelSpec, gpu: GpuSpec, workload: Workload, request: Request, coeffs: Coefficients, n: int,
               prices: Mapping[str, float], calibrated_on: Sequence[str], err: float | None) -> GpuOption:
    """One GPU kind's row on n of them: `qfit plan --num-gpus n`'s choice (planner.multigpu.choose_multi)."""
    choice = choose_multi(model, gpu, request, coeffs, n)
    best = choice.best
    small = min(choice.plans, key=lambda p: p.memory.needs_bytes)
    if best is None and choice.strategy == "fsdp" and not choice.cpu_offload and request.optim in (None, FSDP_OPTIM):
        # nothing fits: say what the least memory would need, CPU offload included
        offloaded = choose_multi(model, gpu, request, coeffs, n, "fsdp", cpu_offload=True)
        small = min((small, *offloaded.plans), key=lambda p: p.memory.needs_bytes)
    price = prices.get(gpu.name, gpu.price_usd_per_hour)
    row = GpuOption(gpu=gpu, plan=best, smallest=small, price_usd_per_hour=price, price_given=gpu.name in prices,
                    speed_basis=speed_basis(gpu, calibrated_on), speed_error_pct=err, hours=None, cost_usd=None,
                    notes=tuple(dict.fromkeys((best or small).notes)), count=n, strategy=choice.strategy)
    if best is None:
        return row
    hours = wall_hours(workload.total_tokens, row.tokens_per_s)
    return replace(row, hours=hours, cost_usd=cost_usd(hours, None if price is None else price * n))


def compare(model: ModelSpec, workload: Workload, gpus: Sequence[GpuSpec], coeffs: Coefficients,
            request: Request | None = None, prices: Mapping[str, float] | None = None,
            max_hours: float | None = None, max_cost: float | None = None, sort: str = "cost",
            calibrated_on: Sequence[str] | None = None, num_gpus: int = 1) -> Comparison:
    """Every GPU's best plan, time and cost for one workload; see the module docstring.

    prices: GPU name -> USD per GPU-hour, overriding the profile's price.
    num_gpus: hold the GPU count fixed (`--num-gpus N`): every GPU kind is planned as `qfit plan --num-gpus N`
    plans it (planner.multigpu.choose_multi: DDP when it fits, else FSDP, CPU offload last), tokens/s is N x one
    rank's estimate (communication is not modelled, so this is an upper bound), cost = hours x N x price.
    """
    if num_gpus < 1:
        raise QfitError(f"--num-gpus must be a positive integer, got {num_gpus}")
    if sort not in SORT_KEYS:
        raise QfitError(f"--sort must be cost or time, got {sort!r}")
    for flag, limit in (("--max-hours", max_hours), ("--max-cost", max_cost)):
        if limit is not None and not limit > 0:
            raise QfitError(f"{flag} must be a positive number, got {limit}")
    prices = dict(prices or {})
    names = {g.name for g in gpus}
    for name, price in prices.items():
        if name not in names:
            raise QfitError(f"--price names {name}, which is not among the compared GPUs (add it to --gpu)")
        if not price >= 0 or math.isinf(price):
            raise QfitError(f"--price for {name} must be a non-negative number of USD per hour, got {price}")
    request = request or Request()
    err = speed_error_pct(coeffs)
    if calibrated_on is None:
        calibrated_on = speed_calibrated_on(coeffs)
    if num_gpus > 1 and request.method != "qlora":
        raise QfitError(f"--method {request.method} with --num-gpus {num_gpus}: multi-GPU plans are QLoRA only "
                        "(a 4-bit base under DDP or FSDP); drop --method or --num-gpus")
    results = search_all(model, gpus, request, coeffs) if num_gpus == 1 else {}
    q_request = replace(request, method="qlora")

    rows = []
    for gpu in gpus:
        if num_gpus > 1:
            rows.append(_multi_row(model, gpu, workload, request, coeffs, num_gpus, prices, calibrated_on, err))
            continue
        res = results[gpu.name]
        price = prices.get(gpu.name, gpu.price_usd_per_hour)
        best = res.best
        hours = wall_hours(workload.total_tokens, best.tokens_per_s) if best else None
        small = smallest(res.plans)
        # several GPUs: multi-GPU plans are QLoRA only (planner.multigpu), whatever --method searched
        q_plans = tuple(p for p in res.plans if p.train.method == "qlora")
        small_q = smallest(q_plans) if q_plans else make_plan(model, gpu, small.lora, replace(small.train, method="qlora"),
                                                               coeffs)
        rows.append(GpuOption(
            gpu=gpu, plan=best, smallest=small, price_usd_per_hour=price, price_given=gpu.name in prices,
            speed_basis=method_speed_basis(best, speed_basis(gpu, calibrated_on)), speed_error_pct=err, hours=hours,
            cost_usd=cost_usd(hours, price) if best else None,
            multi_gpu=None if best else smallest_multi_gpu(small_q, q_request, coeffs),
            multi_gpu_max=None if best else fsdp_per_gpu_bytes(small_q, max(MULTI_GPU_COUNTS), coeffs, cpu_offload=True),
            notes=res.notes,
        ))

    def within(o: GpuOption) -> bool:
        if max_hours is not None and (o.hours is None or o.hours > max_hours):
            return False
        if max_cost is not None and (o.cost_usd is None or o.cost_usd > max_cost):
            return False
        return True

    fitting = [o for o in rows if o.fits]
    kept = [o for o in fitting if within(o)]
    excluded = [o for o in fitting if not within(o)]
    ranked = [o for o in kept if o.hours is not None and o.cost_usd is not None]
    flags = pareto_flags([(o.hours, o.cost_usd) for o in ranked])
    on_front = {o.gpu.name for o, f in zip(ranked, flags) if f}
    kept = sorted((replace(o, pareto=o.gpu.name in on_front) for o in kept), key=_sort_key(sort))
    return Comparison(
        model=model, workload=workload, request=request,
        options=tuple(kept) + tuple(o for o in rows if not o.fits),
        excluded=tuple(sorted(excluded, key=_sort_key(sort))), sort=sort, max_hours=max_hours,
        max_cost=max_cost, speed_calibrated_on=tuple(calibrated_on), speed_error_pct=err, num_gpus=num_gpus,
    )
