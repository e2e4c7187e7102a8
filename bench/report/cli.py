"""From a results folder to its leaderboard: reads the rows (and ``transfer.csv``), adds provenance
and the sweep calls to the header. Loads no plugin: the rows carry what the report needs."""

from __future__ import annotations

from pathlib import Path

from bench.provenance import PROBE_WORKLOAD
from bench.run.results import read_results


def provenance_lines(df, command: str | None = None) -> list[str]:
    """Where the rows were made, read from the rows themselves (each carries its host, device, Python, torch
    and commit): a report rendered on another machine than the runs' (results from a GPU machine rendered
    on a laptop) names the runs' versions, not its own."""

    def values(column: str) -> str:
        return ", ".join(sorted(set(df[column].dropna().astype(str)))) or "?" if column in df else "?"

    lines = [f"Command: `{command}`"] if command else []
    lines.append(f"Machine: hosts: {values('host')} | devices: {values('device')}")
    lines.append(f"Versions: python {values('python')}, torch {values('torch_version')} | git: {values('git_sha')}")
    return lines


TRANSFER_CSV = "transfer.csv"


def read_transfer(path: str | Path):
    """The transfer benchmark's rows (``transfer.csv`` of a results folder), or None if it has none."""
    import pandas as pd

    p = Path(path)
    p = p / TRANSFER_CSV if p.is_dir() else p
    if p.name != TRANSFER_CSV or not p.is_file():
        return None
    return pd.read_csv(p, dtype={"ranks": str, "layer_ranks": str, "target": str, "error": str})


def _has_runs(path: Path) -> bool:
    return path.is_file() or (path / "runs.parquet").exists() or (path / "runs.csv").exists()


def invocation_lines(results: Path) -> list[str]:
    """One line per recorded sweep call (``invocations.jsonl``, written by ``bench run``)."""
    import json

    path = Path(results) / "invocations.jsonl"
    if not path.is_file():
        return []
    lines = []
    for raw in path.read_text().splitlines():
        try:
            e = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if not isinstance(e, dict):
            continue
        c = e.get("counts") or {}
        where = (f"Sweep call: `{e.get('command')}` — {e.get('wall_seconds')} s wall on {e.get('host')} "
                 f"({e.get('cpus')} CPUs, {e.get('torch_threads')} torch threads, executor "
                 f"{e.get('executor', 'local')})")
        if e.get("outcome", "finished") != "finished":
            lines.append(f"{where}, ended {e.get('outcome')} at {e.get('finished_at')} (its finished runs are kept)")
        else:
            lines.append(f"{where}, finished {e.get('finished_at')}: {c.get('ok', 0)} ok, "
                         f"{c.get('failed', 0)} failed, {c.get('diverged', 0)} diverged, "
                         + (f"{c['infeasible']} infeasible, " if c.get("infeasible") else "") +
                         f"{c.get('skipped_finished', 0)} already finished")
        speed = _probe_text(e.get("speed_probe"))
        if speed:
            lines.append(speed)
    return lines


def _probe_text(probe) -> str:
    """A sweep call's machine speed probe (:func:`bench.run.perf.speed_probe`) as one header line, or ""."""
    if not isinstance(probe, dict):
        return ""
    parts = []
    for when in ("start", "end"):
        p = probe.get(when)
        if not isinstance(p, dict):
            continue
        where = f"{p.get('device', '?')}, {p.get('threads', '?')} threads" + (
            f", {p['features']} features" if p.get("features") else "")
        if "kan_ms" in p and "mlp_ms" in p:
            parts.append(f"at the {when} ({where}) KAN {p['kan_ms']:.2f} ms, MLP {p['mlp_ms']:.2f} ms")
        else:
            parts.append(f"at the {when} not measured ({p.get('error', '?')})")
    if not parts:
        return ""
    return f"Machine speed during that call ({PROBE_WORKLOAD}; `bench.run.perf.speed_probe`): " + "; ".join(parts)


def code_sha() -> str:
    """The short git commit of the report code itself ('?' outside a checkout)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def rendered_line(rendered_by: str, results: Path) -> str:
    return (f"Rendered by `{rendered_by}` (report code at git {code_sha()}) from the rows in `{results}`: the runs "
            "are those of the sweep calls listed here, made at their own commit (`git` above).")


def report_folder(results: Path, out: Path, command: str | None = None, tolerance_acc: float = 1.0,
                  tolerance_rmse_rel: float = 0.05, title: str | None = None, rendered_by: str | None = None) -> Path:
    """LEADERBOARD.md of a results folder: the compression runs (``runs.parquet``) and, when the
    folder holds ``transfer.csv``, the LoTRA transfer section; a folder with only transfer results
    gets a report of that section alone. ``rendered_by`` (the ``bench report`` command) adds a header
    line saying the leaderboard was rendered again from the same runs, and by which code."""
    from .leaderboard import write_report
    from .transfer import write_transfer_report

    results = Path(results)
    transfer = read_transfer(results) if results.is_dir() else None
    if transfer is not None and not _has_runs(results):
        return write_transfer_report(transfer, Path(out), title=f"LoTRA transfer benchmark: {results.name}",
                                     header_lines=provenance_lines(transfer, command))
    df = read_results(results)
    title = title or f"KAN compression leaderboard: {results.name}"
    header = provenance_lines(df, command) + invocation_lines(results)
    if rendered_by:
        header.append(rendered_line(rendered_by, results))
    return write_report(df, Path(out), title=title, tolerance_acc=tolerance_acc,
                        tolerance_rmse_rel=tolerance_rmse_rel, header_lines=header, transfer=transfer)
