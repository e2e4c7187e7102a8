"""``python -m bench run ... --against REFERENCE``: a new method next to the reference, without rerunning it.

REFERENCE is a results folder or a committed report folder (``reports/cpu`` holds only ``runs.csv``).

1. :func:`prepare`: of the sweep asked, keep the runs the reference lacks (by run id; its ``ok`` and
   ``infeasible`` rows count as done). Its trained models are reused when its ``cache/`` is there
   (linked into ``--out``'s cache: nothing the reference has is trained again); where they are not,
   the bases are trained again, and then the ``dense`` and ``dense_ft`` runs of each such base are run
   too, to check that they reproduce the reference.
2. :func:`finish`: compare every re-run ``dense`` / ``dense_ft`` row with the reference row of the same
   run id (the largest difference in test and validation metric, printed), warn in one line naming the
   rows where it exceeds the reference's seed spread (another CPU or torch version), and copy the
   reference rows into ``--out`` (each keeps its provenance, ``source`` = the reference folder), so the
   leaderboard written there ranks the new method among the reference methods.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

from bench.errors import UserError, warn_stderr

from .plan import stage_cache
from .results import ResultsStore, atomic_write_bytes, read_results, row_problem
from .sweep import RunSpec, Sweep

CHECKED = ("dense", "dense_ft")


def reference_name(reference: str | Path) -> str:
    """How a row names the reference it was copied from: relative to the working directory when inside it
    (run from a checkout's root, ``reports/cpu``: the same on every checkout), else the absolute path."""
    path = Path(reference).resolve()
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def reference_rows(reference: str | Path) -> dict[str, dict]:
    """run id -> row of the reference (its row files, else its runs.parquet / runs.csv)."""
    ref = Path(reference)
    if not ref.is_dir():
        raise UserError(f"--against {str(reference)!r} is not a results folder (a folder with runs.csv, "
                        "runs.parquet or rows/)")
    rows = ResultsStore(ref, warn=lambda _m: None).rows()
    if not rows:
        from .merge import _plain

        rows = [{k: _plain(v) for k, v in r.items()} for r in read_results(ref).to_dict("records")]
        rows = [r for r in rows if row_problem(r) is None]
    if not rows:
        raise UserError(f"--against {ref}: no results rows found")
    return {r["run_id"]: r for r in rows}


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def prepare(sweep: Sweep, reference: str | Path, out: Path, log=print) -> tuple[Sweep, dict[str, dict]]:
    """The sweep of what the reference lacks (plus the control checks of re-trained bases)."""
    ref = Path(reference)
    if ref.resolve() == Path(out).resolve():
        raise UserError("--against and --out are the same folder; write the combined results into a new one")
    rows = reference_rows(ref)
    done = {rid for rid, r in rows.items() if r.get("status") in ("ok", "infeasible")}
    todo = [s for s in sweep.runs if s.run_id not in done]
    reused = 0
    if (ref / "cache").is_dir():
        (out / "cache").mkdir(parents=True, exist_ok=True)
        for f in (ref / "cache").iterdir():
            if f.is_file() and not (out / "cache" / f.name).exists():
                _link(f, out / "cache" / f.name)
                reused += 1
    checks, seen = [], {s.run_id for s in todo}
    for spec in todo:
        _, base_file = stage_cache(spec)
        if (out / "cache" / base_file).exists():
            continue  # the reference's own trained base: nothing to check
        for method in CHECKED:
            check = dataclasses.replace(spec, method=method, method_config={})
            if check.run_id in rows and check.run_id not in seen:
                seen.add(check.run_id)
                checks.append(check)
    known = [s for s in sweep.runs if s.run_id in rows or dataclasses.replace(
        s, method="dense_ft", method_config={}).run_id in rows]
    if not known:
        warn_stderr(f"none of the runs asked share a base with {ref}'s runs: ask its sweep and budget "
                    "(e.g. --sweep cpu for reports/cpu, with the same --epochs/--finetune-epochs) to be compared "
                    "with it")
    log(f"against {ref}: {len(sweep.runs) - len(todo)} of the {len(sweep.runs)} runs asked are in the reference; "
        f"{len(todo)} to run" + (f", {len(checks)} dense/dense_ft runs of re-trained bases to check against it"
                                 if checks else "") + (f"; {reused} trained models reused from its cache" if reused
                                                       else "; it has no cache/: bases are trained again"))
    return Sweep(sweep.name, todo + checks, sweep.device, sweep.skipped, sweep.datasets), rows


def _spread(rows: dict[str, dict], row: dict, key: str) -> float:
    """Sample std over seeds of the reference rows of the same group (dataset, model, basis, method, budget)."""
    group = ("dataset", "model", "basis", "method", "method_config", "epochs", "finetune_epochs", "lr",
             "batch_size", "model_options", "basis_options", "dataset_options")
    vals = [r[key] for r in rows.values() if all(r.get(g) == row.get(g) for g in group)
            and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if len(vals) < 2:
        return 0.0
    mean = sum(vals) / len(vals)
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def finish(reference: str | Path, rows: dict[str, dict], checks: list[RunSpec], out: Path, log=print,
           warn=None) -> dict:
    """Compare the re-run controls with the reference, then copy the reference rows into ``out``."""
    warn = warn or warn_stderr
    store = ResultsStore(out)
    new = {r["run_id"]: r for r in store.rows()}
    worst = {"test": 0.0, "val": 0.0}
    off = []
    for spec in checks:
        mine, theirs = new.get(spec.run_id), rows.get(spec.run_id)
        if mine is None or theirs is None or mine.get("status") != "ok":
            continue
        for key, name in (("metric", "test"), ("val_metric", "val")):
            d = abs(float(mine[key]) - float(theirs[key]))
            worst[name] = max(worst[name], d)
            if d > max(_spread(rows, theirs, key), 1e-12):
                off.append(f"{spec.label()} ({name} {mine[key]:.6g} vs {theirs[key]:.6g})")
    if checks:
        log(f"reference check: {len(checks)} re-trained dense/dense_ft rows against {reference}: largest "
            f"|difference| test {worst['test']:.3g}, validation {worst['val']:.3g}")
    if off:
        warn(f"re-trained controls differ from the reference by more than its seed spread (another CPU "
             f"or torch version?): {'; '.join(dict.fromkeys(off))}")
    source = reference_name(reference)
    copied = 0
    for rid, row in rows.items():
        if rid in new:
            continue
        atomic_write_bytes(store.rows_dir / f"{rid}.json",
                           json.dumps({**row, "source": row.get("source") or source}, indent=1, default=str).encode())
        copied += 1
    store.flush()
    return {"checked": len(checks), "differ": off, "copied": copied, **worst}
