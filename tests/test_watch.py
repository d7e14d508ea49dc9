"""The run's watches as pure functions (planner.train.watch): validation loss diverging from the training loss,
and allocated memory growing from one logging interval to the next (a leak), with the step each started."""

from __future__ import annotations

from planner.train.watch import divergence_step, leak_step


def evals(*rows):
    return [{"step": s, "eval_loss": e, "train_loss": t} for s, e, t in rows]


def test_divergence_needs_two_evaluations_over_best_by_10_percent_while_training_loss_falls():
    rising = evals((10, 2.0, 3.0), (20, 1.5, 2.0), (30, 1.7, 1.5), (40, 1.8, 1.2), (50, 1.9, 1.0))
    assert divergence_step(rising) == 30  # 1.7 and 1.8 are both > 1.5 x 1.1 = 1.65; train 1.2 < 2.0
    assert divergence_step(rising[:4]) == 30
    assert divergence_step(rising[:3]) is None  # one evaluation above is noise


def test_no_divergence_when_both_losses_fall_or_rise_is_small_or_training_loss_rises_too():
    assert divergence_step(evals((10, 2.0, 3.0), (20, 1.8, 2.5), (30, 1.6, 2.0))) is None
    assert divergence_step(evals((10, 1.5, 2.0), (20, 1.6, 1.8), (30, 1.64, 1.5))) is None  # within 10% of best
    assert divergence_step(evals((10, 1.5, 1.0), (20, 1.8, 1.5), (30, 1.9, 1.7))) is None  # training loss rose too
    assert divergence_step(evals((10, 1.5, None), (20, 1.8, None), (30, 1.9, None))) is None  # nothing logged yet
    assert divergence_step([]) is None


def test_divergence_run_is_broken_by_an_evaluation_back_near_the_best():
    assert divergence_step(evals((10, 1.5, 2.0), (20, 1.8, 1.5), (30, 1.6, 1.4), (40, 1.7, 1.3))) is None
    assert divergence_step(evals((10, 1.5, 2.0), (20, 1.8, 1.5), (30, 1.6, 1.4), (40, 1.7, 1.3),
                                 (50, 1.7, 1.2))) == 40


def mem(values, start=10, every=10):
    return [{"step": start + i * every, "allocated_bytes": v} for i, v in enumerate(values)]


def test_leak_is_five_rising_intervals_and_more_than_1_percent():
    flat = [1000] * 4
    leak = [1000, 1003, 1006, 1009, 1012, 1015]  # 5 rises, +1.5%
    assert leak_step(mem(flat + leak)) == 50  # the rise starts at the last flat point (step 50)
    assert leak_step(mem(leak[:5])) is None  # 4 rises: not yet
    assert leak_step(mem([1000, 1001, 1002, 1003, 1004, 1005])) is None  # 5 rises but only +0.5%
    assert leak_step(mem([1000, 1001, 1002, 1003, 1004, 1005, 1020])) == 10  # the same rise, later past 1%


def test_no_leak_when_memory_falls_in_between_or_is_not_measured():
    assert leak_step(mem([1000, 1100, 1200, 1100, 1200, 1300, 1400])) is None  # a fall resets the count
    assert leak_step(mem([1000, 1100, 1200, 1100, 1200, 1300, 1400, 1500, 1600])) == 40
    assert leak_step(mem([None] * 10)) is None  # a CPU run records the steps with nulls
    assert leak_step([]) is None
