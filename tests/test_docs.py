"""The README shows real output: its example blocks are what the commands print now.

Compares only; after a deliberate change: python -m tests.update_goldens
"""

import re

import pytest
from update_goldens import README, README_EXAMPLES, example_output, readme_block


@pytest.mark.parametrize("command,cut", README_EXAMPLES, ids=[c for c, _ in README_EXAMPLES])
def test_readme_example_is_real_output(command, cut):
    match = readme_block(README.read_text(), command)
    assert match, f"README has no example block for `{command}`"
    assert match.group(2) == example_output(command, cut)


def test_readme_has_exactly_the_two_setup_commands():
    text = README.read_text()
    setup = text.split("## Set up")[1].split("## ")[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert commands == ['pip install -e . && qfit plan mistral-7b --gpu t4',
                        'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q']
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci
