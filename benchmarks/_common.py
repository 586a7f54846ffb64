"""What the benchmark scripts share: the machine and load average they record, and how they write results.

The scripts run as `python benchmarks/<script>.py`, so this folder is on their import path.
"""

from __future__ import annotations

import json
import os
import platform
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
