#!/usr/bin/env python
"""The main job: the `quick` preset (same as `robustbench-lite run --preset quick`), then the
HTML report of the store (`report/report.html`, self-contained), whose path it prints.

Extra flags are passed through to `run`, e.g. `--device cuda` or `--n 500`; `--report DIR`
says where the report goes (default `report`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from robustbench_lite.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--preset" not in args and "--config" not in args:
        args = ["--preset", "quick", *args]
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--workdir", default=".rbl")
    where.add_argument("--report", default="report")
    known, rest = where.parse_known_args(args)
    code = main(["run", "--workdir", known.workdir, *rest])
    if code in (0, 1):  # 1: some cells raised; the report shows them
        from robustbench_lite.harness.store import Store
        from robustbench_lite.report.html import write_report

        with Store(Path(known.workdir) / "store.sqlite") as store:
            rows = store.rows()
        if rows:
            html_path, _ = write_report(rows, known.report)
            print(f"\nreport: {html_path.resolve()}")
    raise SystemExit(code)
