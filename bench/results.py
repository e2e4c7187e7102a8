"""The results store: one row per run, persisted the moment the run ends.

Each finished run is written as ``<out>/rows/<run_id>.json`` (atomic: temp file, then rename),
then ``<out>/runs.parquet`` and ``<out>/runs.csv`` are rebuilt from all rows (also atomically).
A kill at any moment loses only the run in flight; a rerun skips every ``ok`` and ``infeasible``
row (a setting the model cannot meet stays infeasible) and retries failed or diverged ones.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pandas as pd

# Column order of runs.parquet / runs.csv. Numbers are numeric; method_config is JSON text.
COLUMNS = [
    "run_id", "sweep", "dataset", "task", "model", "arch", "basis", "method", "method_config",
    "seed", "status", "error", "metric_name", "metric", "val_metric", "control_metric", "control_val_metric",
    "metric_delta", "dense_metric", "dense_val_metric", "dense_delta", "best_epoch", "epochs_run",
    "finetune_best_epoch", "finetune_epochs_run", "finetune_lr", "params_total", "params_trainable",
    "optimizer_state_bytes", "stored_bits", "dense_bits",
    "compression_ratio", "coef_stored_bits", "coef_dense_bits", "coef_compression_ratio",
    "requested_ratio", "theoretical_speedup", "file_bytes", "header_bytes", "dense_file_bytes",
    "file_compression_ratio", "epochs", "finetune_epochs", "lr", "batch_size", "finetune_lr_scale", "schedule",
    "patience", "weight_decay", "threads", "dataset_options", "model_options", "basis_options",
    "train_seconds", "compress_seconds", "peak_memory_bytes", "peak_memory_kind", "device",
    "host", "torch_version", "git_sha", "started_at", "finished_at",
]
NUMERIC = {
    "seed", "metric", "dense_metric", "metric_delta", "val_metric", "control_metric", "control_val_metric",
    "dense_val_metric", "dense_delta", "best_epoch", "epochs_run", "finetune_best_epoch", "finetune_epochs_run",
    "finetune_lr", "header_bytes", "dense_file_bytes", "file_compression_ratio", "lr", "batch_size",
    "finetune_lr_scale", "patience", "weight_decay", "threads", "params_total", "params_trainable",
    "optimizer_state_bytes", "stored_bits", "dense_bits", "compression_ratio", "coef_stored_bits",
    "coef_dense_bits", "coef_compression_ratio", "requested_ratio", "theoretical_speedup", "file_bytes",
    "epochs", "finetune_epochs", "train_seconds", "compress_seconds", "peak_memory_bytes",
}


FINISHED = ("ok", "infeasible")  # statuses a rerun does not retry


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
    df = pd.DataFrame(rows)
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


def read_json_rows(folder: Path) -> list[dict]:
    """Every ``*.json`` row in ``folder`` (sorted by name; none if it does not exist)."""
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.glob("*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # a torn file cannot happen with atomic writes, but never crash on one
    return out


class ResultsStore:
    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        self.rows_dir = self.out / "rows"

    def rows(self) -> list[dict]:
        return read_json_rows(self.rows_dir)

    def finished_ids(self) -> set[str]:
        return {r["run_id"] for r in self.rows() if r.get("status") in FINISHED}

    def add(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        atomic_write_bytes(self.rows_dir / f"{row['run_id']}.json", json.dumps(row, indent=1).encode())
        self.flush()

    def frame(self) -> pd.DataFrame:
        return rows_to_frame(self.rows())

    def flush(self) -> None:
        df = self.frame()
        if df.empty:
            return
        import io

        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        atomic_write_bytes(self.out / "runs.parquet", buf.getvalue())
        atomic_write_bytes(self.out / "runs.csv", df.to_csv(index=False).encode())


def read_results(path: str | Path) -> pd.DataFrame:
    """Read ``runs.parquet`` from a results folder (or a parquet/CSV file given directly)."""
    p = Path(path)
    if p.is_dir():
        if (p / "runs.parquet").exists():
            p = p / "runs.parquet"
        elif (p / "runs.csv").exists():
            p = p / "runs.csv"
        else:
            from .errors import UserError

            raise UserError(f"no runs.parquet or runs.csv in {str(path)!r}; run `python -m bench run --out DIR` first")
    if p.suffix == ".csv":
        return rows_to_frame(pd.read_csv(p).to_dict("records"))
    return pd.read_parquet(p)
