"""What the benchmark scripts share: the machine and load average they record, and how they write results.

The scripts run as `python benchmarks/<script>.py`, so this folder is on their import path.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def machine() -> dict:
    """Returns the CPU's model name (or the platform's processor), the number of cores and Python's version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version())


def load_average() -> str:
    """Returns the 1, 5 and 15 minute load averages, or "n/a" where the system has none."""
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def write_results(out, meta: dict, rows: list, markdown, plot, stem: str = "results", plot_name: str = "plot.png"):
    """Writes `<stem>.json` (meta and rows), `<stem>.md` (`markdown(rows, meta)`) and the plot; prints the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    table = markdown(rows, meta)
    (out / f"{stem}.md").write_text(table)
    plot(rows, out / plot_name)
    print(table)
    print(f"Wrote {out / f'{stem}.md'}, {out / f'{stem}.json'} and {out / plot_name}.")
    return table


def print_entry(row: dict, measure) -> None:
    """In an entry's own process: prints `row` with `measure()`'s figures (or the error that stopped it) and
    the load average, on the `RESULT ` line `run_in_own_process` reads."""
    try:
        row.update(measure())
    except Exception as error:  # reported (e.g. out of memory), not fatal to the sweep
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    row["load"] = load_average()
    print("RESULT " + json.dumps(row))


def run_in_own_process(script, entry: str, fields: dict, passthrough, **run_kwargs) -> dict:
    """Runs `script --entry ENTRY *passthrough` in a fresh interpreter and returns the row it printed, or
    `fields` with the exit status and the end of its stderr when it printed none; prints the row too."""
    out = subprocess.run([sys.executable, str(script), "--entry", entry, *passthrough], capture_output=True,
                         text=True, **run_kwargs)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    row = json.loads(lines[-1][7:]) if lines else dict(fields, error=f"exit {out.returncode}: {out.stderr[-300:]}")
    print(json.dumps(row), flush=True)
    return row


def median_run(runs: list, key: str) -> dict:
    """Returns a copy of the run whose `key` is the median over the runs that did not fail (of two middle
    ones, the larger), with their number as `rounds` and every one's `key` as `<key>_all`; the first run
    when every run failed."""
    good = [run for run in runs if "error" not in run]
    if not good:
        return runs[0]
    row = dict(sorted(good, key=lambda run: run[key])[len(good) // 2])
    row["rounds"] = len(good)
    row[f"{key}_all"] = [run[key] for run in good]
    return row
