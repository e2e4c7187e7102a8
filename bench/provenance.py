"""Provenance: which code made a result (:func:`git_sha`) and the log of every sweep call
(:func:`log_invocation`, ``<out>/invocations.jsonl``, whose lines the report's header lists)."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
from pathlib import Path


def git_sha() -> str:
    """The short commit of this checkout; outside a git checkout, ``BENCH_GIT_SHA`` (a copy of a clean
    checkout that travelled without its ``.git``, e.g. to a lent GPU machine), else "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return sha or os.environ.get("BENCH_GIT_SHA") or "unknown"


# What :func:`bench.run.perf.speed_probe` times; the report's header names it with the numbers.
PROBE_WORKLOAD = "a training step at batch 128 of `kan [784, 64, 10]` bspline and of a same-parameter MLP"


def log_invocation(out: Path, command: str, seconds: float, counts: dict, executor: str,
                   outcome: str = "finished", probe: dict | None = None) -> None:
    """Append this sweep call (command, wall time, machine, outcome, and the machine's speed probe at its
    start and end, :func:`bench.run.perf.speed_probe`) to ``<out>/invocations.jsonl``; every call is kept,
    and the report's header lists them, so a results folder says how long it took to make and how fast the
    machine was meanwhile."""
    import torch

    entry = {"command": command, "executor": executor, "wall_seconds": round(seconds, 1), "counts": counts,
             "outcome": outcome, "host": socket.gethostname(), "cpus": os.cpu_count(),
             "torch_threads": torch.get_num_threads(),
             "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    if probe:
        entry["speed_probe"] = probe
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "invocations.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\n")
