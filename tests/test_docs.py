"""The documentation site holds together without building it (CI builds it with ``-W -n``): every
page is in a toctree, every public name is in the API reference, every flag code is explained,
README stays short and its links resolve, and the plugin examples of the guides run as written."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

import robustbench_lite
from robustbench_lite.core.registry import _REGISTRIES
from robustbench_lite.eval.flags import FLAGS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDES = (
    "evaluate-your-model", "robustness-curves", "certify", "write-an-attack", "write-a-defense", "write-a-kind",
    "scale-out-with-ray", "reading-the-flags",
)


def _page(name: str) -> str:
    return (DOCS / f"{name}.md").read_text(encoding="utf-8")


def _block(page: str, lang: str, containing: str = "") -> str:
    """The first ``lang`` code block of ``page`` that contains ``containing``."""
    return next(b for b in re.findall(rf"```{lang}\n(.*?)```", _page(page), re.S) if containing in b)


def _toctree_entries(path: Path) -> list[Path]:
    entries = []
    for body in re.findall(r"```\{toctree\}\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
        for line in body.splitlines():
            line = line.strip()
            if line and not line.startswith(":"):
                entries.append((path.parent / line).with_suffix(".md").resolve())
    return entries


@pytest.fixture
def registries():
    """Forget what a test's plugins register, so other tests see the built-in registries."""
    for reg in _REGISTRIES:
        reg._ensure_loaded()
    before = {id(reg): dict(reg._items) for reg in _REGISTRIES}
    yield
    for reg in _REGISTRIES:
        reg._items = before[id(reg)]


def test_every_page_is_reachable_from_the_index_and_every_guide_exists():
    pages = {p.resolve() for p in DOCS.rglob("*.md") if "_build" not in p.parts}
    reached, todo = set(), [DOCS / "index.md"]
    while todo:
        page = todo.pop().resolve()
        if page in reached:
            continue
        reached.add(page)
        for entry in _toctree_entries(page):
            assert entry.is_file(), f"{page.name}: toctree entry {entry} does not exist"
            todo.append(entry)
    assert pages - reached == set(), "pages in no toctree (add them to docs/index.md)"
    for guide in GUIDES:
        assert (DOCS / "guides" / f"{guide}.md").resolve() in reached, f"guide {guide} missing from the toctree"
    assert "../BENCHMARKS.md" in _page("benchmarks")


def test_every_public_name_is_documented_in_the_api_reference():
    api = _page("reference/api")
    targets = set(re.findall(r"^\.\. auto\w+:: (\S+)", api, re.M))
    targets |= {f"robustbench_lite.{n}" for n in re.findall(r"^\.\. py:\w+:: (\w+)$", api, re.M)}
    for name in robustbench_lite.__all__:
        obj = getattr(robustbench_lite, name)
        names = {f"robustbench_lite.{name}", getattr(obj, "__name__", "") if isinstance(obj, type(re)) else ""}
        assert names & targets, f"robustbench_lite.{name} is not in docs/reference/api.md"


def test_every_flag_code_is_explained_in_the_flags_guide():
    guide = _page("guides/reading-the-flags")
    missing = [code for code in FLAGS if f"| `{code}" not in guide]
    assert missing == [], f"flags without a row in docs/guides/reading-the-flags.md: {missing}"


def test_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert links, "README links to the documentation"
    for link in links:
        if "://" not in link:
            assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def test_the_attack_guide_example_runs_and_more_tries_break_more(registries, tmp_path, digits, digits_model):
    plugin = tmp_path / "rr_fgsm.py"
    plugin.write_text(_block("guides/write-an-attack", "python"))
    robustbench_lite.load_plugin_file(plugin)
    assert "rr-fgsm" in robustbench_lite.list_attacks()
    x, y = digits.test.x[:200], digits.test.y[:200]
    fooled = []
    for tries in (1, 3):
        out = robustbench_lite.create_attack("rr-fgsm", eps=0.1, tries=tries).run(digits_model, x, y)
        assert out.grad_evals == tries * len(x)  # the base counted every gradient
        with torch.no_grad():
            fooled.append(digits_model(out.x_adv).argmax(1) != y)
    assert bool((fooled[1] | ~fooled[0]).all())  # the same first start: 3 tries break a superset
    assert int(fooled[1].sum()) > 0


def test_the_defense_guide_example_trains_a_model(registries, tmp_path, digits):
    plugin = tmp_path / "fgsm_at.py"
    plugin.write_text(_block("guides/write-a-defense", "python"))
    robustbench_lite.load_plugin_file(plugin)
    defense = robustbench_lite.create_defense("fgsm-at", eps=0.1, epochs=2, batch_size=32, lr=1e-2)
    torch.manual_seed(0)
    model = robustbench_lite.create_model("small-cnn", digits.input_shape, digits.num_classes)
    data = dataclasses.replace(digits, train=digits.train.head(256), val=None)
    log = defense.fit(model, data, progress=False)
    assert log.epochs[-1].train_loss < log.epochs[0].train_loss
    assert robustbench_lite.accuracy(model, digits.test, "cpu") > 0.3  # ten classes: chance is 0.1
    with pytest.raises(ValueError):
        robustbench_lite.create_defense("fgsm-at", alpha=1.5)  # the setting's bounds are checked


def test_the_verifier_guide_example_matches_the_built_in_ibp(registries, tmp_path, digits, digits_model):
    plugin = tmp_path / "my_ibp.py"
    plugin.write_text(_block("guides/certify", "python", "@register_verifier"))
    robustbench_lite.load_plugin_file(plugin)
    threat = robustbench_lite.ThreatModel("linf", 0.02)
    x, y = digits.test.x[:100], digits.test.y[:100]
    mine = robustbench_lite.create_verifier("my-ibp").margin_bounds(digits_model, x, y, threat)
    ibp = robustbench_lite.create_verifier("ibp").margin_bounds(digits_model, x, y, threat)
    assert torch.equal(mine, ibp)


GRID = """
n = 50
[[datasets]]
name = "digits"
train_limit = 300
[[models]]
name = "small-cnn"
[[defenses]]
name = "standard"
epochs = 1
[[threats]]
threat = "linf:0.1"
attacks = ["one-step"]
"""


def test_the_kind_guide_example_runs_end_to_end(registries, tmp_path):
    from robustbench_lite.cli import main

    plugin = tmp_path / "moved.py"
    plugin.write_text(_block("guides/write-a-kind", "python"))
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    out = tmp_path / "lb"
    args = ["--plugin", str(plugin), "run", "--config", str(grid), "--workdir", str(tmp_path / "w"), "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    table = pd.read_csv(out / "digits_moved.csv")
    assert list(table.columns) == ["dataset", "model", "defense", "attack", "norm", "eps", "n", "moved_share",
                                   "seconds", "status", "error"]
    assert 0 < float(table["moved_share"].iloc[0]) <= 1
