"""`qfit plan --fit-map FILE.png`: micro-batch x sequence length on one GPU, fits or not, GiB per cell.

fit_map() is pure (the grid of plans); fit_map_png() draws it with matplotlib, imported inside
(an optional dependency: `pip install matplotlib`).

The map is drawn from the same search as the plan: every cell keeps the recommended plan's LoRA adapter,
optimizer, compute dtype and packing (so no cell silently switches to an 8-bit optimizer the plan did not
choose), with micro-batch and sequence length fixed per cell and checkpointing (every layer, or none) chosen
by planner.search unless the request fixes it. The recommended plan's cell is marked. Without a recommended
plan (nothing fits) the cells keep the request's adapter (default r16 all-linear) and search the rest; when
no candidate of a cell fits, the one that needs least memory is shown.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.errors import QfitError
from planner.search import Request, search, smallest
from planner.specs import Coefficients, GpuSpec, LoraSettings, ModelSpec, Plan

FIT_MAP_BATCHES = (1, 2, 4, 8, 16, 32)  # micro-batch per step (rows)
FIT_MAP_SEQ_LENS = (256, 512, 1024, 2048, 4096, 8192)  # tokens per sequence (columns)


class MatplotlibMissing(QfitError, ImportError):
    """--fit-map / --plot without matplotlib. A ValueError too, so the CLI prints it as one line (exit 2)."""


@dataclass(frozen=True, slots=True)
class FitCell:
    batch_size: int
    seq_len: int
    plan: Plan | None  # best fitting plan; None when nothing fits or seq_len is beyond the model
    shown: Plan | None  # the plan whose memory the cell shows: the best, else the smallest candidate
    beyond_model: bool = False  # seq_len > the model's max_position_embeddings
    recommended: bool = False  # the recommended plan's micro-batch and sequence length

    @property
    def fits(self) -> bool:
        return self.plan is not None

    @property
    def needs_bytes(self) -> int | None:
        return self.shown.memory.needs_bytes if self.shown else None


def cell_request(request: Request, batch_size: int, seq_len: int, recommended: Plan | None = None) -> Request:
    """The request of one cell: micro-batch and sequence fixed; the adapter, optimizer, dtype and packing of the
    recommended plan (else the request's adapter, default r16 all-linear); every layer checkpointed unless asked
    otherwise (partial checkpointing would fill each cell to the card)."""
    default = LoraSettings()
    req = replace(request, batch_size=batch_size, grad_accum=None, seq_len=seq_len,
                  rank=request.rank or default.rank, targets=request.targets or default.targets,
                  uncheckpointed_layers=request.uncheckpointed_layers or 0)
    if recommended is not None:
        lora, t = recommended.lora, recommended.train
        req = replace(req, rank=lora.rank, alpha=lora.alpha, lora_dropout=lora.dropout, targets=lora.targets,
                      optim=t.optim, compute_dtype=t.compute_dtype, double_quant=t.double_quant,
                      expandable_segments=t.expandable_segments, packing=t.packing,
                      effective_batch=max(t.effective_batch, batch_size))
    return req


def _axis(values: tuple[int, ...], extra: int | None) -> tuple[int, ...]:
    return tuple(sorted(set(values) | ({extra} if extra else set())))


def fit_map(model: ModelSpec, gpu: GpuSpec, request: Request, coeffs: Coefficients,
            batches: tuple[int, ...] = FIT_MAP_BATCHES,
            seq_lens: tuple[int, ...] = FIT_MAP_SEQ_LENS, recommended: Plan | None = None) -> list[list[FitCell]]:
    """rows = batches, columns = seq_lens (the recommended plan's micro-batch and sequence length added when the
    axes lack them). Pure."""
    rec_b = recommended.train.batch_size if recommended else None
    rec_s = recommended.train.seq_len if recommended else None
    grid = []
    for b in _axis(batches, rec_b):
        row = []
        for s in _axis(seq_lens, rec_s):
            if s > model.max_position_embeddings:
                row.append(FitCell(batch_size=b, seq_len=s, plan=None, shown=None, beyond_model=True))
                continue
            res = search(model, gpu, cell_request(request, b, s, recommended), coeffs)
            row.append(FitCell(batch_size=b, seq_len=s, plan=res.best, shown=res.best or smallest(res.plans),
                               recommended=(b, s) == (rec_b, rec_s)))
        grid.append(row)
    return grid


def legend(grid: list[list[FitCell]], recommended: Plan | None) -> list[str]:
    """The map's legend, as text (fit_map_png draws it): colours, the recommended cell, what a cell says, and the
    settings every cell shares."""
    shared = next((c.shown for row in grid for c in row if c.shown), None)
    lines = ["green: fits (deeper: fuller card)", "red: does not fit", "grey: beyond the model's context",
             "cell: GiB needed; ckpt (every layer checkpointed) or no ckpt"]
    if recommended is not None:
        lines.insert(3, "thick black border: the recommended plan (its micro-batch and sequence length)")
    if shared is not None:
        t, lora = shared.train, shared.lora
        lines.append(f"every cell: LoRA r{lora.rank} {','.join(lora.targets)}, {t.optim}, {t.compute_dtype}"
                     f"{', packed' if t.packing else ''}")
    return lines


def require_matplotlib(flag: str):
    """Import matplotlib or raise MatplotlibMissing with the one-line fix."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MatplotlibMissing(f"{flag} needs matplotlib: pip install matplotlib") from None


def fit_map_png(model: ModelSpec, gpu: GpuSpec, request: Request, coeffs: Coefficients, path: str,
                recommended: Plan | None = None) -> str:
    """Draw fit_map() as a heatmap PNG at path; returns path. Raises MatplotlibMissing (a ValueError)."""
    require_matplotlib("--fit-map")
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    from planner.report import gib_str

    grid = fit_map(model, gpu, request, coeffs, recommended=recommended)
    capacity = int(gpu.memory_bytes * (1.0 - coeffs.get("safety_margin_frac")))
    greens, reds = colormaps["Greens"], colormaps["Reds"]
    grey = (0.85, 0.85, 0.85, 1.0)

    def colour(cell: FitCell):
        if cell.beyond_model or cell.needs_bytes is None:
            return grey
        ratio = cell.needs_bytes / capacity  # fits: deeper green as the card fills; does not fit: red
        if cell.fits:
            return greens(0.25 + 0.5 * min(ratio, 1.0))
        return reds(0.35 + 0.4 * min((ratio - 1.0) / 2.0, 1.0))

    n_rows, n_cols = len(grid), len(grid[0])
    fig = Figure(figsize=(1.25 * n_cols + 5.5, 0.8 * n_rows + 2.0), dpi=120)
    ax = fig.add_subplot()
    ax.imshow([[colour(c) for c in row] for row in grid], aspect="auto", origin="lower")
    for i, row in enumerate(grid):
        for j, cell in enumerate(row):
            if cell.beyond_model:
                text = "n/a\n> context"
            else:
                ckpt = "ckpt" if cell.shown.train.gradient_checkpointing else "no ckpt"
                text = f"{gib_str(cell.needs_bytes, 1)}\n{ckpt if cell.fits else 'no fit'}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    fontweight="bold" if cell.fits else "normal")
            if cell.recommended:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=3))
    ax.set_xticks(range(n_cols), [str(c.seq_len) for c in grid[0]])
    ax.set_yticks(range(n_rows), [str(row[0].batch_size) for row in grid])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("micro-batch")
    ax.set_title(f"{model.display_name} on {gpu.display_name}: GiB needed per cell "
                 f"(usable {gib_str(capacity, 1)} GiB)", fontsize=9)
    text = legend(grid, recommended)
    handles = [Patch(color=greens(0.5), label=text[0]), Patch(color=reds(0.5), label=text[1]),
               Patch(color=grey, label=text[2])]
    if recommended is not None:
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=3, label=text[3]))
    handles += [Patch(color="white", label=line) for line in text[len(handles):]]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
