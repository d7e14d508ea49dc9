"""Rendering of `qfit compare`: text table, terminal bar chart and the cost-time PNG (its --json document
is built in planner.documents).

Bytes become GiB text only through planner.report.gib_str. matplotlib is imported inside
cost_time_png (an optional dependency).
"""

from __future__ import annotations

from tabulate import tabulate

from planner.compare import (
    MULTI_GPU_COUNTS,
    SPEED_CALIBRATED,
    SPEED_ERROR_KEY,
    SPEED_NONE,
    Comparison,
    GpuOption,
)
from planner.fitmap import require_matplotlib
from planner.report import component_labels, gib_str
from planner.search import DEFAULT_SEQ_LEN
from planner.specs import Plan

DEFAULT_OPTIM = "paged_adamw_32bit"
BAR_WIDTH = 32  # characters of the longest bar in the terminal chart



# --------------------------------------------------------------------------- small formatters

def plan_str(plan: Plan) -> str:
    """'8 x 2, ckpt, r16 all-linear' (+ optimizer when not the QLoRA default, + fp16)."""
    t, lora = plan.train, plan.lora
    k, layers = t.checkpointed_layers(plan.model.num_hidden_layers), plan.model.num_hidden_layers
    ckpt = "no ckpt" if not k else "ckpt" if k == layers else f"ckpt {k}/{layers}"
    parts = [f"{t.batch_size} x {t.grad_accum}", ckpt,
             f"r{lora.rank} {','.join(lora.targets)}"]
    if t.optim != DEFAULT_OPTIM:
        parts.append(t.optim)
    if t.compute_dtype != "bf16":
        parts.append(t.compute_dtype)
    if t.method != "qlora":
        parts.append(t.method)
    return ", ".join(parts)


def config_str(plan: Plan) -> str:
    """The longer form used in 'does not fit' lines."""
    t, lora = plan.train, plan.lora
    return (f"micro-batch {t.batch_size} x accumulation {t.grad_accum}, seq {t.seq_len}, r{lora.rank} {','.join(lora.targets)}, "
            f"{_ckpt_words(plan)}, {t.optim}" + (f", {t.method}" if t.method != "qlora" else ""))


def _ckpt_words(plan: Plan) -> str:
    t, layers = plan.train, plan.model.num_hidden_layers
    k = t.checkpointed_layers(layers)
    return "no checkpointing" if not k else "checkpointing" if k == layers else f"checkpointing {k} of {layers} layers"


def _figure(x: float) -> str:
    """2 decimals from 1 up, 3 significant digits below (a small job's 0.00614 h is not 0.01)."""
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 1 or x == 0:
        return f"{x:,.2f}"
    return f"{x:.3g}"


def hours_str(hours: float | None) -> str:
    return "-" if hours is None else _figure(hours)


def usd_str(usd: float | None) -> str:
    return "-" if usd is None else _figure(usd)


def tps_str(o: GpuOption) -> str:
    if not o.fits or o.speed_basis == SPEED_NONE:
        return "-"
    tag = "calibrated" if o.speed_basis == SPEED_CALIBRATED else "est."
    return f"{o.tokens_per_s:,.0f} ({tag})"


def price_str(o: GpuOption) -> str:
    if o.price_usd_per_hour is None:
        return "-"
    return f"{o.price_usd_per_hour:.2f}" + (" (given)" if o.price_given else "")


def _basis(m) -> str:
    """'' when the multi-GPU model is calibrated (2 x H200), else 'estimate: '."""
    return "" if m.calibrated else "estimate: "


def _load_why(m) -> str:
    """When FSDP's load phase sets the peak, say so."""
    return ", load phase" if m.peak_phase == "load" else ""


def _how(m) -> str:
    return "FSDP + CPU offload" if m.cpu_offload else "FSDP"


def _ram(m) -> str:
    return f", CPU RAM {gib_str(m.cpu_ram_bytes)} GiB per node"


def multi_gpu_str(o: GpuOption) -> str:
    m = o.multi_gpu
    if m is None:
        n_max, top = max(MULTI_GPU_COUNTS), o.multi_gpu_max
        return (f"Not even {n_max} x {o.gpu.name} with FSDP sharding and CPU offload would fit "
                f"({_basis(top)}{gib_str(top.per_gpu_needs_bytes)} GiB per GPU{_load_why(top)})")
    return (f"{m.count} x {o.gpu.name} with {_how(m)} sharding would fit ({_basis(m)}{gib_str(m.per_gpu_needs_bytes)} GiB "
            f"per GPU of {gib_str(m.capacity_bytes)} usable{_ram(m)}; qfit plan --num-gpus {m.count} for the plan)")


def _strategy_label(o: GpuOption) -> str:
    """'ddp', 'fsdp' or 'fsdp+offload' (parameters, gradients and optimizer state in CPU memory)."""
    return o.strategy + ("+offload" if getattr(o.plan.memory, "cpu_offload", False) else "")


def _multi_peak_words(s) -> str:
    """'the load phase sets the peak (...); ' when FSDP's load phase, not training, is the larger need."""
    if getattr(s.memory, "peak_phase", "") != "load":
        return ""
    return (f"the load phase sets the peak ({gib_str(s.memory.load_needs_bytes)} GiB: every GPU loads the whole 4-bit "
            "model before sharding); ")


def _multi_reason(o: GpuOption) -> str:
    """Why n GPUs of a kind (--num-gpus n) do not fit, in one line."""
    s = o.smallest
    term, term_bytes = o.largest_term
    how = o.strategy.upper() + (" + CPU offload" if getattr(s.memory, "cpu_offload", False) else "")
    return (f"on {o.count} x {o.gpu.name} ({how}), the smallest configuration ({config_str(s)}) needs "
            f"{gib_str(s.memory.needs_bytes)} GiB per GPU; the card has {gib_str(o.gpu.memory_bytes)} GiB "
            f"({gib_str(s.capacity_bytes)} usable); {_multi_peak_words(s)}largest term: {term.replace('_', ' ')} "
            f"{gib_str(term_bytes)} GiB. qfit plan MODEL --gpu {o.gpu.name} --num-gpus {o.count} shows the plan and what would fit.")


def reason_str(o: GpuOption) -> str:
    """Why a GPU does not fit, in one line."""
    if o.count > 1:
        return _multi_reason(o)
    s = o.smallest
    term, term_bytes = o.largest_term
    return (f"smallest configuration ({config_str(s)}) needs {gib_str(s.memory.needs_bytes)} GiB; the card has "
            f"{gib_str(o.gpu.memory_bytes)} GiB ({gib_str(s.capacity_bytes)} usable); largest term: "
            f"{component_labels(s)[term]} {gib_str(term_bytes)} GiB. {multi_gpu_str(o)}.")


def short_reason_str(o: GpuOption) -> str:
    """reason_str without the configuration (printed once above the lines when shared)."""
    s = o.smallest
    term, term_bytes = o.largest_term
    m = o.multi_gpu
    if m is None:
        top = o.multi_gpu_max
        multi = (f"not even {max(MULTI_GPU_COUNTS)} x {o.gpu.name} with FSDP + CPU offload ({_basis(top)}"
                 f"{gib_str(top.per_gpu_needs_bytes)} GiB per GPU{_load_why(top)})")
    else:
        multi = (f"{m.count} x {o.gpu.name} with {_how(m)} would fit ({_basis(m)}{gib_str(m.per_gpu_needs_bytes)} GiB "
                 f"per GPU{_ram(m)})")
    return (f"needs {gib_str(s.memory.needs_bytes)} GiB, the card {gib_str(o.gpu.memory_bytes)} GiB "
            f"({gib_str(s.capacity_bytes)} usable); largest term: {component_labels(s)[term]} "
            f"{gib_str(term_bytes)} GiB; {multi}.")


def not_fitting_lines(c: Comparison) -> list[str]:
    """One line per GPU that does not fit, saying why; the smallest configuration once when shared."""
    rows = c.not_fitting
    if c.num_gpus > 1:
        width = max(len(o.gpu.name) for o in rows)
        return ["Does not fit:"] + [f"  {o.gpu.name:<{width}}  {_multi_reason(o)}" for o in rows]
    configs = {config_str(o.smallest) for o in rows}
    width = max(len(o.gpu.name) for o in rows)
    if len(configs) == 1:
        lines = [f"Does not fit, even in the smallest configuration ({configs.pop()}):"]
        lines += [f"  {o.gpu.name:<{width}}  {short_reason_str(o)}" for o in rows]
    else:
        lines = ["Does not fit:"] + [f"  {o.gpu.name:<{width}}  {reason_str(o)}" for o in rows]
    calibrated = all((o.multi_gpu or o.multi_gpu_max).calibrated for o in rows)
    lines.append(f"  (FSDP{' (calibrated on 2 x H200)' if calibrated else ' estimate'}: 4-bit base, constants, "
                 "bf16/fp16 unquantized weights, LoRA and AdamW state sharded over the GPUs, two gathered layers and "
                 "the root unit, activations per GPU; the model loaded shard by shard (estimate, not measured on GPUs), "
                 "CPU offload only when no count fits without it. qfit plan MODEL --gpu GPU --num-gpus N gives the full plan.)")
    return lines


def workload_str(c: Comparison) -> str:
    w = c.workload
    approx = "~" if w.approximate else ""
    epochs = f"{w.epochs:g} epoch{'s' if w.epochs != 1 else ''}"
    if w.examples:
        what = f"{w.examples:,} examples x {approx}{w.avg_tokens:,.0f} tokens x {epochs}"
    else:
        what = f"{w.tokens_per_epoch:,} tokens x {epochs}"
    return f"{what} = {approx}{w.total_tokens:,} tokens"


def speed_note(c: Comparison) -> str:
    on = ", ".join(c.speed_calibrated_on)
    if c.speed_error_pct is None:
        band = f"error band unknown (the coefficients carry no {SPEED_ERROR_KEY})"
    else:
        band = (f"typical error +/-{c.speed_error_pct:g}% (median, leave-one-configuration-out on {on or 'no GPU'}); "
                "the datasheet ratio adds an error not measured here")
    return (f"tokens/s: calibrated on {on} runs, other GPUs estimated from the datasheet ratio "
            f"(TFLOP/s, bandwidth); {band}.")


def method_notes(c: Comparison) -> list[str]:
    """--method other than qlora: the plans' methods and that only QLoRA was measured on a GPU."""
    methods = c.request.methods()
    if methods == ("qlora",):
        return []
    chosen = {o.plan.train.method for o in c.options if o.plan}
    return [f"methods considered: {', '.join(methods)} (each GPU priced with its best-ranked method that fits; "
            f"chosen: {', '.join(sorted(chosen)) or 'none'}); lora and lora-8bit were measured on an H100 only "
            "(calibration/REPORT.md, Methods): on other GPUs their tokens/s is scaled by the datasheet, and lora-8bit's "
            "memory is under-predicted by up to 20%."]


def capacity_notes(c: Comparison) -> list[str]:
    """One line per GPU given as a bare capacity: the catalog card whose speed it borrows, or none."""
    out = []
    for o in c.options + c.excluded:
        g = o.gpu
        if g.speed_proxy:
            out.append(f"{g.name}: speed estimated as for {g.speed_proxy} (same memory class); no price (--price {g.name}=USD)")
        elif g.source == "given on the command line":
            out.append(f"{g.name}: no speed estimate (no catalog GPU of its memory class); no price")
    return out


def price_note(c: Comparison) -> str:
    dates = sorted({o.gpu.price_date for o in c.options + c.excluded if o.gpu.price_date and not o.price_given})
    given = [o.gpu.name for o in c.options + c.excluded if o.price_given]
    text = "USD = hours x price per GPU-hour" if c.num_gpus == 1 else f"USD = hours x {c.num_gpus} x price per GPU-hour"
    if dates:
        text += f"; profile prices are indicative on-demand prices as of {', '.join(dates)}"
    if given:
        text += f"; given with --price: {', '.join(given)}"
    return text + "; override with --price GPU=USD."


# --------------------------------------------------------------------------- text

def table_rows(c: Comparison) -> list[list[str]]:
    rows = []
    for o in c.options:
        p = o.plan or o.smallest
        peak = o.peak_reserved_bytes
        rows.append([
            "*" if o.pareto else "", o.gpu.name,
            "yes" if o.fits else "no",
            (f"{_strategy_label(o)}: " if o.count > 1 and o.plan else "") + (plan_str(o.plan) if o.plan else "-"),
            gib_str(peak) if peak is not None else "-",
            f"{gib_str(p.memory.needs_bytes)} / {gib_str(o.gpu.memory_bytes)}",
            tps_str(o), hours_str(o.hours), price_str(o), usd_str(o.cost_usd),
        ])
    return rows


HEADERS = ["", "GPU", "fits", "plan (micro x accum, ckpt, LoRA)", "peak GiB", "needs / card GiB",
           "tokens/s", "hours", "USD/h", "USD"]


def headers(c: Comparison) -> list[str]:
    """HEADERS; with --num-gpus N the memory columns are per GPU and the plan is per rank."""
    if c.num_gpus == 1:
        return HEADERS
    return ["", "GPU", "fits", "plan per rank (strategy: micro x accum, ckpt, LoRA)", "peak/GPU GiB",
            "needs/GPU / card GiB", f"tokens/s ({c.num_gpus} GPUs)", "hours", "USD/h per GPU", "USD"]


def bar_chart(c: Comparison, metric: str | None = None, width: int = BAR_WIDTH) -> str:
    """A compact terminal view: one bar per fitting GPU, of hours (sort time) or USD (sort cost)."""
    metric = metric or ("hours" if c.sort == "time" else "cost")
    rows = [o for o in c.options if o.fits and o.hours is not None]
    if metric == "cost":
        rows = [o for o in rows if o.cost_usd is not None]
    if not rows:
        return ""
    value = (lambda o: o.cost_usd) if metric == "cost" else (lambda o: o.hours)
    top = max(value(o) for o in rows) or 1.0
    name_w = max(len(o.gpu.name) for o in rows)
    lines = [f"{'USD' if metric == 'cost' else 'hours'} per GPU (* Pareto):"]
    for o in rows:
        v = value(o)
        n = max(1, round(width * v / top)) if v > 0 else 0
        fig = usd_str(v) if metric == "cost" else hours_str(v)
        lines.append(f"  {'*' if o.pareto else ' '} {o.gpu.name:<{name_w}}  {'#' * n:<{width}}  {fig}")
    return "\n".join(lines)


def render_text(c: Comparison) -> str:
    m = c.model
    seq = c.request.seq_len or DEFAULT_SEQ_LEN
    out = [f"qfit compare: {m.display_name} ({m.total_param_count / 1e9:.2f} B params), "
           f"{workload_str(c)}, seq {seq}" + (f", {c.num_gpus} GPUs of each kind" if c.num_gpus > 1 else "")]
    if c.workload.approximate:
        out.append("tokens: approximate, 1 token per 4 characters of the dataset's text fields (no tokenizer).")
    limits = []
    if c.max_hours is not None:
        limits.append(f"--max-hours {c.max_hours:g}")
    if c.max_cost is not None:
        limits.append(f"--max-cost {c.max_cost:g}")
    out.append(f"sorted by {'cost' if c.sort == 'cost' else 'time'}" + (f"; limits: {', '.join(limits)}" if limits else ""))
    out.append("")
    out.append(tabulate(table_rows(c), headers=headers(c), disable_numparse=True))
    out.append("")
    if c.pareto:
        out.append("* Pareto: no other GPU here is both faster and cheaper.")
    out.append(speed_note(c))
    if c.num_gpus > 1:
        out.append(f"{c.num_gpus} GPUs: each kind planned as `qfit plan --num-gpus {c.num_gpus}` plans it (DDP when it fits, "
                   f"else FSDP); tokens/s = {c.num_gpus} x one rank's estimate, communication not modelled (an upper "
                   f"bound, lower for FSDP's per-layer all-gathers); USD = hours x {c.num_gpus} x price per GPU-hour; "
                   "peak/GPU is shown for DDP only (FSDP's model predicts what each GPU needs); +offload: FSDP with CPU offload, whose "
                   "transfers are not in the speed estimate and whose CPU RAM `qfit plan --num-gpus` shows.")
    out += method_notes(c)
    out += capacity_notes(c)
    out.append(f"hours = tokens / tokens/s / 3600 with packed sequences (no padding); {price_note(c)}")
    out.append("peak: predicted peak reserved by the allocator; needs: what must fit on the card "
               "(allocator budget + CUDA context + paged optimizer state); both are model estimates.")
    if c.not_fitting:
        out.append("")
        out += not_fitting_lines(c)
    if c.excluded:
        out.append("")
        out.append("Over the limits (fit, not shown above):")
        for o in c.excluded:
            out.append(f"  {o.gpu.name}: {hours_str(o.hours)} h, {usd_str(o.cost_usd)} USD")
    if not c.fitting:
        out.append("")
        out.append("No single GPU here fits " + (f"within {', '.join(limits)}." if c.excluded else f"{m.display_name}."))
    chart = bar_chart(c)
    if chart:
        out.append("")
        out.append(chart)
    return "\n".join(out)


# --------------------------------------------------------------------------- JSON

# --------------------------------------------------------------------------- PNG

def cost_time_png(c: Comparison, path: str) -> str:
    """Cost (USD) against wall time (hours) for every fitting GPU, Pareto front highlighted and labelled.
    Returns the path. Raises fitmap.MatplotlibMissing (a ValueError) when matplotlib is missing."""
    require_matplotlib("--plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # optional dependency; no pyplot, no global backend state

    pts = [o for o in c.options if o.fits and o.hours is not None and o.cost_usd is not None]
    fig = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    others = [o for o in pts if not o.pareto]
    front = sorted((o for o in pts if o.pareto), key=lambda o: o.hours)
    ax.scatter([o.hours for o in others], [o.cost_usd for o in others], s=36, color="0.6", zorder=2,
               label="other GPUs")
    if front:
        ax.step([o.hours for o in front], [o.cost_usd for o in front], where="post", color="tab:red",
                alpha=0.5, zorder=1)
        ax.scatter([o.hours for o in front], [o.cost_usd for o in front], s=70, color="tab:red",
                   edgecolor="black", zorder=3, label="Pareto: no other GPU both faster and cheaper")
    if pts:
        hs = [o.hours for o in pts]
        if max(hs) / max(min(hs), 1e-9) > 10:
            ax.set_xscale("log")
        cs = [o.cost_usd for o in pts if o.cost_usd > 0]
        if cs and max(cs) / min(cs) > 10:
            ax.set_yscale("log")
        ax.margins(x=0.12, y=0.12)
    ax.set_xlabel("wall time (hours, estimated)")
    ax.set_ylabel("cost (USD, hours x price per GPU-hour)")
    ax.set_title(f"{c.model.display_name}: {workload_str(c)}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.text(0.01, 0.01, "tokens/s calibrated on " + ", ".join(c.speed_calibrated_on)
             + "; other GPUs estimated from datasheet ratios", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    labels = [(o, f"{o.gpu.name}\n{hours_str(o.hours)} h, ${usd_str(o.cost_usd)}", {"fontsize": 8, "fontweight": "bold"})
              for o in front]
    labels += [(o, o.gpu.name, {"fontsize": 7, "color": "0.35"}) for o in others]
    _place_labels(ax, fig.canvas.get_renderer(), labels, [(o.hours, o.cost_usd) for o in pts])
    fig.savefig(path, format="png")
    return path


_LABEL_OFFSETS = ((6, 4, "left", "bottom"), (6, -4, "left", "top"), (-6, 4, "right", "bottom"),
                  (-6, -4, "right", "top"), (0, 9, "center", "bottom"), (0, -9, "center", "top"))


def _place_labels(ax, renderer, labels, points) -> None:
    """Greedy label placement: per point, the first offset whose text box overlaps no placed label,
    no point and stays inside the axes; else the one overlapping least."""
    pix = [ax.transData.transform(p) for p in points]
    inside = ax.get_window_extent(renderer)
    placed = []

    def overlap(a, b) -> float:
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        return w * h if w > 0 and h > 0 else 0.0

    for o, text, style in labels:
        best = None
        for dx, dy, ha, va in _LABEL_OFFSETS:
            ann = ax.annotate(text, (o.hours, o.cost_usd), textcoords="offset points", xytext=(dx, dy),
                              ha=ha, va=va, **style)
            box = ann.get_window_extent(renderer)
            score = sum(overlap(box, b) for b in placed)
            score += sum(100.0 for x, y in pix if box.x0 - 3 < x < box.x1 + 3 and box.y0 - 3 < y < box.y1 + 3)
            score += 0.0 if (box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0
                             and box.y1 <= inside.y1) else 1e6
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, ann, box)
            else:
                ann.remove()
            if score == 0:
                break
        placed.append(best[2])
