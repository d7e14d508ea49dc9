"""The recommender: candidate settings -> estimate -> fits(gpu) -> ranked plans. Pure; no I/O.

Values the user fixes are kept; the rest are searched. LoRA quality is never traded for speed
silently: candidates come in quality tiers (the asked or default rank and targets first) and the
first tier with a fitting plan wins; inside it plans are ranked by estimated tokens/s.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from planner.errors import QfitError
from planner.memory import estimate
from planner.specs import MEMORY_CLASS_FRAC, METHODS, Coefficients, GpuSpec, LoraSettings, ModelSpec, Plan, TrainSettings
from planner.speed import METHOD_SPEED_NOTES, tokens_per_second

DEFAULT_EFFECTIVE_BATCH = 16
DEFAULT_SEQ_LEN = 512
MAX_MICRO_BATCH = 256
AUTO_SEQ_LENS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
# Optimizer preference when not fixed: the classic QLoRA recipe first; 8-bit state when memory is tight.
OPTIM_ORDER = ("paged_adamw_32bit", "adamw_torch", "paged_adamw_8bit", "adamw_8bit")
# LoRA fallbacks when the asked/default adapter does not fit anywhere in the grid.
LORA_FALLBACKS = ((16, ("all-linear",)), (8, ("all-linear",)), (8, ("attn",)))


@dataclass(frozen=True, slots=True)
class Request:
    """What the user asked for: None means 'choose for me'."""

    batch_size: int | None = None
    grad_accum: int | None = None
    effective_batch: int | None = None
    seq_len: int | None = None  # None: DEFAULT_SEQ_LEN; 0: auto (longest that fits)
    rank: int | None = None
    alpha: int | None = None
    lora_dropout: float = 0.05
    targets: tuple[str, ...] | None = None
    gradient_checkpointing: bool | None = None
    uncheckpointed_layers: int | None = None  # None: searched (the most that fit); 0: checkpoint every layer
    optim: str | None = None
    compute_dtype: str | None = None
    double_quant: bool = True
    expandable_segments: bool = True
    packing: bool = True  # qfit run packs rows into micro-batches (planner/packing.py) unless told not to
    optimize: str = "quality"  # quality: the best LoRA tier that fits, fastest within it; speed: fastest of all tiers
    # how the frozen base is held (planner.specs.METHODS), or "auto": every method, ranked like any other setting
    # (fitting, quality tier, ..., est. tokens/s); qlora unless asked, so the default answers do not change
    method: str = "qlora"

    def methods(self) -> tuple[str, ...]:
        """The methods the search considers."""
        return METHODS if self.method == "auto" else (self.method,)


OPTIMIZE = ("quality", "speed")
METHOD_CHOICES = METHODS + ("auto",)


MAX_GPUS = 8  # the largest count the no-fit advice tries: one host


@dataclass(frozen=True, slots=True)
class NoFitAdvice:
    """What would fit when nothing does on the asked GPU(s). Bytes are int."""

    larger_gpu: GpuSpec | None  # the smallest larger catalog GPU on which one card fits; None: none does
    seq_len: int | None  # the longest shorter --seq-len that fits on this card (one GPU, seq fixed); None: none
    fewest_gpus: tuple[int, str, bool] | None  # (n, strategy, cpu_offload) of planner.multigpu.fewest_gpus
    max_gpus: int = MAX_GPUS
    # when no count fits because FSDP's load phase alone exceeds the card even on max_gpus GPUs:
    load_needs_bytes: int | None = None
    usable_bytes: int | None = None
    # set when the request's method is not qlora: the multi-GPU advice is for QLoRA (multi-GPU plans are QLoRA only)
    multi_gpu_note: str = ""


@dataclass(frozen=True, slots=True)
class SearchResult:
    plans: tuple[Plan, ...]  # every candidate, fitting first, best first
    best: Plan | None
    notes: tuple[str, ...]  # settings qfit changed and why (bf16 -> fp16, ...)
    # filled by planner.reasons.explain (they cost more estimates and searches): why `best`, one sentence
    # each; and, when nothing fits, what would (planner.reasons.NoFitAdvice)
    reasons: tuple[str, ...] = ()
    advice: NoFitAdvice | None = None

    @property
    def fitting(self) -> tuple[Plan, ...]:
        return tuple(p for p in self.plans if p.fits)


def compute_dtype_for(gpu: GpuSpec, asked: str | None) -> tuple[str, str | None]:
    if asked == "bf16" and not gpu.bf16:
        return "fp16", f"{gpu.display_name} has no bf16: computing in fp16"
    return asked or ("bf16" if gpu.bf16 else "fp16"), None


def _batch_grid(req: Request) -> list[tuple[int, int]]:
    if req.batch_size and req.grad_accum:
        return [(req.batch_size, req.grad_accum)]
    eff = req.effective_batch or (req.batch_size * req.grad_accum if req.batch_size and req.grad_accum else None)
    if req.batch_size:
        eff = eff or max(req.batch_size, DEFAULT_EFFECTIVE_BATCH)
        return [(req.batch_size, max(1, eff // req.batch_size))]
    eff = eff or DEFAULT_EFFECTIVE_BATCH
    if req.grad_accum:
        return [(max(1, eff // req.grad_accum), req.grad_accum)]
    # every micro-batch that divides the effective batch exactly (the effective batch never changes)
    return [(mb, eff // mb) for mb in range(1, min(eff, MAX_MICRO_BATCH) + 1) if eff % mb == 0]


def candidates(model: ModelSpec, gpu: GpuSpec, req: Request) -> tuple[list[tuple[int, LoraSettings, TrainSettings]], list[str]]:
    """(tier, lora, train) for every combination the request leaves open."""
    dtype, note = compute_dtype_for(gpu, req.compute_dtype)
    notes = [note] if note else []
    if gpu.speed_proxy:
        notes.append(f"speed estimated as for {gpu.speed_proxy} (same memory class)")
    elif gpu.bandwidth_gb_s <= 0 and gpu.name != "cpu":
        notes.append(f"no speed estimate: no catalog GPU has {gpu.name}'s memory (within "
                     f"{MEMORY_CLASS_FRAC:.0%}); ranked by settings that are faster on any GPU")
    for method in req.methods():
        if method != "qlora":
            notes.append(METHOD_SPEED_NOTES[method])
    if req.seq_len == 0:
        seqs = [s for s in AUTO_SEQ_LENS if s <= model.max_position_embeddings]
    else:
        seqs = [req.seq_len or DEFAULT_SEQ_LEN]
    if req.rank or req.targets:
        loras = [(req.rank or 16, req.targets or ("all-linear",))]
    else:
        loras = list(LORA_FALLBACKS)
    ckpts = [req.gradient_checkpointing] if req.gradient_checkpointing is not None else [False, True]
    optims = [req.optim] if req.optim else list(OPTIM_ORDER)
    out = []
    for tier, (rank, targets) in enumerate(loras):
        lora = LoraSettings(rank=rank, alpha=req.alpha or 2 * rank, dropout=req.lora_dropout, targets=targets)
        for seq in sorted(seqs, reverse=True):
            for mb, accum in _batch_grid(req):
                for ckpt in ckpts:
                    for optim, method in itertools.product(optims, req.methods()):
                        train = TrainSettings(batch_size=mb, grad_accum=accum, seq_len=seq,
                                              gradient_checkpointing=ckpt, optim=optim, compute_dtype=dtype,
                                              double_quant=req.double_quant,
                                              expandable_segments=req.expandable_segments,
                                              uncheckpointed_layers=req.uncheckpointed_layers or 0,
                                              packing=req.packing, method=method)
                        out.append((tier if req.optimize == "quality" else 0, lora, train))
    return out, notes


def capacity_bytes(gpu: GpuSpec, coeffs: Coefficients) -> int:
    """What a plan may use on one card: its memory less the calibrated safety margin."""
    return int(gpu.memory_bytes * (1.0 - coeffs.get("safety_margin_frac")))


def _estimate(model: ModelSpec, lora: LoraSettings, train: TrainSettings, coeffs: Coefficients, memo: dict | None):
    """memory.estimate, shared through `memo` when given (memory does not depend on the GPU)."""
    if memo is None:
        return estimate(model, lora, train, coeffs)
    memory = memo.get((model, lora, train))
    if memory is None:
        memory = memo[(model, lora, train)] = estimate(model, lora, train, coeffs)
    return memory


def make_plan(model: ModelSpec, gpu: GpuSpec, lora: LoraSettings, train: TrainSettings, coeffs: Coefficients,
              memo: dict | None = None) -> Plan:
    """One candidate on one card. `memo` shares estimates between cards: memory does not depend on the GPU."""
    memory = _estimate(model, lora, train, coeffs, memo)
    capacity = capacity_bytes(gpu, coeffs)
    return Plan(model=model, gpu=gpu, lora=lora, train=train, memory=memory, capacity_bytes=capacity,
                tokens_per_s=tokens_per_second(model, lora, train, gpu, coeffs))


def speed_key(tokens_per_s: float, train: TrainSettings, layers: int) -> tuple:
    """Faster first. Without a speed estimate (a GPU with no speed facts: every plan would tie at 0) the
    settings that are faster on every GPU: fewer recomputed (checkpointed) layers, then a larger micro-batch."""
    if tokens_per_s > 0:
        return (-round(tokens_per_s, 1), 0, 0)
    return (0.0, train.checkpointed_layers(layers), -train.batch_size)


def rank_key(tier: int, plan: Plan) -> tuple:
    """Fitting first; then the LoRA quality tier; longer sequences (auto mode); 32-bit optimizer state
    before 8-bit (8-bit only when nothing with 32-bit state fits); faster (speed_key); the preferred optimizer."""
    optim_pref = OPTIM_ORDER.index(plan.train.optim) if plan.train.optim in OPTIM_ORDER else 0
    eight_bit = "8bit" in plan.train.optim
    return (not plan.fits, tier, -plan.train.seq_len, eight_bit,
            speed_key(plan.tokens_per_s, plan.train, plan.model.num_hidden_layers), optim_pref,
            plan.memory.needs_bytes)


def most_uncheckpointed(plan: Plan, coeffs: Coefficients, memo: dict | None = None) -> Plan | None:
    """Partial checkpointing: the fitting plan that leaves the most of the last decoder layers
    uncheckpointed (each one skips its recompute and keeps its activations instead). Memory grows
    with every layer left out, so a bisection over 1 .. layers-1 finds it. None: not even one fits."""
    t, layers = plan.train, plan.model.num_hidden_layers
    if not (plan.fits and t.gradient_checkpointing and t.uncheckpointed_layers == 0 and layers > 1):
        return None

    def fits(n):  # memory only (the speed estimate is made once, for the answer)
        memory = _estimate(plan.model, plan.lora, replace(t, uncheckpointed_layers=n), coeffs, memo)
        return memory.needs_bytes <= plan.capacity_bytes

    lo, hi, best = 1, layers - 1, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if not best:
        return None
    return make_plan(plan.model, plan.gpu, plan.lora, replace(t, uncheckpointed_layers=best), coeffs, memo)


def search(model: ModelSpec, gpu: GpuSpec, req: Request, coeffs: Coefficients, memo: dict | None = None) -> SearchResult:
    if req.optimize not in OPTIMIZE:
        raise QfitError(f"--optimize must be quality or speed, got {req.optimize!r}")
    if req.method not in METHOD_CHOICES:
        raise QfitError(f"--method must be one of {', '.join(METHOD_CHOICES)}, got {req.method!r}")
    if req.rank and req.rank > model.hidden_size:
        raise QfitError(f"--rank {req.rank} is above {model.display_name}'s hidden size ({model.hidden_size}): "
                        "a LoRA rank cannot exceed the width it adapts; try 8 to 64")
    cands, notes = candidates(model, gpu, req)
    scored = []
    for tier, lora, train in cands:
        plan = make_plan(model, gpu, lora, train, coeffs, memo)
        scored.append((rank_key(tier, plan), tier, plan))
    if req.uncheckpointed_layers is None:
        scored += _partial_plans(scored, coeffs, memo)
    scored.sort(key=lambda kv: kv[0])
    plans = tuple(p for _, _, p in scored)
    best = plans[0] if plans and plans[0].fits else None
    return SearchResult(plans=plans, best=best, notes=tuple(notes))


def _partial_plans(scored: list[tuple], coeffs: Coefficients, memo: dict | None) -> list[tuple]:
    """Partial-checkpointing variants (most_uncheckpointed) of the fitting checkpointed candidates that
    could still rank first: each candidate's bound is its rank with every layer but one uncheckpointed
    (its fastest possible variant), so candidates are bisected best bound first and the rest skipped
    once no bound can beat the best plan found. Keeps the search within its time budget."""
    fitting = [key for key, _, p in scored if p.fits]
    if not fitting:
        return []
    best = min(fitting)
    pool = []
    for key, tier, p in scored:
        t, layers = p.train, p.model.num_hidden_layers
        if not (p.fits and t.gradient_checkpointing and t.uncheckpointed_layers == 0 and layers > 1):
            continue
        fastest_train = replace(t, uncheckpointed_layers=layers - 1)
        fastest = tokens_per_second(p.model, p.lora, fastest_train, p.gpu, coeffs)
        bound = ((False, tier, -t.seq_len, "8bit" in t.optim, speed_key(fastest, fastest_train, layers))
                 + key[5:-1] + (0,))
        pool.append((bound, tier, p))
    pool.sort(key=lambda kv: kv[0])
    out = []
    for bound, tier, p in pool:
        if bound >= best:
            break
        partial = most_uncheckpointed(p, coeffs, memo)
        if partial is not None:
            key = rank_key(tier, partial)
            out.append((key, tier, partial))
            best = min(best, key)
    return out


def smallest(plans: tuple[Plan, ...]) -> Plan:
    return min(plans, key=lambda p: p.memory.needs_bytes)


def next_larger_batch(plan: Plan, coeffs: Coefficients) -> Plan | None:
    """The same plan with the micro-batch doubled (accumulation halved) and, under checkpointing, every
    layer checkpointed: what 'one step more' needs at the least."""
    t = plan.train
    if t.grad_accum < 2:
        return None
    bigger = replace(t, batch_size=t.batch_size * 2, grad_accum=t.grad_accum // 2, uncheckpointed_layers=0)
    return make_plan(plan.model, plan.gpu, plan.lora, bigger, coeffs)

