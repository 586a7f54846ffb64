#!/usr/bin/env bash
# Checks what a release would publish, as a user gets it: builds the sdist and the wheel with `python -m build`
# from a copy of the checkout's files (what git tracks or would track: no .venv, saved models or runs), runs
# `twine check --strict` on both, checks the sdist holds what building needs and nothing local, then installs
# the WHEEL file (not editable) into a fresh virtual environment and, from outside the checkout, imports the
# package, computes a sequence_loss against a hand-derived number, runs `tf-seqloss-upgrade --help` and checks
# the installed files (py.typed, no tests). TensorFlow, Keras and NumPy are pinned to the versions ./.venv has,
# so that pip takes them from its cache. Every check runs; the status is non-zero if any failed.
# Usage: bash scripts/check_release.sh   (needs the test extra in ./.venv: build and twine; made on first use)
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
check() {  # check DESCRIPTION COMMAND...: runs the command, prints its output only if it fails
    local description=$1 output started=$SECONDS
    shift
    if output=$("$@" 2>&1); then
        echo "[check_release.sh] ok: $description ($((SECONDS - started)) s)"
        passed=$((passed + 1))
    else
        echo "[check_release.sh] FAILED: $description" >&2
        printf '%s\n' "$output" | tail -n 40 >&2
        failed=$((failed + 1))
    fi
}
finish() {
    echo "check_release: $passed passed, $failed failed"
    exit $(( failed > 0 ))
}

# A copy of the files git keeps (tracked, and new ones not ignored): the build never sees local leftovers.
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard \
    | (cd "$work/src" && xargs -0 -I{} sh -c 'test -e "$0/{}" && mkdir -p "$(dirname "{}")" && cp -p "$0/{}" "{}" || true' "$root")
check "python -m build makes the sdist and the wheel" \
    "$venv/bin/python" -m build --outdir "$work/dist" "$work/src"
sdist=$(ls "$work"/dist/*.tar.gz 2>/dev/null | head -n 1 || true)
wheel=$(ls "$work"/dist/*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$sdist" ] || [ -z "$wheel" ]; then
    echo "[check_release.sh] FAILED: no sdist or wheel in $work/dist; nothing more to check" >&2
    failed=$((failed + 1))
    finish
fi
echo "[check_release.sh] built $(basename "$sdist") and $(basename "$wheel")"
check "twine check --strict" "$venv/bin/python" -m twine check --strict "$sdist" "$wheel"

sdist_has_what_building_needs() {
    local names
    names=$(tar -tzf "$sdist" | cut -d/ -f2-)
    for needed in LICENSE README.md CHANGELOG.md pyproject.toml tf_seqloss/__init__.py tf_seqloss/py.typed \
            tf_seqloss_upgrade/cli.py; do
        grep -qx -- "$needed" <<< "$names" || { echo "the sdist lacks $needed"; return 1; }
    done
    if grep -E '^(\.venv|\.venv-[^/]*|saved_models|runs|\.git|build|dist)(/|$)' <<< "$names"; then
        echo "the sdist holds the local files above"
        return 1
    fi
}
check "the sdist holds LICENSE, README.md, CHANGELOG.md and the packages, and no .venv, saved_models or runs" \
    sdist_has_what_building_needs

# The fresh environment: the interpreter ./.venv was made with; pins from ./.venv so that pip reuses its cache.
check "a fresh virtual environment" "$venv/bin/python" -m venv "$work/venv"
"$venv/bin/python" -m pip freeze 2>/dev/null | grep -iE '^(tensorflow|keras|tf[_-]keras|numpy)==' > "$work/pins.txt" || true
check "the wheel file installs into a fresh virtual environment (not editable)" \
    "$work/venv/bin/python" -m pip install -c "$work/pins.txt" "$wheel[upgrade]"

# From outside the checkout, so that the installed copy is the one imported.
smoke='
import math
import os
import sys

import numpy as np

import tf_seqloss

site = os.path.realpath(os.path.join(sys.prefix, "lib"))
assert os.path.realpath(tf_seqloss.__file__).startswith(site), tf_seqloss.__file__
# Two tokens, two classes. Token 1: logits (ln 3, 0), target 0, so p = 3/4 and its loss is ln(4/3).
# Token 2: logits (0, 0), target 1, so p = 1/2 and its loss is ln 2.
logits = np.array([[[math.log(3.0), 0.0], [0.0, 0.0]]], np.float32)
targets = np.array([[0, 1]], np.int32)
both = float(tf_seqloss.sequence_loss(logits, targets, np.array([[1.0, 1.0]], np.float32)))
first = float(tf_seqloss.sequence_loss(logits, targets, np.array([[1.0, 0.0]], np.float32)))
assert abs(both - (math.log(4 / 3) + math.log(2)) / 2) < 1e-6, both
assert abs(first - math.log(4 / 3)) < 1e-6, first
print("tf_seqloss", tf_seqloss.__version__, "from", tf_seqloss.__file__, ":", both, first)
'
check "the installed package imports and computes sequence_loss = (ln(4/3) + ln 2)/2 and ln(4/3)" \
    env -u PYTHONPATH -C "$work" "$work/venv/bin/python" -c "$smoke"
check "tf-seqloss-upgrade --help" \
    env -u PYTHONPATH -C "$work" "$work/venv/bin/tf-seqloss-upgrade" --help

installed_files_are_the_packages() {
    # The wheel's RECORD lists every installed file: the two packages, the metadata and the console script.
    local record
    record=$(ls "$work"/venv/lib/python*/site-packages/tf_seqloss-*.dist-info/RECORD) || return 1
    ls "$work"/venv/lib/python*/site-packages/tf_seqloss/py.typed > /dev/null || { echo "no py.typed"; return 1; }
    if cut -d, -f1 "$record" | grep -vE '^(tf_seqloss/|tf_seqloss_upgrade/|tf_seqloss-[^/]*\.dist-info/|\.\./\.\./\.\./bin/tf-seqloss-upgrade$)'; then
        echo "the wheel installs the files above besides its packages"
        return 1
    fi
    if cut -d, -f1 "$record" | grep -E '(^|/)tests?/'; then
        echo "the wheel installs tests"
        return 1
    fi
}
check "the installed files are tf_seqloss (with py.typed), tf_seqloss_upgrade and the command, no tests" \
    installed_files_are_the_packages
finish
