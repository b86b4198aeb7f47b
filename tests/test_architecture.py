"""The package's shape: no import circle, and no import from a lower neighbourhood to a higher one.

Neighbourhoods, lowest first: ``core`` (and ``_version``) < ``training``, ``certify`` <
``attacks``, ``defenses`` < ``eval`` < ``harness`` < ``report`` < the command line and the package
root.  The built-in attacks and defenses import the package root (the plugin API, as a user's
plugin file does); every other import counts, including those inside functions and under ``TYPE_CHECKING``: an
import hidden in a function is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"robustbench_lite": ROOT / "robustbench_lite", "robustbench_lite.attacks": ROOT / "attacks",
            "robustbench_lite.defenses": ROOT / "defenses"}
RANK = {"_version": 0, "core": 0, "training": 1, "certify": 1, "attacks": 2, "defenses": 2, "eval": 3, "harness": 4,
        "report": 5}
TOP = 6  # the package root, cli*.py and anything not named above


def _modules() -> dict[str, Path]:
    out = {}
    for prefix, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([prefix, *parts])
            if prefix == "robustbench_lite" and parts and parts[0] in ("attacks", "defenses"):
                continue  # not a package folder of robustbench_lite itself
            out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:  # the longest known module the import names
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def _rank(module: str) -> int:
    parts = module.split(".")
    return RANK.get(parts[1], TOP) if len(parts) > 1 else TOP


def _plugin(module: str) -> bool:
    """A built-in attack or defense: written as any user's plugin file is, against the public API
    (``from robustbench_lite import ...``), which the registries load lazily."""
    return module.split(".")[1:2] in (["attacks"], ["defenses"])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_circle():
    graph = _graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 200  # the walk saw the package
    assert _cycles(graph) == []


def test_no_import_goes_from_a_lower_neighbourhood_to_a_higher_one():
    upward = sorted(f"{m} -> {d}" for m, deps in _graph().items() for d in deps
                    if _rank(d) > _rank(m) and not (d == "robustbench_lite" and _plugin(m)))
    assert upward == []


def test_the_checks_catch_a_circle_and_an_upward_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _rank("robustbench_lite.report.html") > _rank("robustbench_lite.harness.run") > _rank("robustbench_lite.core.ops")
    assert _rank("robustbench_lite.cli") == TOP
