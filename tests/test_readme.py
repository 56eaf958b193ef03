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


def test_changelog_opens_with_the_packaged_version():
    import tomllib
    root = README.parent
    version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    headings = [line for line in (root / "CHANGELOG.md").read_text().splitlines() if line.startswith("## ")]
    assert headings and headings[0].startswith(f"## {version} "), (version, headings[:1])


def test_cupy_extras_match_cuda_majors():
    import tomllib
    extras = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cupy-cuda13"] == ["cupy-cuda13x"] and extras["cupy-cuda12"] == ["cupy-cuda12x"]
    for extra in ("cupy-cuda13", "cupy-cuda12"):
        assert f".[{extra}]" in README.read_text()
