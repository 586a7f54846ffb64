"""Applies `TF_CPP_MIN_LOG_LEVEL` to the start-up lines that TensorFlow prints despite it.

TensorFlow's shared libraries log before the level is applied, and those lines reach stderr whatever the
level. TensorFlow 2.21 logs through absl: `WARNING: All log messages before absl::InitializeLog() ...`,
then `I0000 ... port.cc] oneDNN custom operations are on`, `I0000 ... cudart_stub.cc] Could not find cuda
drivers` (each twice), and on a CPU-only machine `E0000 ... cuda_platform.cc] failed call to cuInit` and
`E0000 ... util.cc] oneDNN supports DT_INT64 only on platforms with AVX-512`. TensorFlow 2.16-2.20 log the
same kind of lines with a date (`2026-12-01 23:47:27.840144: E external/.../cuda_fft.cc:479] Unable to
register cuFFT factory ...`), also the cuDNN and cuBLAS ones, and 2.18 mixes both formats. `install()`,
called before TensorFlow is imported, puts a filter process between the program's stderr (file descriptor
2, so C++ output too) and the terminal. It drops log lines of either format below the level (`I` from 1,
`W` from 2, `E` from 3) and, from level 2, a short list of start-up messages logged as errors that are not
errors (`HARMLESS_ERRORS`; the failed `cuInit` only when TensorFlow said there is no CUDA driver, or found
no driver library to call). Every other line passes unchanged: errors, fatal errors, Python warnings and
tracebacks. The filter is a separate process, so whatever the program writes before it dies still arrives;
it ignores Ctrl-C (its own session) and ends when the program's stderr closes.
`TF_CPP_MIN_LOG_LEVEL=0` shows everything.
"""

from __future__ import annotations

import atexit
import os
import re
import subprocess
import sys
from typing import BinaryIO, Iterable, Iterator

# absl's prefix: severity, MMDD, hh:mm:ss.micros (before absl is initialised, 00:00 and the seconds
# since 1970), thread id, file:line.
ABSL_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ")
# The prefix of TensorFlow 2.16-2.20's own logger: date, time, severity, file:line.
DATED_LINE = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ([IWEF]) [^ \]]+:\d+\] ")
PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
NO_CUDA_DRIVER = b"Could not find cuda drivers on your machine"
# TensorFlow's CUDA stub answers every driver call with CUDA_ERROR_SHARED_OBJECT_INIT_FAILED (303) when it
# could not load the driver library: the same news as NO_CUDA_DRIVER, which TensorFlow 2.16-2.20 log at
# info level and so do not print from level 1.
NO_DRIVER_LIBRARY = b"UNKNOWN ERROR (303)"
# Logged at error level while TensorFlow starts, though nothing is wrong (duplicate plugin registrations,
# a kernel fallback).
HARMLESS_ERRORS = (b"computation placer already registered", b"Unable to register cuDNN factory",
                   b"Unable to register cuFFT factory", b"Unable to register cuBLAS factory",
                   b"oneDNN supports DT_INT64 only on platforms with AVX-512")
# The second line of cpu_feature_guard's message ("This TensorFlow binary is optimized to use...").
CPU_FEATURE_CONTINUATION = b"To enable the following instructions:"
_DROP_FROM = {b"I": 1, b"W": 2, b"E": 3}


def log_level() -> int:
    """Returns `TF_CPP_MIN_LOG_LEVEL` as an int (0 if unset or not a number)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def filter_lines(lines: Iterable[bytes], level: int) -> Iterator[bytes]:
    """Yields the lines (bytes, newline included) that TensorFlow's log `level` lets through."""
    no_cuda_driver = dropped_cpu_feature_line = False
    for line in lines:
        match = ABSL_LINE.match(line) or DATED_LINE.match(line)
        if match:
            severity = match.group(1)
            no_cuda_driver = no_cuda_driver or NO_CUDA_DRIVER in line
            drop = level >= _DROP_FROM.get(severity, 99) or (
                severity == b"E" and level >= 2 and (
                    any(message in line for message in HARMLESS_ERRORS)
                    or ((no_cuda_driver or NO_DRIVER_LIBRARY in line) and b"failed call to cuInit" in line)))
            dropped_cpu_feature_line = drop and b"cpu_feature_guard" in line
        else:
            drop = (level >= 1 and line.rstrip(b"\r\n") == PREAMBLE) or (
                dropped_cpu_feature_line and line.startswith(CPU_FEATURE_CONTINUATION))
            dropped_cpu_feature_line = False
        if not drop:
            yield line


def _run_filter(source: BinaryIO, sink: BinaryIO, level: int) -> None:
    for line in filter_lines(iter(source.readline, b""), level):
        sink.write(line)
        sink.flush()


def install() -> None:
    """Routes this process's stderr through the filter; call it before importing TensorFlow.

    Does nothing when the level is 0 (nothing to drop)."""
    level = log_level()
    if level <= 0:
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    process = subprocess.Popen([sys.executable, "-u", __file__, str(level)], stdin=subprocess.PIPE,
                               stdout=terminal, stderr=terminal, start_new_session=True)
    os.dup2(process.stdin.fileno(), 2)
    process.stdin.close()  # fd 2 is now the pipe's only write end: the filter ends when it closes

    def uninstall():
        sys.stderr.flush()
        os.dup2(terminal, 2)  # closes the pipe, after anything written to it
        os.close(terminal)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()

    atexit.register(uninstall)


if __name__ == "__main__":
    _run_filter(sys.stdin.buffer, sys.stdout.buffer, int(sys.argv[1]))
