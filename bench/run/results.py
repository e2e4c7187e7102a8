"""The results store: one row per run, persisted the moment the run ends.

Each finished run is written as ``<out>/rows/<run_id>.json`` (atomic: temp file, then rename),
then ``<out>/runs.parquet`` and ``<out>/runs.csv`` are rebuilt from all rows (also atomically).
A kill at any moment loses only the run in flight; a rerun skips every ``ok`` and ``infeasible``
row (a setting the model cannot meet stays infeasible) and retries failed or diverged ones.

Every row file is checked against the schema when read (:func:`row_problem`): one that is not
JSON, or lacks what every row must carry, is reported on stderr by path and left out: it is never
counted, and the run it belongs to is not finished, so the next ``bench run`` redoes it (and
replaces the file). :func:`read_results` rebuilds the table from ``rows/`` when ``runs.parquet``
cannot be read, and says so; readers never write into the folder.

The same store keeps the transfer benchmark's rows (:mod:`bench.run.transfer`): a :class:`RowKind`
says where a kind of row lives, what identifies it, what a valid one is, which are finished and
which tables are rebuilt from them (:data:`RUNS`, the default, is the sweep's).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.errors import warn_stderr

# Column order of runs.parquet / runs.csv. Numbers are numeric; method_config is JSON text.
COLUMNS = [
    "run_id", "sweep", "dataset", "task", "model", "arch", "basis", "method", "method_config",
    "method_config_nondefault", "seed", "status", "error", "metric_name", "metric_direction", "metric",
    "val_metric", "control_metric", "control_val_metric", "metric_delta", "dense_metric", "dense_val_metric",
    "dense_delta", "best_epoch", "epochs_run",
    "finetune_best_epoch", "finetune_epochs_run", "finetune_lr", "params_total", "params_trainable",
    "optimizer_state_bytes", "stored_bits", "dense_bits",
    "compression_ratio", "coef_stored_bits", "coef_dense_bits", "coef_compression_ratio",
    "requested_ratio", "theoretical_speedup", "file_bytes", "header_bytes", "dense_file_bytes",
    "file_compression_ratio", "zstd_file_bytes", "onnx_bytes", "onnx_max_diff", "onnx_error", "runtime_bytes",
    "epochs", "finetune_epochs", "lr", "batch_size",
    "finetune_lr_scale", "schedule",
    "patience", "weight_decay", "threads", "compile", "features", "bn_recalibration",
    "dataset_options", "model_options", "basis_options",
    "train_seconds", "compress_seconds", "peak_memory_bytes", "peak_memory_kind", "device",
    "host", "torch_version", "git_sha", "started_at", "finished_at",
]
NUMERIC = {
    "seed", "metric", "dense_metric", "metric_delta", "val_metric", "control_metric", "control_val_metric",
    "dense_val_metric", "dense_delta", "best_epoch", "epochs_run", "finetune_best_epoch", "finetune_epochs_run",
    "finetune_lr", "header_bytes", "dense_file_bytes", "zstd_file_bytes", "file_compression_ratio", "lr", "batch_size",
    "finetune_lr_scale", "patience", "weight_decay", "threads", "bn_recalibration", "params_total", "params_trainable",
    "optimizer_state_bytes", "stored_bits", "dense_bits", "compression_ratio", "coef_stored_bits",
    "coef_dense_bits", "coef_compression_ratio", "requested_ratio", "theoretical_speedup", "file_bytes",
    "epochs", "finetune_epochs", "train_seconds", "compress_seconds", "peak_memory_bytes", "onnx_bytes",
    "onnx_max_diff", "runtime_bytes",
}


FINISHED = ("ok", "infeasible")  # statuses a rerun does not retry
STATUSES = ("ok", "failed", "diverged", "infeasible")
REQUIRED = ("run_id", "status", "dataset", "method", "seed")  # what every row carries
REQUIRED_OK = ("metric_name", "metric", "val_metric", "stored_bits", "dense_bits", "compression_ratio")
ROW_FILE_ONLY = ("traceback",)  # kept in the row file (the full error), not in runs.parquet / runs.csv


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def row_problem(row) -> str | None:
    """What is wrong with a results row (None: it is a valid row of the schema)."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    missing = [k for k in REQUIRED if row.get(k) is None or row.get(k) == ""]
    if row.get("status") == "ok":
        missing += [k for k in REQUIRED_OK if row.get(k) is None]
    if missing:
        return "missing " + ", ".join(missing)
    for k in ("run_id", "status", "dataset", "method"):
        if not isinstance(row[k], str):
            return f"{k} is {row[k]!r}, not a string"
    if row["status"] not in STATUSES:
        return f"status {row['status']!r} is not one of {', '.join(STATUSES)}"
    if not _is_number(row["seed"]) or row["seed"] != int(row["seed"]):
        return f"seed is {row['seed']!r}, not an integer"
    if row["status"] == "ok":
        for k in REQUIRED_OK[1:]:
            if not _is_number(row[k]) or not math.isfinite(row[k]):
                return f"{k} is {row[k]!r}, not a finite number"
    return None


def scan_rows(folder: Path, problem=row_problem,
              id_key: str = "run_id") -> tuple[list[dict], list[tuple[Path, str]]]:
    """(valid rows, [(path, what is wrong)] of the invalid ones) of the ``*.json`` row files in
    ``folder``, sorted by name, checked by ``problem``; a row file is named after its ``id_key``."""
    folder = Path(folder)
    if not folder.is_dir():
        return [], []
    rows, bad = [], []
    for p in sorted(folder.glob("*.json")):
        try:
            row = json.loads(p.read_text())
        except OSError as exc:
            bad.append((p, f"cannot be read: {exc.strerror or exc}"))
            continue
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: a truncated or garbled file
            bad.append((p, f"not valid JSON: {exc}"))
            continue
        why = problem(row)
        if why is None and row[id_key] != p.stem:
            why = f"its {id_key} {row[id_key]!r} does not match the file name"
        if why is None:
            rows.append(row)
        else:
            bad.append((p, why))
    return rows, bad


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader never sees a partial file (temp file + rename),
    with the usual permissions (mkstemp's are owner-only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def rows_to_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame([{k: v for k, v in r.items() if k not in ROW_FILE_ONLY} for r in rows])
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = None
    extra = [c for c in df.columns if c not in COLUMNS]
    df = df[COLUMNS + extra]
    for c in NUMERIC:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    for c in df.columns:
        if c not in NUMERIC and df[c].dtype == object:
            df[c] = df[c].map(lambda v: v if v is None or isinstance(v, str) else json.dumps(v))
    return df


def write_run_tables(out: Path, rows: list[dict]) -> None:
    """``runs.parquet`` and ``runs.csv`` of a sweep's rows (nothing when there are none)."""
    df = rows_to_frame(rows)
    if df.empty:
        return
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(out / "runs.parquet", buf.getvalue())
    atomic_write_bytes(out / "runs.csv", df.to_csv(index=False).encode())


@dataclass(frozen=True)
class RowKind:
    """One kind of results row: where its files live (``<out>/<rows_dir>/<id>.json``), what
    identifies a row (``id_key``), what is wrong with a row (``problem``; None if valid), which
    statuses a rerun does not redo, the tables rebuilt from all rows after each write, and the
    command that redoes a run (named in warnings)."""

    rows_dir: str
    id_key: str
    problem: Callable[[object], str | None]
    finished: tuple[str, ...]
    write_tables: Callable[[Path, list[dict]], None]
    command: str


RUNS = RowKind("rows", "run_id", row_problem, FINISHED, write_run_tables, "bench run")


class ResultsStore:
    """The rows of one results folder (of one :class:`RowKind`, the sweep's by default). Reading
    never writes; ``add``/``flush`` are for the writer (who holds :func:`bench.run.lock.results_writer`)."""

    def __init__(self, out_dir: str | Path, warn=warn_stderr, kind: RowKind = RUNS):
        self.out = Path(out_dir)
        self.kind = kind
        self.rows_dir = self.out / kind.rows_dir
        self.warn = warn
        self._reported: set[Path] = set()  # invalid row files already reported by this store

    def rows(self) -> list[dict]:
        """The valid rows; each invalid row file is reported once (by path) and left out."""
        rows, bad = scan_rows(self.rows_dir, self.kind.problem, self.kind.id_key)
        for path, why in bad:
            if path not in self._reported:
                self._reported.add(path)
                self.warn(f"{path} is not a valid results row ({why}); it is not counted, and the next "
                          f"`{self.kind.command}` on this folder redoes its run")
        return rows

    def remove_partial_writes(self) -> int:
        """Delete the temp files a killed writer left in ``rows/`` (only the lock holder calls this)."""
        leftovers = list(self.rows_dir.glob(".*.tmp")) if self.rows_dir.is_dir() else []
        for p in leftovers:
            p.unlink(missing_ok=True)
        return len(leftovers)

    def finished_rows(self) -> dict[str, dict]:
        """The rows a rerun does not redo, by id."""
        return {r[self.kind.id_key]: r for r in self.rows() if r.get("status") in self.kind.finished}

    def finished_ids(self) -> set[str]:
        return set(self.finished_rows())

    def add(self, row: dict) -> None:
        """Write ``row`` (non-finite numbers as null), then rebuild the tables."""
        row = {k: _clean(v) for k, v in row.items()}
        atomic_write_bytes(self.rows_dir / f"{row[self.kind.id_key]}.json", json.dumps(row, indent=1).encode())
        self.flush()

    def frame(self) -> pd.DataFrame:
        return rows_to_frame(self.rows())

    def flush(self) -> None:
        """Rebuild the kind's tables from every valid row."""
        self.kind.write_tables(self.out, self.rows())


def _read_table(p: Path) -> pd.DataFrame:
    if p.suffix == ".csv":
        return rows_to_frame(pd.read_csv(p).to_dict("records"))
    return pd.read_parquet(p)


def _why(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:200]


def read_results(path: str | Path, warn=warn_stderr) -> pd.DataFrame:
    """The runs of a results folder: ``runs.parquet`` (or ``runs.csv`` where there is no parquet),
    else the rows in ``rows/``; a parquet/CSV file may be given directly. A table that cannot be read
    is rebuilt in memory from ``rows/`` with a warning saying so; nothing is written."""
    from bench.errors import UserError

    p = Path(path)
    if not p.exists():
        raise UserError(f"results folder {str(path)!r} not found")
    if p.is_file():
        if p.suffix not in (".parquet", ".csv"):
            raise UserError(f"{str(path)!r} is a file, not a results folder (give the folder, or its "
                            "runs.parquet / runs.csv)")
        try:
            return _read_table(p)
        except Exception as exc:  # any reader error of a damaged file
            raise UserError(f"{str(path)!r} cannot be read ({_why(exc)})") from None
    problem = None
    for name in ("runs.parquet", "runs.csv"):  # the first table present; rows/ if it cannot be read
        if (p / name).is_file():
            try:
                return _read_table(p / name)
            except Exception as exc:  # any reader error of a damaged file
                problem = f"{p / name} cannot be read ({_why(exc)})"
                break
    rows = ResultsStore(p, warn).rows()
    if rows:
        warn(f"{problem or f'no runs.parquet in {str(p)!r}'}; rebuilt the table from {p / 'rows'} "
             f"({len(rows)} rows)")
        return rows_to_frame(rows)
    if problem:
        raise UserError(f"{problem}, and {p / 'rows'} holds no valid rows to rebuild it from; rerun "
                        "`python -m bench run` with the same --out")
    raise UserError(f"no runs.parquet or runs.csv in {str(path)!r}; run `python -m bench run --out DIR` first")
