"""What the report writes from user-given names (escaped in HTML and Markdown), and the per-attack
time axis (readable tick labels on its log scale)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from robustbench_lite.core.models import ModelSpec
from robustbench_lite.core.threat import Norm, ThreatModel
from robustbench_lite.harness.kinds.evasion import worst_case_rows
from robustbench_lite.harness.plan import Cell
from robustbench_lite.harness.rows import cell_row
from robustbench_lite.harness.specs import AttackSpec, DataSpec, DefenseSpec

pytest.importorskip("matplotlib")

from robustbench_lite.report.html import md_text, seconds_axis, write_report  # noqa: E402

EVIL = "<img src=x onerror=alert(1)>"


def _rows(model: str, defense: str, dataset: str = "digits"):
    cells = [Cell(DataSpec("digits"), ModelSpec("small-cnn"), DefenseSpec("standard"), AttackSpec(a),
                  ThreatModel(Norm.LINF, 0.1), 4) for a in ("fgsm", "pgd")]
    latest = {}
    for c, (robust, seconds) in zip(cells, (((1, 1, 0, 0), 0.31), ((1, 0, 0, 0), 0.3)), strict=True):
        mask = torch.tensor(robust, dtype=torch.bool)
        latest[c.key] = (cell_row(c, clean_acc=0.75, robust_acc=float(mask.float().mean()), model_key="k",
                                  seconds=seconds), mask)
    rows = [r for r, _ in latest.values()] + [r for r, _ in worst_case_rows(cells, latest, labels=torch.arange(4) % 2)]
    return [dataclasses.replace(r, model=model, defense=defense, dataset=dataset) for r in rows]


def test_names_are_escaped_in_the_html_and_the_markdown(tmp_path):
    rows = _rows(EVIL, "[click](http://evil.example) *x* `y` | z", dataset="<b>data</b>")
    html_path, md_path = write_report(rows, tmp_path)
    page, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")
    for text in (page, md):
        assert "<img src=x" not in text and "<b>" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;img src=x onerror=alert(1)&gt;" in md
    assert "[click](http" not in md and "\\[click\\](http://evil.example)" in md
    assert "\\*x\\*" in md and "\\`y\\`" in md and "\\| z" in md
    # every table line keeps its column count: the name's "|" does not open a cell
    table = [line for line in md.splitlines() if line.startswith("| ") and "click" in line and "0.750" in line]
    header = next(line for line in md.splitlines() if line.startswith("| model / defense"))
    assert table and all(line.replace("\\|", "").count("|") == header.count("|") for line in table)


def test_md_text_leaves_plain_names_readable():
    assert md_text("small-cnn(width=8) / pgd-at") == "small-cnn(width=8) / pgd-at"
    assert md_text("a\nb") == "a b" and md_text("a & b") == "a &amp; b"


@pytest.mark.parametrize("seconds", [
    [0.3, 0.31],  # within a decade: matplotlib labels minor ticks (2.98x10^-1, 3x10^-1, ...) and they collide
    [0.2, 0.5, 0.9],
    [0.011, 0.5, 30.0],
    [1e-4, 2e3],  # many decades: thinned
    [1e-6, 1e6],
    [5.0],
])
def test_the_time_axis_has_a_few_readable_labels_that_do_not_overlap(seconds):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 2.0))
    ax.barh(range(len(seconds)), seconds)
    seconds_axis(ax, seconds)
    fig.tight_layout()
    fig.canvas.draw()
    lo, hi = ax.get_window_extent().x0, ax.get_window_extent().x1
    shown = [t for t in ax.get_xticklabels(which="both") if t.get_visible() and t.get_text()
             and lo - 1 <= (t.get_window_extent().x0 + t.get_window_extent().x1) / 2 <= hi + 1]
    plt.close(fig)
    assert 2 <= len(shown) <= 6
    boxes = sorted((t.get_window_extent().x0, t.get_window_extent().x1) for t in shown)
    assert all(a[1] < b[0] for a, b in zip(boxes, boxes[1:], strict=False)), [t.get_text() for t in shown]
    values = [float(t.get_text()) for t in shown]  # plain numbers, decades only
    assert all(abs(torch.log10(torch.tensor(v)).item() - round(torch.log10(torch.tensor(v)).item())) < 1e-6 for v in values)
    assert min(values) <= min(seconds) and max(values) >= max(seconds)


def test_no_positive_seconds_leaves_the_axis_linear():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    seconds_axis(ax, [0.0, 0.0])
    assert ax.get_xscale() == "linear"
    plt.close(fig)
