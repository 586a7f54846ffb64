#!/usr/bin/env bash
# Runs the suite, as scripts/test.sh does (under Keras 3 and under tf_keras, side by side), on one pinned
# combination of Python, TensorFlow, tf_keras and Keras, in a virtual environment of its own
# (./.venv-<combination>, made on first use). The combinations are the files of constraints/:
#   py39-tf216 (alias oldest)   Python 3.9,  TensorFlow 2.16.2, tf_keras 2.16.0, Keras 3.10.0
#   py310-tf218                 Python 3.10, TensorFlow 2.18.1, tf_keras 2.18.0, Keras 3.12.4
#   py312-tf220                 Python 3.12, TensorFlow 2.20.0, tf_keras 2.20.1, Keras 3.15.1
#   py313-tf221 (alias newest)  Python 3.13, TensorFlow 2.21.0, tf_keras 2.21.0, Keras 3.15.1
# Usage: bash scripts/test_versions.sh COMBINATION [pytest arguments]
#        bash scripts/test_versions.sh COMBINATION --install-only   (makes the environment, runs nothing)
# The interpreter is pyenv's Python of the version its constraint file names (`# python: X.Y.Z`) if
# installed, else `pythonX.Y` on PATH.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

combinations=$(cd constraints && ls -- *.txt | sed 's/\.txt$//' | paste -sd, - | sed 's/,/, /g')
usage="Usage: bash scripts/test_versions.sh COMBINATION [--install-only | pytest arguments]; COMBINATION is oldest, newest or one of: $combinations"
if [ $# -lt 1 ]; then
    echo "$usage" >&2
    exit 2
fi
combination=$1
shift
case "$combination" in
    oldest) combination=py39-tf216 ;;
    newest) combination=py313-tf221 ;;
    -h|--help) echo "$usage"; exit 0 ;;
esac
constraints="constraints/$combination.txt"
if [[ "$combination" == */* || ! -f "$constraints" ]]; then
    echo "Invalid value for argument \`COMBINATION\`. Expected oldest, newest or one of: $combinations. Received: $combination" >&2
    exit 2
fi

version=$(sed -n 's/^# python: *\([0-9][0-9.]*\) *$/\1/p' "$constraints")
if [ -z "$version" ]; then
    echo "$constraints names no interpreter: it needs a line \`# python: X.Y.Z\`." >&2
    exit 2
fi
minor=${version%.*}
pyenv_python="${PYENV_ROOT:-$HOME/.pyenv}/versions/$version/bin/python"
if [ -x "$pyenv_python" ]; then
    python=$pyenv_python
elif command -v "python$minor" > /dev/null; then
    python=$(command -v "python$minor")
else
    echo "The combination $combination needs Python $minor: neither $pyenv_python nor python$minor on PATH was found (e.g. \`pyenv install $version\`)." >&2
    exit 1
fi

venv=".venv-$combination"
if [ -x "$venv/bin/python" ]; then
    # A folder left by another interpreter would test the wrong Python.
    made_with=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ "$made_with" != "$minor" ]; then
        echo "./$venv holds Python $made_with, not $minor: remove it (rm -rf $venv) and run again." >&2
        exit 1
    fi
fi

export TF_SEQLOSS_VENV="$venv" PYTHON="$python" TF_SEQLOSS_CONSTRAINTS="$constraints"
source scripts/_venv.sh  # installs on first use, so that the versions below are the ones that run
echo "[test_versions.sh] $combination in ./$venv: $("$venv/bin/python" -c '
import platform
from importlib.metadata import version
print(", ".join(["Python " + platform.python_version()]
                + [name + " " + version(name) for name in ("tensorflow", "keras", "tf_keras")]))')"
if [ "${1:-}" = "--install-only" ]; then
    exit 0
fi
# _venv.sh keeps its settings from the suite's environment: test.sh is given them again.
TF_SEQLOSS_VENV="$venv" PYTHON="$python" TF_SEQLOSS_CONSTRAINTS="$constraints" exec bash scripts/test.sh "$@"
