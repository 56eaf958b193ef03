"""The README's Python blocks run as written on a CPU."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_python_blocks():
    assert BLOCKS


@pytest.mark.parametrize("block", range(len(BLOCKS)))
def test_readme_block_runs_on_cpu(block):
    namespace = {}
    exec(compile(BLOCKS[block], f"README.md python block {block}", "exec"), namespace)
