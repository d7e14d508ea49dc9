"""The README shows real output: its example blocks are what the commands print now.

Refresh after a deliberate change: QFIT_UPDATE_GOLDEN=1 python -m pytest tests/test_docs.py
"""

import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from planner.cli import cli

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = [
    ("qfit plan mistral-7b --gpu t4", None),
    ("qfit compare mistral-7b --examples 5000 --avg-tokens 350 --epochs 3", "\nUSD per GPU"),
]


@pytest.mark.parametrize("command,cut", EXAMPLES, ids=[c for c, _ in EXAMPLES])
def test_readme_example_is_real_output(command, cut):
    out = CliRunner().invoke(cli, command.split()[1:]).output
    if cut:
        out = out.split(cut)[0] + "\n"
    text = README.read_text()
    pattern = re.compile(r"(```\n\$ " + re.escape(command) + r"\n)(.*?)(```)", re.S)
    match = pattern.search(text)
    assert match, f"README has no example block for `{command}`"
    if os.environ.get("QFIT_UPDATE_GOLDEN"):
        README.write_text(text[:match.start(2)] + out + text[match.end(2):])
        text = README.read_text()
        match = pattern.search(text)
    assert match.group(2) == out


def test_readme_has_exactly_the_two_setup_commands():
    text = README.read_text()
    setup = text.split("## Set up")[1].split("## ")[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert commands == ['pip install -e . && qfit plan mistral-7b --gpu t4',
                        'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q']
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci
