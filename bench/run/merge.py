"""``bench merge``: combine the results folders of several machines into one (one row per run)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.errors import UserError, warn_stderr

from .lock import results_writer, writable_folder
from .results import ResultsStore, atomic_write_bytes, read_results, row_problem


def _rank(row: dict) -> tuple:
    return (row.get("status") == "ok", str(row.get("finished_at") or row.get("started_at") or ""))


def merge_results(folders: list[str | Path], out: str | Path) -> dict:
    """Combine the rows of several results folders into ``out`` (one row per ``run_id``).

    For a run present in several folders the ``ok`` row wins, then the most recently finished one.
    Each row keeps its own provenance (host, device, git_sha, torch_version); ``source`` names the
    folder it came from. The folders are only read (an invalid row file is reported by path and left
    out); ``out`` is written under its writer lock and must not be one of them. Returns
    {"rows": kept, "duplicates": dropped, "folders": n}.
    """
    if not folders:
        raise UserError("merge needs at least one results folder")
    out = Path(out)
    for folder in map(Path, folders):
        if not folder.exists():
            raise UserError(f"results folder {str(folder)!r} not found")
        if not folder.is_dir():
            raise UserError(f"{str(folder)!r} is a file, not a results folder")
        if folder.resolve() == out.resolve():
            raise UserError(f"--out {str(out)!r} is one of the folders being merged; merge into a new folder")
    writable_folder(out, "merge --out folder")
    best: dict = {}
    seen = 0
    for folder in map(Path, folders):
        rows = ResultsStore(folder).rows()
        if not rows:  # a folder with only runs.parquet/csv (e.g. copied from a cluster)
            df = read_results(folder)
            rows = []
            for i, r in enumerate(df.to_dict("records")):
                r = {k: _plain(v) for k, v in r.items()}
                if (why := row_problem(r)) is None:
                    rows.append(r)
                else:
                    warn_stderr(f"row {i} of {folder}'s table is not a valid results row ({why}); left out")
        for row in rows:
            seen += 1
            row = {**row, "source": row.get("source") or str(folder.resolve())}
            rid = row["run_id"]
            if rid not in best or _rank(row) > _rank(best[rid]):
                best[rid] = row
    with results_writer(out):
        store = ResultsStore(out)
        for rid, row in best.items():
            atomic_write_bytes(store.rows_dir / f"{rid}.json", json.dumps(row, indent=1, default=str).encode())
        store.flush()
    return {"rows": len(best), "duplicates": seen - len(best), "folders": len(folders)}


def _plain(v):
    """A pandas cell as a JSON value (numpy scalars to Python, NaN to None)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    return v
