"""Glue between a results folder and :mod:`bench.report` (adds provenance to the header)."""

from __future__ import annotations

import platform
from pathlib import Path

from .results import read_results


def provenance_lines(df, command: str | None = None) -> list[str]:
    import torch

    lines = []
    if command:
        lines.append(f"Command: `{command}`")
    hosts = sorted(set(df["host"].dropna().astype(str))) if "host" in df else []
    devices = sorted(set(df["device"].dropna().astype(str))) if "device" in df else []
    shas = sorted(set(df["git_sha"].dropna().astype(str))) if "git_sha" in df else []
    lines.append(f"Machine: {platform.machine()} {platform.processor() or ''} | hosts: {', '.join(hosts) or '?'} | "
                 f"devices: {', '.join(devices) or '?'}")
    lines.append(f"Versions: python {platform.python_version()}, torch {torch.__version__} | "
                 f"git: {', '.join(shas) or '?'}")
    return lines


def report_folder(results: Path, out: Path, command: str | None = None, tolerance_acc: float = 1.0,
                  tolerance_rmse_rel: float = 0.05) -> Path:
    from .registry import load_plugins
    from .report import write_report

    load_plugins()  # method defaults let the tables show only the non-default hyperparameters
    df = read_results(results)
    title = f"KAN compression leaderboard: {Path(results).name}"
    return write_report(df, Path(out), title=title, tolerance_acc=tolerance_acc,
                        tolerance_rmse_rel=tolerance_rmse_rel, header_lines=provenance_lines(df, command))
