"""The README's quick start and its own-model snippets hold (the guides' examples: test_docs.py)."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _block_after(heading: str, lang: str = "python") -> str:
    section = README.split(heading, 1)[1]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def test_readme_quick_start_has_exactly_two_commands():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick, re.S)
    assert len(blocks) == 2 and all(len(b.strip().splitlines()) == 1 for b in blocks)
    assert "run_benchmark.py" in blocks[0] and "pytest" in blocks[1]


def test_readme_shows_your_own_model_in_three_lines_each_and_the_call_matches_the_api():
    import inspect

    from robustbench_lite import benchmark
    from robustbench_lite.cli import build_parser

    section = README.split("## Your own model", 1)[1].split("\n## ", 1)[0]
    shell = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1).strip().splitlines()
    assert len(shell) == 3 and shell[0].startswith("robustbench-lite eval") and len(python) == 3
    argv = " ".join(line.rstrip("\\ ") for line in shell).split()[1:]
    build_parser().parse_args(argv)  # every flag of the shown command exists
    call = re.search(r"benchmark\((.*)\)", " ".join(python[1:]), re.S).group(1)
    names = re.findall(r"(\w+)=", call)
    inspect.signature(benchmark).bind(object(), **dict.fromkeys(names))  # every keyword is benchmark()'s
