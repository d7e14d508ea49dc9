"""The CPU demo's wall time (issue target: under two minutes on the CI machine).

Run: python -m pytest benchmarks/bench_demo.py --benchmark-only
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_wall_time(benchmark, tmp_path):
    counter = iter(range(100))

    def run():
        out = tmp_path / f"run{next(counter)}"
        subprocess.run([sys.executable, "-m", "planner.cli", "run", "--demo", "--output", str(out)], cwd=ROOT,
                       check=True, capture_output=True)

    benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
