#!/usr/bin/env bash
# Set up a fresh machine: Debian's Fashion-MNIST package and a virtual environment in .venv
# with robustbench_lite, its test dependencies and what the documentation site needs.
# Safe to run again (it skips what is done).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q dataset-fashion-mnist
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -e ".[test,docs]"
# adv-lib, the reference of the minimum-norm attack tests and scripts/bench_min_norm.py: its wheel
# also requires torchvision and visdom (for logging), which its attacks do not use, so it is
# installed without them (the tests put a stub visdom module in its place)
.venv/bin/python -m pip install -q --no-deps "adv-lib>=0.2.8"
