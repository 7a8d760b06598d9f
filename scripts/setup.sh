#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install tasprune
# into it, editable, with the development tools. Versions come from constraints.txt,
# which pins torch to the CPU wheel (never a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.tasprune-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    # torch first and on its own, pinned, so no later resolution step picks another build
    .venv/bin/python -m pip install --quiet --disable-pip-version-check \
        -c constraints.txt "torch==$(sed -n 's/^torch==//p' constraints.txt)"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check \
        -c constraints.txt -e ".[dev]"
    touch "$stamp"
fi
