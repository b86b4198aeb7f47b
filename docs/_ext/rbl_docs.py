"""Sphinx directives that generate pages from the code, so they cannot go stale.

``cli-help``: the ``--help`` text of ``robustbench-lite`` or one of its subcommands, as the parser
prints it.  ``registry-table``: the plugins registered in one registry (attacks, defenses,
verifiers, models, kinds) or the presets, one row each, with the first paragraph of its docstring,
as ``robustbench-lite list`` shows them.
"""

from __future__ import annotations

import argparse
import os
import re

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList

_ROLE = re.compile(r":[\w:]+:`~?([^`]+)`")


def _plain_rst(text: str) -> str:
    """A docstring paragraph as inline reST without cross-references (``:func:`x``` becomes
    ````x````): a summary must not point at objects the site does not document."""
    return _ROLE.sub(lambda m: f"``{m.group(1)}``", " ".join(text.split()))


def _summary(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return _plain_rst(doc.split("\n\n", 1)[0]) if doc else ""


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    raise ValueError(f"robustbench-lite has no subcommand {name!r}")


class CliHelp(Directive):
    """``.. cli-help:: [SUBCOMMAND]``: the parser's help text in a literal block."""

    optional_arguments = 1

    def run(self) -> list[nodes.Node]:
        from robustbench_lite.cli import build_parser

        old = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal width: fix it
        try:
            parser = build_parser()
            if self.arguments:
                parser = _subparser(parser, self.arguments[0])
            text = parser.format_help()
        finally:
            if old is None:
                os.environ.pop("COLUMNS", None)
            else:
                os.environ["COLUMNS"] = old
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


class RegistryTable(Directive):
    """``.. registry-table:: attacks|defenses|verifiers|models|kinds|presets``."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        what = self.arguments[0]
        header, rows = self._rows(what)
        lines = [".. list-table::", "   :header-rows: 1", "   :widths: auto", ""]
        for row in [header, *rows]:
            lines.append(f"   * - {row[0]}")
            lines.extend(f"     - {cell or ' '}" for cell in row[1:])
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=f"registry-table {what}"), self.content_offset, container)
        return container.children

    def _rows(self, what: str) -> tuple[list[str], list[list[str]]]:
        from robustbench_lite.certify import VERIFIERS
        from robustbench_lite.core.registry import ATTACKS, DEFENSES, MODELS
        from robustbench_lite.harness.kinds import KINDS
        from robustbench_lite.harness.presets import PRESETS

        if what == "presets":
            return ["preset", "what it runs"], [[f"``{n}``", _plain_rst(PRESETS[n].description)] for n in PRESETS]
        registries = {"attacks": ATTACKS, "defenses": DEFENSES, "verifiers": VERIFIERS, "models": MODELS, "kinds": KINDS}
        if what not in registries:
            raise self.error(f"registry-table: unknown registry {what!r}; one of {sorted(registries)} or presets")
        reg = registries[what]
        rows = []
        for name in reg.list():
            obj = reg.get(name)
            row = [f"``{name}``"]
            if what in ("attacks", "verifiers"):
                row.append(", ".join(n.value for n in obj.norms))
            if what == "attacks":
                row.append(obj.cell_kind)
            row.append(_summary(obj))
            rows.append(row)
        header = {"attacks": ["attack", "norms", "cell kind", "what it does"],
                  "verifiers": ["verifier", "norms", "what it bounds"]}.get(what, [what[:-1], "what it is"])
        return header, rows


def _signature(app, what, name, obj, options, signature, return_annotation):  # noqa: ANN001, ANN202
    """A dataclass field with a ``default_factory`` shows as ``=<factory>``, which the Python
    domain cannot parse (it then splits the whole signature at commas): show ``...`` instead."""
    if signature and "<factory>" in signature:
        signature = signature.replace("<factory>", "...")
    return signature, return_annotation


def _public_alias(app, env, node, contnode):  # noqa: ANN001, ANN202
    """Resolve a reference to where a public object is defined (``robustbench_lite.eval.evasion.
    evaluate``) to the page that documents it under its public name (``robustbench_lite.evaluate``)."""
    import importlib

    import robustbench_lite

    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    module, _, attr = target.rpartition(".")
    if not module.startswith("robustbench_lite"):
        return None
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        return None
    for name in robustbench_lite.__all__:
        if getattr(robustbench_lite, name) is obj:
            domain = env.get_domain("py")
            return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], f"robustbench_lite.{name}",
                                       node, contnode)
    return None


def setup(app):  # noqa: ANN001, ANN201 - the Sphinx extension entry point
    app.add_directive("cli-help", CliHelp)
    app.add_directive("registry-table", RegistryTable)
    app.connect("autodoc-process-signature", _signature)
    app.connect("missing-reference", _public_alias)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
