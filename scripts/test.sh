#!/usr/bin/env bash
# Installs the package and its test dependencies into ./.venv, then runs the suite twice:
# under Keras 3 (TensorFlow's default) and under tf_keras (TF_USE_LEGACY_KERAS=1).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
echo "== Keras 3 =="
.venv/bin/python -m pytest -q "$@"
echo "== tf_keras (TF_USE_LEGACY_KERAS=1) =="
TF_USE_LEGACY_KERAS=1 .venv/bin/python -m pytest -q "$@"
