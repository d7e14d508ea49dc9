"""Timing of `qfit compare`'s computation (pytest-benchmark).

Run: python -m pytest benchmarks/bench_compare.py --benchmark-only -q

The budget is the whole command under one second for the brief's example
(`qfit compare mistral-7b --examples 5000 --avg-tokens 350 --epochs 3`, 15 catalog GPUs).
`naive` runs planner.search.search once per GPU, for reference: compare() shares the memory
estimates between GPUs (planner.compare.search_all) and should be several times faster.
"""

from __future__ import annotations

import pytest

from planner.coefficients import load_coefficients
from planner.compare import Workload, compare
from planner.documents import compare_document
from planner.profiles import all_gpus, load_model
from planner.report_compare import render_text
from planner.search import Request, search

WORKLOAD = Workload.from_examples(5000, 350, 3)


@pytest.fixture(scope="module")
def setup():
    return load_coefficients(), all_gpus()


@pytest.mark.parametrize("model_name", ["mistral-7b", "llama-3.1-70b"])
def test_compare_all_gpus(benchmark, setup, model_name):
    coeffs, gpus = setup
    model = load_model(model_name)
    result = benchmark(compare, model, WORKLOAD, gpus, coeffs)
    assert len(result.options) == len(gpus) >= 15
    assert benchmark.stats.stats.median < 0.5  # leaves room for interpreter start-up and imports within 1 s


def test_compare_and_render(benchmark, setup):
    coeffs, gpus = setup
    model = load_model("mistral-7b")

    def run():
        c = compare(model, WORKLOAD, gpus, coeffs)
        return render_text(c), compare_document(c)

    text, doc = benchmark(run)
    assert len(doc) == len(gpus)


def test_naive_search_per_gpu(benchmark, setup):
    """Reference: planner.search.search for each GPU with no shared estimates."""
    coeffs, gpus = setup
    model = load_model("mistral-7b")
    results = benchmark(lambda: [search(model, g, Request(), coeffs) for g in gpus])
    assert all(r.best is not None for r in results)
