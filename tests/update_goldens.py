"""The golden outputs the tests compare against, and the only code that rewrites them.

After a deliberate change to the output:  python -m tests.update_goldens
(the tests only compare; no test run can rewrite a golden file or the README).
"""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from planner.cli import cli

ROOT = Path(__file__).resolve().parent.parent
PLAN_GOLDEN = ROOT / "tests" / "golden" / "plan_mistral-7b_t4.txt"
PLAN_ARGS = ("plan", "mistral-7b", "--gpu", "t4")
README = ROOT / "README.md"
# README example blocks: (command, the text after which the block stops; None: the whole output)
README_EXAMPLES = [
    ("qfit plan mistral-7b --gpu t4", None),
    ("qfit compare mistral-7b --examples 5000 --avg-tokens 350 --epochs 3", "\nUSD per GPU"),
    ("qfit plan mistral-7b --gpu a100-80gb --method auto", "\nAlternatives that fit"),
]


def plan_output() -> str:
    return CliRunner().invoke(cli, list(PLAN_ARGS)).output


def example_output(command: str, cut: str | None) -> str:
    out = CliRunner().invoke(cli, command.split()[1:]).output
    return out.split(cut)[0] + "\n" if cut else out


def readme_block(text: str, command: str) -> re.Match | None:
    """The README's ```$ command``` block; group 2 is the output shown."""
    return re.compile(r"(```\n\$ " + re.escape(command) + r"\n)(.*?)(```)", re.S).search(text)


def main() -> None:
    PLAN_GOLDEN.write_text(plan_output())
    print(f"wrote {PLAN_GOLDEN.relative_to(ROOT)}")
    text = README.read_text()
    for command, cut in README_EXAMPLES:
        match = readme_block(text, command)
        if match is None:
            raise SystemExit(f"README has no example block for `{command}`")
        text = text[:match.start(2)] + example_output(command, cut) + text[match.end(2):]
    README.write_text(text)
    print(f"updated {len(README_EXAMPLES)} example blocks in README.md")


if __name__ == "__main__":
    main()
