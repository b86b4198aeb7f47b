#!/usr/bin/env python
"""The main job: the `quick` preset (same as `robustbench-lite run --preset quick`).

Extra flags are passed through, e.g. `--device cuda` or `--n 500`.
"""

from __future__ import annotations

import sys

from robustbench_lite.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--preset" not in args:
        args = ["--preset", "quick", *args]
    raise SystemExit(main(["run", *args]))
