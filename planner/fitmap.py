"""`qfit plan --fit-map FILE.png`: micro-batch x sequence length on one GPU, fits or not, GiB per cell.

fit_map() is pure (the grid of plans); fit_map_png() draws it with matplotlib, imported inside
(an optional dependency: `pip install matplotlib`).

Each cell keeps what the request fixes. The LoRA adapter is held at the request's rank and
targets (default r16 all-linear) so that every cell trains the same adapter; checkpointing and the
optimizer, when the request leaves them open, are chosen per cell by planner.search (the fastest
fitting plan; when none fits, the candidate that needs least memory is shown).
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

    @property
    def fits(self) -> bool:
        return self.plan is not None

    @property
    def needs_bytes(self) -> int | None:
        return self.shown.memory.needs_bytes if self.shown else None


def cell_request(request: Request, batch_size: int, seq_len: int) -> Request:
    """The request of one cell: micro-batch and sequence fixed, the adapter held constant, and every layer
    checkpointed unless asked otherwise (partial checkpointing would fill each cell to the card)."""
    default = LoraSettings()
    return replace(request, batch_size=batch_size, grad_accum=None, seq_len=seq_len,
                   rank=request.rank or default.rank, targets=request.targets or default.targets,
                   uncheckpointed_layers=request.uncheckpointed_layers or 0)


def fit_map(model: ModelSpec, gpu: GpuSpec, request: Request, coeffs: Coefficients,
            batches: tuple[int, ...] = FIT_MAP_BATCHES,
            seq_lens: tuple[int, ...] = FIT_MAP_SEQ_LENS) -> list[list[FitCell]]:
    """rows = batches, columns = seq_lens. Pure."""
    grid = []
    for b in batches:
        row = []
        for s in seq_lens:
            if s > model.max_position_embeddings:
                row.append(FitCell(batch_size=b, seq_len=s, plan=None, shown=None, beyond_model=True))
                continue
            res = search(model, gpu, cell_request(request, b, s), coeffs)
            row.append(FitCell(batch_size=b, seq_len=s, plan=res.best, shown=res.best or smallest(res.plans)))
        grid.append(row)
    return grid


def require_matplotlib(flag: str):
    """Import matplotlib or raise MatplotlibMissing with the one-line fix."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MatplotlibMissing(f"{flag} needs matplotlib: pip install matplotlib") from None


def fit_map_png(model: ModelSpec, gpu: GpuSpec, request: Request, coeffs: Coefficients, path: str) -> str:
    """Draw fit_map() as a heatmap PNG at path; returns path. Raises MatplotlibMissing (a ValueError)."""
    require_matplotlib("--fit-map")
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from planner.report import gib_str

    grid = fit_map(model, gpu, request, coeffs)
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
    fig = Figure(figsize=(1.25 * n_cols + 2.2, 0.8 * n_rows + 2.0), dpi=120)
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
    ax.set_xticks(range(n_cols), [str(c.seq_len) for c in grid[0]])
    ax.set_yticks(range(n_rows), [str(row[0].batch_size) for row in grid])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("micro-batch")
    lora = cell_request(request, 1, 1)
    ax.set_title(f"{model.display_name} on {gpu.display_name}: GiB needed per cell "
                 f"(usable {gib_str(capacity, 1)} GiB)\nLoRA r{lora.rank} {','.join(lora.targets)}; "
                 "per cell the fastest fitting checkpointing/optimizer choice", fontsize=9)
    ax.legend(handles=[Patch(color=greens(0.5), label="fits"), Patch(color=reds(0.5), label="does not fit"),
                       Patch(color=grey, label="beyond the model's context")],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
