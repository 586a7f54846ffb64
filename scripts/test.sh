#!/usr/bin/env bash
# Installs the package and its test dependencies into ./.venv, then runs the suite twice, side by side
# (one per core): under Keras 3 (TensorFlow's default) and under tf_keras (TF_USE_LEGACY_KERAS=1).
# Progress streams as the suites go: pytest's progress lines prefixed by the flavour, and every
# $TF_SEQLOSS_PROGRESS_SECONDS seconds (default 30) a line counting the tests each suite has run.
# At the end come both full results, each closing with pytest's summary line; the exit status is
# non-zero if either suite failed. Arguments are passed on to pytest, after `-m "not slow"`: the tests marked
# `slow` (end-to-end runs of the example, SIGKILL runs, multi-worker; see tests/conftest.py) are left out
# unless a `-m` of the caller's replaces it, e.g. `bash scripts/test.sh -m slow` (only them, as CI runs them
# next) or `-m "slow or not slow"` (everything).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
every="${TF_SEQLOSS_PROGRESS_SECONDS:-30}"
logs="$(mktemp -d)"
names=(keras3 tf_keras)
# pytest prints its closing summary line only at verbosity -1 or more: the -q below (whose progress format
# `count` reads) and a caller's -q would drop it. So pytest runs with a plugin that raises the verbosity to
# -1 once the arguments are read; more verbose arguments (-v) are kept.
keep_summary='
import sys
import pytest


class KeepSummary:
    @pytest.hookimpl(tryfirst=True)
    def pytest_configure(self, config):
        config.option.verbose = max(config.option.verbose, -1)


sys.exit(pytest.main(sys.argv[1:], plugins=[KeepSummary()]))
'
pytest=("$venv/bin/python" -u -c "$keep_summary" -q -p no:cacheprovider -o console_output_style=count -m "not slow" "$@")

# `-u`: unbuffered, so that the logs follow the tests. The Keras 3 suite must not inherit a
# TF_USE_LEGACY_KERAS from the caller's environment.
# Tests of plain TensorFlow code run once, in one of the two suites (tests/conftest.py, TF_SEQLOSS_SHARD), half
# in each: measured with `--durations`, the Keras tests of the two flavours take about the same time now that
# Keras 3's session reset no longer collects garbage.
env -u TF_USE_LEGACY_KERAS TF_SEQLOSS_SHARD=0/2 "${pytest[@]}" > "$logs/keras3.log" 2>&1 &
pids=($!)
TF_USE_LEGACY_KERAS=1 TF_SEQLOSS_SHARD=1/2 "${pytest[@]}" > "$logs/tf_keras.log" 2>&1 &
pids+=($!)

count() {  # count NAME: "<tests run>/<collected> (<failed> failed)" from pytest's progress so far
    # Progress lines end in `[ 12/345]` once complete: `..F.s` (-q), `tests/test_x.py ..F.s` (-v) or a
    # test's id and `PASSED`/`FAILED`/... (-vv); the line being written has no count yet.
    awk '
        /\[ *[0-9]+\/[0-9]+\]$/ {
            n = $NF; gsub(/[^0-9\/]/, "", n); split(n, c, "/"); done = c[1]; total = c[2]
            for (i = 1; i < NF; i++) if ($i ~ /^[.FEsxXp]+$/) failed += gsub(/[FE]/, "", $i)
            failed += / (FAILED|ERROR) +\[/; partial = failed_partial = 0; next
        }
        /^([^ ]+\.py )?[.FEsxXp]+$/ { partial = length($NF); failed_partial = gsub(/[FE]/, "", $NF); next }
        / in [0-9.]+s( \([0-9:]+\))?( =+)?$/ && /passed|failed|error|skipped|no tests ran/ { finished = $0 }
        END {
            if (finished) { print "finished: " finished; exit }
            if (!total && !partial) { print "collecting"; exit }
            printf "%d/%s tests run (%d failed)\n", done + partial, total ? total : "?", failed + failed_partial
        }' "$logs/$1.log"
}

shown=(0 0)
stream() {  # prints the complete lines the logs gained since the last call, prefixed by the flavour
    local i lines
    for i in 0 1; do
        lines=$(wc -l < "$logs/${names[$i]}.log")
        if (( lines > shown[i] )); then
            sed -n "$((shown[i] + 1)),${lines}p" "$logs/${names[$i]}.log" | sed "s/^/[${names[$i]}] /"
            shown[i]=$lines
        fi
    done
}

running() { kill -0 "${pids[0]}" 2>/dev/null || kill -0 "${pids[1]}" 2>/dev/null; }

# Ctrl-C: background jobs of a script ignore SIGINT, so end the two suites here.
trap 'kill "${pids[@]}" 2>/dev/null; echo "[test.sh] interrupted; partial logs in $logs" >&2; exit 130' INT TERM

echo "[test.sh] running the suite under Keras 3 and under tf_keras side by side (logs in $logs)"
started=$SECONDS
last=$SECONDS
while running; do
    sleep 1
    stream
    if (( SECONDS - last >= every )); then
        last=$SECONDS
        echo "[test.sh] $((SECONDS - started)) s: keras3 $(count keras3); tf_keras $(count tf_keras)"
    fi
done
status=0
wait "${pids[0]}" || status=1
wait "${pids[1]}" || status=1
stream

echo "== Keras 3 =="
cat "$logs/keras3.log"
echo "== tf_keras (TF_USE_LEGACY_KERAS=1) =="
cat "$logs/tf_keras.log"
rm -rf "$logs"
exit "$status"
