"""Sphinx configuration of the robustbench_lite documentation site.

Pages are Markdown (MyST); the API reference is autodoc over the installed package.  Build it as
CI does, warnings as errors and every cross-reference checked::

    python -m sphinx -W -n --keep-going -b html docs docs/_build/html

Nothing is fetched at build time (no intersphinx): references to third-party types (torch, numpy,
pandas) are listed in ``nitpick_ignore_regex`` below; every other reference must resolve.
"""

from __future__ import annotations

import sys
from pathlib import Path

import robustbench_lite

sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

project = "robustbench_lite"
author = "the robustbench_lite authors"
copyright = "the robustbench_lite authors, MIT license"
version = release = robustbench_lite.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "rbl_docs",  # docs/_ext/rbl_docs.py: the command-line help and the registries' tables, generated
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# -- MyST -----------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # [text](page.md#a-heading) links to headings up to ###

# -- references -----------------------------------------------------------------------------------
nitpicky = True
# Types from outside the package (the standard library, torch, numpy, pandas) in signatures: there
# is no inventory for them offline.  Everything of robustbench_lite must resolve.
_OUTSIDE = r"(collections\.abc|typing|pathlib|enum|contextlib|torch|nn|numpy|np|pandas|pd|argparse)\..*"
nitpick_ignore_regex = [
    (r"py:.*", _OUTSIDE),
    (r"py:class", r"Tensor|Generator|Module"),  # torch's, as some annotations spell them
    (r"py:class", r"robustbench_lite\..*\.[TF]"),  # type variables of generic helpers
]

# -- autodoc --------------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_default_options = {"show-inheritance": True}
add_module_names = False

# -- HTML -----------------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"robustbench_lite {release}"
html_theme_options = {
    "description": "How robust is this model, trained this way, against these attacks?",
    "fixed_sidebar": True,
    "page_width": "1280px",
    "sidebar_width": "240px",
}
html_sidebars = {"**": ["about.html", "navigation.html", "relations.html", "searchbox.html"]}
