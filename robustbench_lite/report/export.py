"""What a practitioner takes away from a run: the leaderboard as JSON, a claim card per row, and
the tables as pandas DataFrames.

* :func:`document`: one entry per row of the evasion leaderboards (a model at a threat), shaped
  like a RobustBench ``model_info`` file (Croce et al., "RobustBench: a standardized adversarial
  robustness benchmark", NeurIPS 2021 Datasets and Benchmarks): ``name``, ``dataset``, ``eps``,
  ``clean_acc``, ``autoattack_acc``, ``reported``, ``footnote``, ... with RobustBench's types
  (accuracies as percentage strings with two decimals, eps as a string), plus this package's
  columns as fractions in [0, 1] (``worst_case``, ``certified``, one value per attack) and the
  flags.  ``leaderboard.schema.json`` beside this module is its JSON schema.
* :func:`claim_card`: the same entry as a Markdown page a reader can check: the numbers, the
  attacks, the flags explained, the model's identity and how to replay its examples.
* :func:`results`: the wide and the long tables of a results folder.

``autoattack_acc`` is filled only where a row's stored attacks are exactly the ``autoattack``
attack set (looked up by name when the export runs; without that set it stays null): the
per-point AND of those attacks' robust masks, without the escalation ladder's finds (which the
``worst_case`` column includes).  Fields the harness cannot know (``link``, ``authors``,
``venue``, ``additional_data``, ``number_forward_passes``, and ``reported``, the robust accuracy
a model's authors report) are null.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from torch import Tensor

from ..core.config import config_hash
from ..core.registry import create_attack
from ..eval.flags import ADAPTED, FLAGS
from ..harness import attack_sets
from ..harness.advsave import safe_name
from ..harness.rows import WORST_CASE, CellResult
from ..harness.store import Store
from .leaderboard import _public, long_table, wide_tables

FORMAT = "robustbench-lite/leaderboard"
FORMAT_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("leaderboard.schema.json")
AUTOATTACK_SET = "autoattack"
CLAIMS = "claims"
_NORM_LABEL = {"linf": "Linf", "l2": "L2", "l1": "L1", "l0": "L0"}
_ID = ("dataset", "model", "defense", "n", "norm", "eps")
MaskOf = Callable[[str], "Tensor | None"]


class Results(NamedTuple):
    """The tables of a results folder: ``wide`` has a row per (dataset, threat, model, defense,
    n) with a column per attack, the worst case and the columns other kinds add (every
    ``<dataset>_<norm>_<eps>.csv`` stacked); ``long`` has every stored cell (``cells.csv``)."""

    wide: pd.DataFrame
    long: pd.DataFrame


def results(workdir: str | Path = ".rbl") -> Results:
    """The wide and long tables of the results store in ``workdir`` (what ``run``, ``eval`` and
    ``benchmark(workdir=...)`` wrote), as pandas DataFrames."""
    with Store(Path(workdir) / "store.sqlite", create=False) as store:
        rows = store.rows()
    tables = wide_tables(rows)
    wide = pd.concat(list(tables.values()), ignore_index=True, sort=False) if tables else pd.DataFrame()
    return Results(wide, _public(long_table(rows)))


# -- values -----------------------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    """A finite float, or None (NaN, None, missing)."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _cell(value: Any) -> float | str | bool | None:
    """A wide-table cell as JSON: a string, a bool, a finite number or None."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    return _number(value)


def percent(value: Any) -> str | None:
    """A fraction as RobustBench writes accuracies: a percentage with two decimals (``"89.69"``)."""
    v = _number(value)
    return None if v is None else f"{100 * v:.2f}"


def eps_text(eps: float) -> str:
    """eps as RobustBench writes it: ``"8/255"`` where it is a whole number of 255ths that has no
    short decimal, else the short decimal (``"0.1"``)."""
    short = f"{eps:g}"
    k = round(eps * 255)
    if len(short) > 6 and k > 0 and abs(eps * 255 - k) < 1e-6:
        return f"{k}/255"
    return short


def flag_note(code: str) -> str:
    """What a flag code means."""
    if code.startswith(f"{ADAPTED}:"):
        return FLAGS[ADAPTED]
    if code.startswith("error:"):
        return f"the attack {code.split(':', 1)[1]} failed with an error, so the worst case covers fewer attacks"
    return FLAGS.get(code, "a check of a plugin or a later version (see the documentation of the code)")


# -- the autoattack set ---------------------------------------------------------------------------------
def _free_keys(name: str, norm: str) -> set[str]:
    """Settings of the set's attack ``name`` that the set chooses by the model's class count."""
    seen: dict[str, set[str]] = {}
    for k in (4, 10, 100, 1000):
        for spec in attack_sets.attack_specs(AUTOATTACK_SET, norm, k):
            for key, value in spec.params.items():
                seen.setdefault(f"{spec.name}\0{key}", set()).add(json.dumps(value, sort_keys=True, default=str))
    return {key.split("\0", 1)[1] for key, values in seen.items() if key.startswith(f"{name}\0") and len(values) > 1}


def is_autoattack(attacks: Sequence[CellResult]) -> bool:
    """Whether ``attacks`` (a row's stored attack cells) are exactly the ``autoattack`` set: the
    same attacks with the same settings (those the set picks by class count aside)."""
    if AUTOATTACK_SET not in attack_sets.SETS or not attacks:
        return False
    norm, eps = attacks[0].norm, float(attacks[0].eps)
    try:
        specs = attack_sets.attack_specs(AUTOATTACK_SET, norm, None)
        free = {s.name: _free_keys(s.name, norm) for s in specs}
    except ValueError:  # no attack of the set runs under this norm
        return False
    stored = {r.attack: r for r in attacks}
    if len(stored) != len(attacks) or set(stored) != {s.name for s in specs}:
        return False
    for spec in specs:
        try:
            want = create_attack(spec.name, norm=norm, eps=eps, **spec.params).get_params()
            have = json.loads(stored[spec.name].attack_params or "{}")
        except (ValueError, TypeError, KeyError):
            return False
        want = json.loads(json.dumps(want, sort_keys=True, default=str))
        skip = free[spec.name]
        if {k: v for k, v in want.items() if k not in skip} != {k: v for k, v in have.items() if k not in skip}:
            return False
    return True


def autoattack_acc(attacks: Sequence[CellResult], mask_of: MaskOf | None) -> float | None:
    """The robust accuracy under the ``autoattack`` set when ``attacks`` are exactly it and all ran:
    the per-point AND of their robust masks (``mask_of(key)``); without masks, the lowest of the
    attacks' accuracies when they ran on survivors (the last one's mask is then the AND)."""
    if not is_autoattack(attacks) or any(r.status != "ok" or r.robust_acc is None for r in attacks):
        return None
    masks = [mask_of(r.key) for r in attacks] if mask_of is not None else []
    if masks and all(m is not None for m in masks) and len({tuple(m.shape) for m in masks}) == 1:
        both = masks[0].clone()
        for m in masks[1:]:
            both &= m
        return float(both.float().mean())
    if all(r.scope == "survivors" for r in attacks):
        return min(float(r.robust_acc) for r in attacks)
    return None


# -- entries ------------------------------------------------------------------------------------------
def _key(values: Iterable[Any]) -> tuple:
    d, m, f, n, norm, eps = values
    return str(d), str(m), str(f), int(n), str(norm), float(eps)


def entries(rows: Sequence[CellResult], mask_of: MaskOf | None = None) -> list[dict[str, Any]]:
    """One JSON entry per row of the evasion leaderboards (see the module docstring), in the
    tables' order (by dataset and threat, then by worst case)."""
    groups: dict[tuple, list[CellResult]] = {}
    for r in rows:
        if r.kind == "evasion":
            groups.setdefault(_key(getattr(r, k) for k in _ID), []).append(r)
    out = []
    for table in wide_tables(rows).values():
        cols = list(table.columns)
        attack_cols = cols[cols.index("clean_acc") + 1 : cols.index(WORST_CASE)]
        extra_cols = cols[cols.index("worst_class") + 1 : cols.index("seconds")]
        for rec in table.to_dict("records"):
            key = _key(rec[k] for k in _ID)
            out.append(_entry(rec, key, groups.get(key, []), attack_cols, extra_cols, mask_of))
    return out


def _entry(rec: dict, key: tuple, group: list[CellResult], attack_cols: list[str], extra_cols: list[str],
           mask_of: MaskOf | None) -> dict[str, Any]:
    dataset, model, defense, n, norm, eps = key
    attacks = [r for r in group if r.attack != WORST_CASE]
    wc = next((r for r in group if r.attack == WORST_CASE), None)
    flags = [f for f in str(rec.get("flags") or "").split(";") if f]
    ran = {a: _number(rec[a]) for a in attack_cols if any(r.attack == a for r in attacks)}
    aa = autoattack_acc(attacks, mask_of)
    worst = _number(rec[WORST_CASE])
    columns = {c: _cell(rec[c]) for c in extra_cols}
    name = f"{model} trained with {defense}"
    entry: dict[str, Any] = {
        # RobustBench's model_info fields (its types: percentages and eps as strings)
        "link": None, "name": name, "authors": None, "additional_data": None, "number_forward_passes": None,
        "dataset": dataset, "venue": None, "architecture": model, "eps": eps_text(eps),
        "clean_acc": percent(rec["clean_acc"]), "reported": None, "autoattack_acc": percent(aa),
        "footnote": _footnote(n, list(ran), worst, flags, aa is not None, wc),
        "unreliable": bool(flags),
        # this package's columns (fractions in [0, 1], as in the CSVs)
        "threat_model": _NORM_LABEL.get(norm, norm), "norm": norm, "eps_value": eps, "model": model, "defense": defense,
        "n": n, "clean_accuracy": _number(rec["clean_acc"]), "worst_case": worst,
        "worst_class": _number(rec.get("worst_class")), "certified": _number(columns.get("certified")),
        "undecided": _number(columns.get("undecided")),
        "exact": columns.get("exact") if isinstance(columns.get("exact"), bool) else None,
        "autoattack_accuracy": aa, "attacks": ran, "columns": columns, "flags": flags,
        "flag_notes": {f: flag_note(f) for f in flags}, "seconds": _number(rec.get("seconds")),
        "train_seconds": _number(rec.get("train_seconds")), "model_key": wc.model_key if wc is not None else "",
        "code_version": wc.code_version if wc is not None else "",
        "claim_card": f"{CLAIMS}/{claim_file_name(key)}",
    }
    return entry


def _footnote(n: int, attacks: list[str], worst: float | None, flags: list[str], aa: bool, wc: CellResult | None) -> str:
    """RobustBench shows footnotes as HTML: every name in it is escaped."""
    parts = [f"Evaluated by robustbench-lite{' ' + html.escape(wc.code_version) if wc is not None and wc.code_version else ''}"
             f" on the first {n} test points."]
    if worst is not None:
        parts.append(f"Worst case over {html.escape(', '.join(attacks)) or 'no attack'}"
                     f"{' and the escalation ladder' if wc is not None and 'escalation' in (wc.metrics or '') else ''}:"
                     f" {100 * worst:.2f}% robust accuracy.")
    if not aa:
        parts.append("No AutoAttack-identical attack set ran, so autoattack_acc is empty.")
    if flags:
        parts.append(f"Flags: {html.escape(', '.join(flags))}.")
    return " ".join(parts)


def claim_file_name(key: tuple) -> str:
    """The claim card's file name for a row (sanitized; a hash of the row's identity keeps rows
    whose names sanitize alike apart)."""
    dataset, model, defense, n, norm, eps = key
    stem = "__".join(safe_name(p, 40) for p in (dataset, f"{norm}_{eps:g}", model, defense, f"n{n}"))
    return f"{stem}__{config_hash([dataset, model, defense, n, norm, eps], 8)}.md"


def document(rows: Sequence[CellResult], mask_of: MaskOf | None = None) -> dict[str, Any]:
    """The ``leaderboard.json`` document (it validates against :data:`SCHEMA_PATH`)."""
    es = entries(rows, mask_of)
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "autoattack_set": AUTOATTACK_SET if AUTOATTACK_SET in attack_sets.SETS else None, "entries": es}


# -- claim cards ----------------------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#|~])")


def md(text: Any) -> str:
    """``text`` safe inside a line of Markdown (and the HTML a Markdown renderer lets through): one
    line, ``&``, ``<`` and ``>`` HTML-escaped, the characters that start emphasis, links, code,
    headings or table cells backslash-escaped."""
    one_line = " ".join(str(text).split())
    return _MD_SPECIAL.sub(r"\\\1", html.escape(one_line, quote=False))


def code(text: Any) -> str:
    """``text`` as a Markdown code span (literal: one line, no backtick inside)."""
    return "`" + " ".join(str(text).replace("`", "'").split()) + "`"


def _acc(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def claim_card(entry: dict[str, Any]) -> str:
    """A Markdown page for one entry: what is claimed, how it was measured, what to distrust, and
    how to check it."""
    threat = f"{entry['threat_model']}, eps = {entry['eps']} (pixels in [0, 1])"
    wc, cert = entry["worst_case"], entry["certified"]
    lines = [
        f"# Robustness claim: {md(entry['model'])} trained with {md(entry['defense'])}",
        "",
        f"On the first {entry['n']} test points of {md(entry['dataset'])} under {md(threat)}:",
        "",
        "| measure | value | what it means |",
        "| --- | --- | --- |",
        f"| clean accuracy | {_acc(entry['clean_accuracy'])} | correctly classified without attack |",
        f"| robust accuracy (worst case) | {_acc(wc)} | an upper bound: no attack run broke these points |",
    ]
    if cert is not None:
        lines.append(f"| certified accuracy | {_acc(cert)} | a lower bound: proven robust by a verifier |")
        if entry["undecided"] is not None:
            lines.append(f"| undecided | {_acc(entry['undecided'])} | between the bounds"
                         f"{': the row is exact' if entry['exact'] else ''} |")
    lines.append(f"| AutoAttack accuracy | {_acc(entry['autoattack_accuracy'])} | "
                 f"{'the autoattack set alone' if entry['autoattack_accuracy'] is not None else 'not run: the attacks differ from the autoattack set'} |")
    if entry["worst_class"] is not None:
        lines.append(f"| worst class | {_acc(entry['worst_class'])} | the lowest per-class robust accuracy |")
    lines += ["", "## Attacks", "", "| attack | robust accuracy |", "| --- | --- |"]
    lines += [f"| {md(a)} | {_acc(v)} |" for a, v in entry["attacks"].items()]
    lines += ["", "## Flags", ""]
    if entry["flags"]:
        lines += [f"- {code(f)}: {md(note)}" for f, note in entry["flag_notes"].items()]
        lines += ["", "A flag marks an evaluation that may overstate robustness; read it before using the number."]
    else:
        lines.append("No check fired.")
    lines += [
        "", "## Identity", "",
        f"- model cache key: {code(entry['model_key'])}",
        f"- code version: {code(entry['code_version'])}",
        f"- evaluation time: {entry['seconds']:.1f} s of attacks" if entry["seconds"] is not None else "- evaluation time: n/a",
        "", "## Check it", "",
        "Examples saved with `--save-adv DIR` are re-judged without rerunning the attacks:",
        "", "```", "robustbench-lite replay DIR --model ARCH --weights WEIGHTS --data DATA", "```", "",
        "Every saved example must lie in the threat ball ∩ [0, 1] around its test point and be misclassified "
        "by this model; on another model the share misclassified is the transfer rate.", "",
    ]
    return "\n".join(lines)


# -- files ------------------------------------------------------------------------------------------------
def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(rows: Sequence[CellResult], out_dir: str | Path, mask_of: MaskOf | None = None
               ) -> tuple[dict[str, Any], list[Path]]:
    """Write ``leaderboard.json`` and ``claims/<row>.md`` under ``out_dir`` (each atomically);
    return the document and the paths."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(20, "a file is in the way of the leaderboard folder; pick another --out", str(out_dir))
    (out_dir / CLAIMS).mkdir(parents=True, exist_ok=True)
    doc = document(rows, mask_of)
    paths = [out_dir / "leaderboard.json"]
    _atomic_text(paths[0], json.dumps(doc, indent=2) + "\n")
    for e in doc["entries"]:
        p = out_dir / e["claim_card"]
        _atomic_text(p, claim_card(e))
        paths.append(p)
    return doc, paths
