"""``robustbench-lite report``: the state of the benchmark in one file.

:func:`write_report` turns store rows into

* ``report.html``: self-contained (CSS inline, plots embedded as base64 PNG): a summary, every
  leaderboard (flagged rows marked, never dropped; where a verifier ran, each row's bracket drawn
  as a bar from the certified share to the attacked worst case, and exact rows marked), the flags
  explained, and three plots: robust accuracy vs eps per defense, per-attack strength and time,
  clean vs robust accuracy;
* ``report.md``: the same tables and explanations, with the plots as PNG files beside it
  (``plots/*.png``).

matplotlib is imported here only (headless ``Agg`` backend), so the rest of the package does not
need it.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.names import safe_stem
from ..eval import flags as checks
from ..harness.identity import distinguish
from ..harness.kinds import rows_of_kind
from ..harness.rows import WORST_CASE, CellResult
from .curves import curve_plots, curve_tables
from .leaderboard import long_table, wide_tables
from .plots import Plot, plot_text, seconds_axis, to_png

__all__ = ["Plot", "make_plots", "row_label", "write_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0 1.2rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right} th{background:#f3f3f3;text-align:center}
td.row-name,td.flags{text-align:left} tr.flagged{background:#fff4d6} .warn{color:#b45309;font-weight:600}
.summary td{text-align:left} .muted{color:#666;font-size:.85rem} img{max-width:100%;border:1px solid #eee}
dt{font-family:monospace;font-weight:600;margin-top:.5rem} dd{margin-left:1.2rem}
.bracket{position:relative;display:inline-block;width:160px;height:10px;background:#eee;border:1px solid #bbb;vertical-align:middle}
.bracket span{position:absolute;top:0;bottom:0} .bracket .proven{left:0;background:#2a9d8f}
.bracket .undecided{background:#e9c46a;min-width:1px} .bracket .contradiction{background:#d62828;min-width:1px}
.exact{color:#1b7f4f;font-weight:600;font-size:.8rem}
"""


def row_label(model: str, defense: str) -> str:
    """How a leaderboard row is named in the report."""
    return f"{model} / {defense}"


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.3f}"
    return str(v)


# -- plots -----------------------------------------------------------------------------------------
def make_plots(rows: Sequence[CellResult]) -> list[Plot]:
    """The three report plots as PNG bytes (empty list when there are no successful cells)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = distinguish(rows)
    df = long_table([r for r in rows_of_kind(rows, "evasion") if r.status == "ok" and r.robust_acc is not None])
    if df.empty:
        return []
    plots = []
    wc = df[df["attack"] == WORST_CASE]
    atk = df[df["attack"] != WORST_CASE]

    # 1. robust accuracy vs eps, one line per model/defense, one panel per dataset and norm
    panels = list(wc.groupby(["dataset", "norm"], sort=True))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.2 * max(len(panels), 1), 3.8), squeeze=False)
    for ax, ((dataset, norm), part) in zip(axes[0], panels, strict=False):
        for (model, defense), g in part.groupby(["model", "defense"], sort=True):
            g = g.sort_values("eps")
            xs = [0.0, *g["eps"].tolist()]
            ys = [float(g["clean_acc"].iloc[0]), *g["robust_acc"].tolist()]
            ax.plot(xs, ys, marker="o", label=plot_text(row_label(model, defense)))
        ax.set_title(plot_text(f"{dataset}, {norm}"))
        ax.set_xlabel("eps (0 = clean)")
        ax.set_ylabel("worst-case robust accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Robust accuracy vs eps per defense")
    plots.append(Plot("robust_vs_eps", "Robust accuracy vs eps per defense", to_png(fig, plt)))

    # 2. per-attack strength (mean robust accuracy left) and time (mean seconds per cell)
    stats = atk.groupby("attack").agg(robust=("robust_acc", "mean"), seconds=("seconds", "mean"), cells=("key", "count"))
    stats = stats.sort_values("robust")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10.5, 0.45 * len(stats) + 1.8))
    a1.barh(stats.index, stats["robust"], color="#4c72b0")
    a1.set_xlabel("mean robust accuracy left (lower = stronger)")
    a1.set_xlim(0, 1)
    a1.invert_yaxis()
    a2.barh(stats.index, stats["seconds"], color="#dd8452")
    a2.set_xlabel("mean seconds per cell")
    seconds_axis(a2, stats["seconds"].tolist())
    a2.invert_yaxis()
    for ax in (a1, a2):
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("Per-attack strength and time (over all cells)")
    plots.append(Plot("attack_strength_time", "Per-attack strength and time", to_png(fig, plt)))

    # 3. clean vs robust accuracy: colour = model/defense, marker = threat
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    threats = list(dict.fromkeys(f"{n} {e:g}" for n, e in wc[["norm", "eps"]].itertuples(index=False)))
    markers = dict(zip(threats, "osD^vPX*<>ph" * 4, strict=False))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for k, ((model, defense), g) in enumerate(wc.groupby(["model", "defense"], sort=True)):
        color = colors[k % len(colors)]
        for r in g.itertuples():
            ax.scatter(r.clean_acc, r.robust_acc, color=color, marker=markers[f"{r.norm} {r.eps:g}"], s=45, alpha=0.85)
        handles.append(Line2D([], [], color=color, marker="o", ls="", label=plot_text(row_label(model, defense))))
    handles += [Line2D([], [], color="#555", marker=markers[t], ls="", label=t) for t in threats]
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel("worst-case robust accuracy")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("Clean vs robust accuracy (worst case per threat)")
    plots.append(Plot("clean_vs_robust", "Clean vs robust accuracy", to_png(fig, plt)))
    return plots


# -- the report --------------------------------------------------------------------------------------
def _flag_codes(tables: dict[str, pd.DataFrame]) -> list[str]:
    codes: set[str] = set()
    for t in tables.values():
        for f in t["flags"]:
            codes.update(c for c in str(f).split(";") if c)
    return sorted(codes)


def _summary(rows: Sequence[CellResult], tables: dict[str, pd.DataFrame]) -> list[tuple[str, str]]:
    attacks = sorted({r.attack for r in rows if r.attack != WORST_CASE})
    flagged = sum(int(bool(f)) for t in tables.values() for f in t["flags"])
    versions = sorted({r.code_version for r in rows})
    return [
        ("datasets", ", ".join(sorted({r.dataset for r in rows}))),
        ("defenses", ", ".join(sorted({row_label(r.model, r.defense) for r in rows}))),
        ("attacks", ", ".join(attacks)),
        ("cells stored", f"{sum(r.attack != WORST_CASE for r in rows)} ({sum(r.status != 'ok' for r in rows)} errors)"),
        ("leaderboard rows", f"{sum(len(t) for t in tables.values())} in {len(tables)} tables, {flagged} flagged"),
        ("code version", ", ".join(versions)),
    ]


def _table_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in ("dataset", "norm", "eps", "model", "defense")]


BRACKET_TITLE = "bracket (certified → attacked)"


def _bracket(r: pd.Series) -> tuple[float, float] | None:
    """A leaderboard row's (certified, worst case), when a verifier ran on its points."""
    cert, worst = r.get("certified"), r.get(WORST_CASE)
    if not isinstance(cert, (int, float)) or not isinstance(worst, (int, float)) or math.isnan(cert) or math.isnan(worst):
        return None
    return float(cert), float(worst)


def _exact(r: pd.Series) -> bool:
    flag = r.get("exact")
    return _bracket(r) is not None and isinstance(flag, (bool, np.bool_)) and bool(flag)


def _bracket_bar(r: pd.Series) -> str:
    """The row's bracket as a bar on [0, 1]: proven robust up to the certified share, undecided up to
    the attacked worst case (red where the certified share exceeds it: a soundness bug)."""
    found = _bracket(r)
    if found is None:
        return "<td></td>"
    cert, worst = found
    lo, hi = sorted((cert, worst))
    band = "undecided" if cert <= worst else "contradiction"
    title = f"certified {cert:.3f} ≤ robust accuracy ≤ {worst:.3f} (attacked)" + (": exact" if _exact(r) else "")
    mark = " <span class='exact'>exact</span>" if _exact(r) else ""
    return (f"<td class='row-name'><span class='bracket' title='{html.escape(title)}'>"
            f"<span class='proven' style='width:{100 * lo:.2f}%'></span>"
            f"<span class='{band}' style='left:{100 * lo:.2f}%;width:{100 * (hi - lo):.2f}%'></span></span>{mark}</td>")


def _html(rows: Sequence[CellResult], tables: dict[str, pd.DataFrame], plots: list[Plot]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
           "<title>robustbench_lite report</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>robustbench_lite report</h1>",
           "<p class='muted'>Robust accuracy = share of the n test points classified correctly under every attack "
           "of the threat (worst case per point). Rows marked ⚠ carry flags: read them before trusting the number. "
           "Where a verifier ran, the row is a bracket: certified (proven robust) ≤ robust accuracy ≤ worst case "
           "(attacked); the bar is green up to the certified share and yellow over the undecided points, and a row "
           "with nothing undecided is marked exact.</p>",
           "<h2>Summary</h2><table class='summary'>"]
    out += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _summary(rows, tables)]
    out.append("</table><h2>Leaderboards</h2>")
    for name, table in tables.items():
        cols = _table_columns(table)
        first = table.iloc[0]
        out.append(f"<h3 id='{e(name)}'>{e(str(first['dataset']))} — {e(str(first['norm']))} eps {first['eps']:g}</h3>")
        bars = "certified" in table.columns
        out.append("<table><tr><th>model / defense</th>" + (f"<th>{e(BRACKET_TITLE)}</th>" if bars else "")
                   + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
        for _, r in table.iterrows():
            flagged = bool(r["flags"])
            label = row_label(str(r["model"]), str(r["defense"]))
            if bars:
                cells = [_bracket_bar(r)]
            else:
                cells = []
            for c in cols:
                if c == "flags":
                    codes = [x for x in str(r["flags"]).split(";") if x]
                    cells.append("<td class='flags'>" + ", ".join(
                        f"<span title='{e(checks.explain(x))}'>{e(x)}</span>" for x in codes) + "</td>")
                else:
                    cells.append(f"<td>{e(_fmt(r[c]))}</td>")
            mark = "<span class='warn'>⚠ </span>" if flagged else ""
            classes = " ".join(c for c, on in (("flagged", flagged), ("exact-row", _exact(r))) if on)
            out.append(f"<tr class='{classes}'><td class='row-name'>{mark}{e(label)}</td>" + "".join(cells) + "</tr>")
        out.append("</table>")
    out += _curves_html(rows)
    out.append("<h2>Flags explained</h2>")
    present = _flag_codes(tables)
    if present:
        out.append("<p>Flags raised in this store:</p><dl>")
        out += [f"<dt>{e(c)}</dt><dd>{e(checks.explain(c))}</dd>" for c in present]
        out.append("</dl>")
    else:
        out.append("<p>No flag was raised in this store.</p>")
    out.append("<details><summary>All flag codes</summary><dl>")
    out += [f"<dt>{e(c)}</dt><dd>{e(t)}</dd>" for c, t in sorted(checks.FLAGS.items())]
    out.append("</dl></details><h2>Plots</h2>")
    for p in plots:
        data = base64.b64encode(p.png).decode("ascii")
        out.append(f"<h3>{e(p.title)}</h3><img id='plot-{e(p.name)}' alt='{e(p.title)}' src='data:image/png;base64,{data}'>")
    out.append("</body></html>")
    return "\n".join(out)


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|!#~])")


def md_text(text: object) -> str:
    """``text`` as literal Markdown: HTML markup escaped (a name like ``<img onerror=...>`` shows
    as text, never as a tag), Markdown punctuation backslash-escaped (no links, images, emphasis,
    code or table cells from a name) and line breaks as spaces."""
    flat = " ".join(str(text).splitlines())
    return _MD_SPECIAL.sub(r"\\\1", html.escape(flat, quote=False))


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(md_text(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_text(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _markdown(rows: Sequence[CellResult], tables: dict[str, pd.DataFrame], plots: list[Plot]) -> str:
    out = ["# robustbench_lite report", "",
           "Robust accuracy = share of the n test points classified correctly under every attack of the threat "
           "(worst case per point). Rows marked ⚠ carry flags.", "", "## Summary", "",
           _md_table(["", ""], [[k, v] for k, v in _summary(rows, tables)]), "", "## Leaderboards", ""]
    for table in tables.values():
        cols = _table_columns(table)
        first = table.iloc[0]
        out += [f"### {md_text(first['dataset'])} — {md_text(first['norm'])} eps {first['eps']:g}", ""]
        bars = "certified" in table.columns
        body = []
        for _, r in table.iterrows():
            mark = "⚠ " if r["flags"] else ""
            found = _bracket(r) if bars else None
            bracket = [] if not bars else [""] if found is None else [
                f"[{found[0]:.3f}, {found[1]:.3f}]" + (" exact" if _exact(r) else "")]
            body.append([mark + row_label(str(r["model"]), str(r["defense"])), *bracket] + [_fmt(r[c]) for c in cols])
        out += [_md_table(["model / defense", *(["bracket [certified, attacked]"] if bars else []), *cols], body), ""]
    out += _curves_md(rows)
    out += ["## Flags explained", ""]
    present = _flag_codes(tables)
    out += [f"- `{c.replace('`', '')}`: {md_text(checks.explain(c))}" for c in present] or ["No flag was raised in this store."]
    out += ["", "## Plots", ""]
    out += [f"### {md_text(p.title)}\n\n![{md_text(p.title)}](plots/{safe_stem(p.name)}.png)\n" for p in plots]
    return "\n".join(out)


def _curves_html(rows: Sequence[CellResult]) -> list[str]:
    """The robustness-curve tables (the curve kind's rows), if any."""

    tables = curve_tables(rows)
    if not tables:
        return []
    e = html.escape
    out = ["<h2>Robustness curves</h2><p class='muted'>Robust accuracy at each eps of the grid (eps 0 = clean), "
           "per attack; optimality (AttackBench) compares each attack's curve with the per-point best of all "
           "attacks run: 1 = the best everywhere. area = area under the curve / eps max. A <code>certified (...)</code> "
           "row (dashed in the plot) is the share of points whose certified radius over the named verifiers is at "
           "least eps: a proven lower bound; the band up to the attacked worst case is still unknown.</p>"]
    for title, t in tables:
        out.append(f"<h3>{e(title)}</h3><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in t.columns) + "</tr>")
        for _, r in t.iterrows():
            out.append("<tr>" + "".join(f"<td{' class=row-name' if c == 'attack' else ''}>{e(_fmt(r[c]))}</td>"
                                        for c in t.columns) + "</tr>")
        out.append("</table>")
    return out


def _curves_md(rows: Sequence[CellResult]) -> list[str]:

    out = []
    for title, t in curve_tables(rows):
        out += [f"### Robustness curve: {md_text(title)}", "",
                _md_table(list(t.columns), [[_fmt(r[c]) for c in t.columns] for _, r in t.iterrows()]), ""]
    return (["## Robustness curves", "", *out] if out else [])


def write_report(rows: Sequence[CellResult], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ ``plots/*.png``) under
    ``out_dir``; return their paths."""
    rows = distinguish(rows)  # a row is one model: shared display names get distinguishing labels
    if not rows:
        raise ValueError("the store has no results yet; run `robustbench-lite run` first")
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    tables = wide_tables(rows)

    plots = make_plots(rows) + curve_plots(rows)
    for p in plots:
        (out_dir / "plots" / f"{safe_stem(p.name)}.png").write_bytes(p.png)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    html_path.write_text(_html(rows, tables, plots), encoding="utf-8")
    md_path.write_text(_markdown(rows, tables, plots), encoding="utf-8")
    return html_path, md_path
