"""Speed targets of `qfit plan` (figures go in the README):
  - the search over the default grid: target < 50 ms on the CI machine
  - the whole process `qfit plan mistral-7b --gpu t4`: target < 0.3 s wall

Run: python -m pytest benchmarks/bench_plan.py --benchmark-only
"""

import subprocess
import sys
from pathlib import Path

from planner.coefficients import load_coefficients
from planner.memory import (
    lora_tensor_numels,
    optimizer_state_bytes,
    quant_constants_bytes,
    quantized_weights_bytes,
    resolve_targets,
)
from planner.profiles import load_gpu, load_model
from planner.search import Request, search

ROOT = Path(__file__).resolve().parent.parent


def _clear_caches():
    for f in (resolve_targets, lora_tensor_numels, optimizer_state_bytes, quant_constants_bytes, quantized_weights_bytes):
        f.cache_clear()


def test_search_default_grid(benchmark):
    model, gpu, coeffs = load_model("mistral-7b"), load_gpu("t4"), load_coefficients("t4")

    def cold_search():  # caches cleared: what one `qfit plan` process pays
        _clear_caches()
        return search(model, gpu, Request(), coeffs)

    result = benchmark(cold_search)
    assert result.best is not None


def test_whole_process_plan(benchmark):
    def run():
        subprocess.run([sys.executable, "-m", "planner.cli", "plan", "mistral-7b", "--gpu", "t4"], cwd=ROOT,
                       check=True, capture_output=True)

    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)


def test_python_startup_baseline(benchmark):
    """What a stdlib + click + tabulate program costs to start here, for scale."""
    def run():
        subprocess.run([sys.executable, "-c", "import click, tabulate"], check=True)

    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
