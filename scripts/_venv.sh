# Sourced by the scripts beside it: creates the virtual environment on first use and installs the package
# into it. By default that is ./.venv made with `python3`; scripts/test_versions.sh sets, per combination,
# TF_SEQLOSS_VENV (the folder), PYTHON (the interpreter that creates it) and TF_SEQLOSS_CONSTRAINTS (a pip
# constraint file pinning TensorFlow, tf_keras and Keras). The scripts run "$venv/bin/python".
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
venv="${TF_SEQLOSS_VENV:-.venv}"
constraints="${TF_SEQLOSS_CONSTRAINTS:-}"
# They are for this script alone: the suite (its tests run these scripts in fake checkouts) must not see them.
export -n PYTHON TF_SEQLOSS_VENV TF_SEQLOSS_CONSTRAINTS
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# A change of pyproject.toml or the constraints installs again.
stamp="$venv/.installed-$(cat pyproject.toml ${constraints:+"$constraints"} | sha1sum | cut -c1-12)"
# The default environment (the README's commands, CI) has every extra, so that the docs build and the keras-hub
# tests run; a pinned combination (scripts/test_versions.sh) the test and example ones (keras-hub's releases
# for TensorFlow 2.21 need Python 3.11, and the docs extra is empty before 3.11).
extras="test,example"
[ -n "$constraints" ] || extras="$extras,docs,keras-hub"
if [ ! -e "$stamp" ]; then
    echo "Installing tf_seqloss and its test and example dependencies into ./$venv (once; a few minutes)..."
    # pip's own output (index warnings, setuptools' editable-install notice) goes to a log, shown on failure.
    log="$venv/install.log"
    if ! { "$venv/bin/python" -m pip install --upgrade pip \
            && "$venv/bin/python" -m pip install ${constraints:+-c "$constraints"} -e ".[$extras]"; } \
            > "$log" 2>&1; then
        cat "$log" >&2
        echo "Installing into ./$venv failed; the output above is also in $log." >&2
        exit 1
    fi
    echo "Installed (pip's output: $log)."
    touch "$stamp"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
