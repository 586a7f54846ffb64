#!/usr/bin/env bash
# Installs the package and its test dependencies into ./.venv, then runs the suite twice, side by side
# (one per core): under Keras 3 (TensorFlow's default) and under tf_keras (TF_USE_LEGACY_KERAS=1).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
logs="$(mktemp -d)"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" > "$logs/keras3.log" 2>&1 &
keras3=$!
TF_USE_LEGACY_KERAS=1 .venv/bin/python -m pytest -q -p no:cacheprovider "$@" > "$logs/tf_keras.log" 2>&1 &
tf_keras=$!
status=0
wait "$keras3" || status=1
echo "== Keras 3 =="
cat "$logs/keras3.log"
wait "$tf_keras" || status=1
echo "== tf_keras (TF_USE_LEGACY_KERAS=1) =="
cat "$logs/tf_keras.log"
rm -rf "$logs"
exit "$status"
