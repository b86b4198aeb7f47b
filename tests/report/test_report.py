"""The report renders from a store with two defenses and three attacks; the HTML names every
leaderboard row and embeds every plot."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from robustbench_lite import Defense, ModelSpec, ThreatModel
from robustbench_lite.core.registry import DEFENSES, register_defense
from robustbench_lite.harness.presets import Preset
from robustbench_lite.harness.run import run_plan
from robustbench_lite.harness.specs import AttackSpec, DataSpec, DefenseSpec
from robustbench_lite.harness.store import Store
from robustbench_lite.report.leaderboard import wide_tables

pytest.importorskip("matplotlib")

from robustbench_lite.report.html import make_plots, row_label, write_report  # noqa: E402

if "noise-aug-test" not in DEFENSES:

    @register_defense("noise-aug-test")
    @dataclass(frozen=True, kw_only=True)
    class NoiseAugTest(Defense):
        """Test-only defense: cross-entropy on inputs with uniform noise of +-0.1 (a weak defense)."""

        def batch_loss(self, model, x, y, state):
            noise = (torch.rand_like(x) * 2 - 1) * 0.1
            return F.cross_entropy(model((x + noise).clamp(0, 1)), y)


@pytest.fixture(scope="module")
def store_rows(tmp_path_factory):
    attacks = (AttackSpec("fgsm"), AttackSpec("pgd", {"steps": 5}), AttackSpec("square", {"queries": 50}))
    preset = Preset(
        name="report-test", description="two defenses, three attacks, two eps", data=(DataSpec("digits"),),
        models=(ModelSpec("small-cnn"),),
        defenses=(DefenseSpec("standard", {"epochs": 2, "batch_size": 64}),
                  DefenseSpec("noise-aug-test", {"epochs": 2, "batch_size": 64})),
        grid=((ThreatModel("linf", 0.05), attacks), (ThreatModel("linf", 0.1), attacks)), n=60,
    )
    workdir = tmp_path_factory.mktemp("report-store")
    summary = run_plan(preset.plan(), workdir=workdir, progress=False)
    assert summary.errors == 0
    with Store(workdir / "store.sqlite") as store:
        return store.rows()


def test_report_names_every_leaderboard_row_and_embeds_every_plot(store_rows, tmp_path):
    html_path, md_path = write_report(store_rows, tmp_path / "report")
    page = html_path.read_text(encoding="utf-8")
    md = md_path.read_text(encoding="utf-8")
    tables = wide_tables(store_rows)
    assert len(tables) == 2 and {len(t) for t in tables.values()} == {2}
    sections = re.split(r"<h3 id='", page)
    for name, table in tables.items():
        section = next(s for s in sections if s.startswith(f"{name}'"))
        for _, r in table.iterrows():
            label = row_label(r["model"], r["defense"])
            assert f"{label}</td>" in section, (name, label)
            assert label in md
        for col in ("fgsm", "pgd", "square", "worst_case"):
            assert f"<th>{col}</th>" in section
    plots = make_plots(store_rows)
    assert [p.name for p in plots] == ["robust_vs_eps", "attack_strength_time", "clean_vs_robust"]
    images = re.findall(r"<img id='plot-([a-z_]+)' alt='[^']*' src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert [name for name, _ in images] == [p.name for p in plots]
    assert all(len(data) > 1000 for _, data in images)
    for p in plots:  # the markdown links the same plots, written beside it
        assert f"](plots/{p.name}.png)" in md
        assert (tmp_path / "report" / "plots" / f"{p.name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "http://" not in page and "https://" not in page  # self-contained


def test_flags_are_marked_and_explained(store_rows, tmp_path):
    from dataclasses import replace

    flagged = [replace(r, flags="zero-grad") if r.attack == "pgd" else r for r in store_rows]
    html_path, md_path = write_report(flagged, tmp_path / "flagged")
    page = html_path.read_text(encoding="utf-8")
    assert "<tr class='flagged'>" in page and "⚠" in page
    assert "<dt>zero-grad</dt>" in page and "gradient attacks are blind" in page
    assert "`zero-grad`" in md_path.read_text(encoding="utf-8")


def test_empty_store_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="run"):
        write_report([], tmp_path)
