"""Shared benchmark plumbing: environment facts, CSV rows, peak-memory measurement on CPU."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(os.environ.get("OUT") or Path(__file__).parent / "results")


def environment() -> dict:
    import torch
    import transformers
    import triton

    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, check=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "device": device, "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__}


def append_rows(op: str, rows: list[dict]) -> Path:
    """Append ``rows`` (each merged with the environment) to ``RESULTS/<op>.csv``; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{op}.csv"
    env = environment()
    rows = [{**env, **r} for r in rows]
    fields = list(dict.fromkeys(k for r in rows for k in r))  # every row's columns, first-seen order
    new = not path.exists()
    if not new:
        with open(path, newline="") as fh:
            old_fields = next(csv.reader(fh), [])
        fields = old_fields + [f for f in fields if f not in old_fields]
        if fields != old_fields:  # new columns: rewrite the file with the wider header
            with open(path, newline="") as fh:
                old = list(csv.DictReader(fh))
            rows = old + rows
            new = True
    with open(path, "w" if new else "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


RESULT = "RESULT "  # prefix of the one stdout line a worker process reports its row on


def emit(row: dict) -> None:
    """Report a worker's row to :func:`run_isolated`."""
    print(RESULT + json.dumps(row), flush=True)


class IsolatedRunError(RuntimeError):
    """A worker process failed; the message is the last line of its stderr."""


def run_isolated(script, args) -> dict:
    """Run ``python script *args`` in a fresh process (so peak-memory readings never mix) and return the row it
    reported with :func:`emit`. On failure its output tail goes to stderr and IsolatedRunError is raised."""
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise IsolatedRunError((proc.stderr.strip().splitlines() or ["no output"])[-1][:200])
    return json.loads(lines[-1][len(RESULT):])


def rss_bytes() -> int:
    """Resident memory of this process now, in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Start the kernel's peak-resident-memory count (``VmHWM``) again from the current level (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_rss_bytes() -> int:
    """The kernel's peak resident memory of this process (``VmHWM``) since it started or since
    :func:`reset_peak_rss`, in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 0.5 ms and cross-checked with ru_maxrss."""

    def __enter__(self):
        self.base = rss_bytes()
        self.base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        ru_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        sampled = self.peak - self.base
        # ru_maxrss counts only growth past every earlier peak, so it is a lower bound when the entry level was lower.
        self.extra_bytes = max(sampled, ru_peak - max(self.base_max, self.base))
        return False


def meta_model(model_cls, config, dtype, device):
    """``model_cls(config)`` with parameters of ``dtype`` materialised uninitialised on ``device`` (built on the meta
    device, so nothing is drawn twice); the caller fills what it reads."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to_empty(device=device)
