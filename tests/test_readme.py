"""The README's Python examples run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md example {index}", "exec"), {"__name__": "readme"})


def test_readme_starts_with_the_two_setup_commands():
    text = README.read_text()
    commands = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert commands[0].endswith("ezrt bench")
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci


ROOT = README.parent


def test_readme_and_docs_cite_only_files_that_ship():
    """Every relative link resolves inside the repository, and nothing points outside it."""
    for page in [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/README.md"]:
        text = page.read_text()
        assert "shared/BENCHMARKS" not in text and "shared/reference" not in text, page
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to {target}"


def test_cli_help_points_at_nothing_outside_the_package():
    from ezrt.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # bench, info
    for text in [parser.format_help(), *(sub.format_help() for sub in commands.values())]:
        assert "shared/" not in text
    assert "docs/benchmarks.md" in commands["bench"].format_help()
