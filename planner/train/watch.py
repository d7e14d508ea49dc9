"""What `qfit run` watches while it trains, as pure functions over the numbers it logged: validation loss
rising while training loss falls (divergence: the adapter starts to memorise the training rows), and
allocated memory growing from one logging interval to the next (a leak: something keeps tensors alive).

Standard library only; the callbacks in planner.train.trainer_glue feed them and print their warnings.
"""

from __future__ import annotations

DIVERGENCE_RISE = 0.10  # validation loss more than 10% above its best...
DIVERGENCE_EVALS = 2  # ...in this many evaluations in a row, while the training loss still falls
LEAK_INTERVALS = 5  # allocated memory after a step rising in each of this many logging intervals in a row...
LEAK_GROWTH = 0.01  # ...and by more than 1% over them


def divergence_step(evals: list[dict], rise: float = DIVERGENCE_RISE, count: int = DIVERGENCE_EVALS) -> int | None:
    """The step of the first evaluation of a divergence, or None.

    evals: [{"step", "eval_loss", "train_loss"}, ...] in step order (train_loss: the last training loss logged
    before that evaluation, None if none). Divergence: `count` evaluations in a row whose eval_loss is more than
    `rise` above the best eval_loss so far, while train_loss at the last of them is below train_loss at the best."""
    best = None  # the entry with the lowest eval_loss so far
    run: list[dict] = []
    for e in evals:
        if best is None or e["eval_loss"] < best["eval_loss"]:
            best, run = e, []
            continue
        if e["eval_loss"] > best["eval_loss"] * (1 + rise):
            run.append(e)
            falling = (e.get("train_loss") is not None and best.get("train_loss") is not None
                       and e["train_loss"] < best["train_loss"])
            if len(run) >= count and falling:
                return run[0]["step"]
        else:
            run = []
    return None


def leak_step(points: list[dict], intervals: int = LEAK_INTERVALS, growth: float = LEAK_GROWTH) -> int | None:
    """The step where a leak started, or None.

    points: [{"step", "allocated_bytes"}, ...] per logging interval, in step order (None values are skipped:
    a CPU run measures nothing). A leak: allocated_bytes rises at each of `intervals` intervals in a row
    (intervals + 1 points, strictly increasing) and the last is more than `growth` above the first."""
    vals = [(p["step"], p["allocated_bytes"]) for p in points if p.get("allocated_bytes") is not None]
    rising = 0  # intervals in a row that rose, ending at the current point
    for i in range(1, len(vals)):
        rising = rising + 1 if vals[i][1] > vals[i - 1][1] else 0
        if rising >= intervals:
            start = i - rising  # the first point of the rise
            if vals[i][1] > vals[start][1] * (1 + growth):
                return vals[start][0]
    return None
