"""LoTRA transfer benchmark: adapt a pre-trained KAN to related tasks with a Tucker-form update.

LoTRA (Gao, Ng, Tan, arXiv 2502.06153) fine-tunes a pre-trained KAN for a new task as
``A = A0 + G x1 U1 x2 U2 x3 U3``: the pre-trained edge tensors ``A0`` stay frozen and shared,
and only the Tucker update is trained and stored per task.

The benchmark (``python -m bench transfer --out DIR``):

1. a formula family ``f(x1, x2; a, b) = exp(sin(a pi x1) + b x2^2)`` on ``[-1, 1]^2``;
   the *source* task is ``a = b = 1`` (the KAN paper's ``eq_exp_sin``), each *target* changes
   the constants;
2. per seed, a dense KAN is pre-trained on the source task;
3. for every target: the pre-trained model as is (``zero_shot``: nothing stored per task), full
   fine-tuning of every parameter (``full``: per task it stores every trained tensor), and LoTRA
   at several ranks (``lotra``: per task it stores only the update's core and factors, float32).
   Every mode gets the same epochs and picks its best epoch on the target's validation split;
   the test split is scored once.

Each finished row is written at once to ``DIR/transfer_rows/<row_id>.json`` (atomically) and
``DIR/transfer.csv`` is rebuilt from all rows, by :class:`bench.run.results.ResultsStore` (row kind
:data:`TRANSFER_ROWS`: a row file that is not a valid transfer row is reported by path and its row
redone); the pre-trained model of each seed is cached in ``DIR/transfer_pretrained/``. The command
holds the folder's writer lock (:func:`bench.run.lock.results_writer`) as ``bench run`` does. A rerun of
the same command skips every finished row (and the pre-training of a seed whose rows are all
finished). ``row_id`` hashes the seed, the target's constants, the mode, the ranks and the whole
budget, so a changed budget gives new rows. At the end the command writes ``DIR/LEADERBOARD.md``
(:func:`bench.report.transfer_section`: per target a table sorted by per-task stored bits, and
``transfer_rmse_vs_bits.png``); ``python -m bench report DIR`` rewrites it.

Exported adapted models (:func:`bench.compression.storage.export_model`) hold ``A0`` and the update, and reload
in a fresh process: :class:`LoTRASource` lives in :mod:`bench.compression.tucker_factors` beside the Tucker source it
extends, which :func:`bench.compression.storage.load_model` registers.

LoTRA's update starts at zero (zero core, random orthonormal factors, as LoRA starts with a
zero factor), so adaptation starts exactly from the pre-trained model. Learning rates are
:func:`bench.compression.tucker_factors.tucker_param_groups`'s: the ``balanced`` rule of
:func:`bench.compression.tucker_factors.component_lrs` with the pre-trained tensor as the scale reference (the update
itself is zero at the start), or one ``shared`` rate.
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import hashlib
import io
import json
import math
import platform
import socket
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.compression.tucker_factors import LoTRASource, check_rank_spec, check_ranks_fit, tucker_param_groups
from bench.data import Splits
from bench.errors import UserError
from bench.model.kan import KAN, kan_layers
from bench.provenance import git_sha

from .lock import results_writer
from .results import ResultsStore, RowKind, atomic_write_bytes
from .train import Diverged, Trainer

SOURCE_CONSTANTS = (1.0, 1.0)
TARGETS = {"a=1.25": (1.25, 1.0), "b=0.5": (1.0, 0.5), "a=0.8,b=1.5": (0.8, 1.5)}
# Absolute ranks, capped per layer at the mode size. On the default [2, 8, 1] KAN they store 39, 85, 143 and 217
# float32 values per task against full fine-tuning's 225 (a full-rank [8, 2, 9] update would store 332: more).
DEFAULT_RANKS = ([1, 1, 1], [2, 2, 2], [4, 2, 4], [6, 2, 6])
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_PRETRAIN_EPOCHS = 300
DEFAULT_FINETUNE_EPOCHS = 200
MODE_ORDER = ("zero_shot", "full", "lotra")
ROWS_DIR = "transfer_rows"
PRETRAINED_DIR = "transfer_pretrained"
CSV_NAME = "transfer.csv"
COLUMNS = [
    "row_id", "seed", "target", "a", "b", "mode", "ranks", "layer_ranks", "status", "error", "stored_bits",
    "trainable_params", "val_rmse", "test_rmse", "best_epoch", "source_a", "source_b", "source_val_rmse",
    "source_test_rmse",
    "pretrain_epochs", "finetune_epochs", "lr", "lr_rule", "batch_size", "n_train", "n_eval", "hidden", "basis",
    "fit_seconds", "device", "host", "torch_version", "python", "git_sha", "started_at", "finished_at",
]


def family(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """``exp(sin(a pi x1) + b x2^2)``."""
    return np.exp(np.sin(a * np.pi * x[:, 0]) + b * x[:, 1] ** 2)


def task_seed(seed: int, constants: tuple[float, float]) -> int:
    """The data/shuffle seed of one task: a function of the run seed and the task's constants only
    (not of which other targets were asked for), so a row's numbers never depend on the target list."""
    key = f"{int(seed)}:{float(constants[0])!r}:{float(constants[1])!r}".encode()
    return int(hashlib.sha1(key).hexdigest()[:8], 16)


def task_splits(constants: tuple[float, float], seed: int, n_train: int = 1000, n_val: int = 1000,
                n_test: int = 1000) -> Splits:
    """Train/val/test draws of one task (inputs uniform on ``[-1, 1]^2``, float32 targets [N, 1])."""
    out = []
    for stream, n in enumerate((n_train, n_val, n_test)):
        rng = np.random.default_rng([seed, stream])
        x = rng.uniform(-1.0, 1.0, size=(n, 2)).astype(np.float32)
        y = family(x.astype(np.float64), *constants)
        out += [torch.from_numpy(x), torch.as_tensor(y, dtype=torch.float32).view(-1, 1)]
    return Splits(*out)


def attach_lotra(model: nn.Module, ranks, generator: torch.Generator | None = None) -> None:
    """Freeze every parameter and give each KAN layer a zero Tucker update on its edge tensor."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in kan_layers(model):
        layer.set_source(LoTRASource.zero_update(layer.edge_tensor().detach(), ranks, generator))


def trainable_bits(model: nn.Module) -> int:
    """Bits of every trainable tensor (float32): what full fine-tuning stores per task."""
    return sum(p.numel() * p.element_size() * 8 for p in model.parameters() if p.requires_grad)


def update_bits(model: nn.Module) -> int:
    """Bits a LoTRA task stores: every layer's Tucker update."""
    return sum(it.bits for _, layer in kan_layers(model) for it in layer.source.update_storage())


# ----------------------------------------------------------------------------- user input
def json_ranks(ranks) -> str:
    return "[" + ",".join(str(r) for r in ranks) + "]"


def _number(text: str):
    text = text.strip()
    if not text:
        raise ValueError("empty")
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_ranks(values) -> list[list]:
    """``["1,1,1", "4,2,4"]`` (or one ``"1,1,1;4,2,4"``) -> rank triples; ints are absolute ranks,
    numbers with a point fractions of each mode. Every mistake is one :class:`UserError` line."""
    tokens = [t.strip() for v in ([values] if isinstance(values, str) else values) for t in str(v).split(";")]
    tokens = [t for t in tokens if t]
    if not tokens:
        raise UserError("--ranks needs at least one rank triple, e.g. 1,1,1 4,2,4")
    out = []
    for t in tokens:
        try:
            triple = [_number(v) for v in t.split(",")]
        except ValueError:
            raise UserError(f"--ranks {t!r}: each triple is 3 comma-separated numbers (out,in,basis), "
                            "e.g. 4,2,4") from None
        if len(triple) != 3:
            raise UserError(f"--ranks {t!r}: each triple is 3 comma-separated numbers (out,in,basis), "
                            f"got {len(triple)}")
        if any(isinstance(r, float) and not math.isfinite(r) for r in triple):
            raise UserError(f"--ranks {t!r}: ranks must be finite")
        check_rank_spec(triple)
        if triple in out:
            raise UserError(f"--ranks: {t!r} is given twice")
        out.append(triple)
    return out


def parse_targets(values) -> dict[str, tuple[float, float]]:
    """``["a=1.25", "a=0.8,b=1.5"]`` -> ``{name: (a, b)}``; an omitted constant keeps the source value."""
    tokens = [t.strip() for v in ([values] if isinstance(values, str) else values) for t in str(v).split(";")]
    tokens = [t for t in tokens if t]
    if not tokens:
        raise UserError("--targets needs at least one target, e.g. a=1.25 b=0.5")
    out: dict[str, tuple[float, float]] = {}
    for t in tokens:
        consts = dict(zip("ab", SOURCE_CONSTANTS))
        given = []
        for part in t.split(","):
            key, sep, val = part.partition("=")
            key = key.strip()
            if not sep or key not in consts or key in given:
                raise UserError(f"--targets {t!r}: each target is a=<number> and/or b=<number>, "
                                "comma-separated, e.g. a=0.8,b=1.5")
            try:
                consts[key] = float(val)
            except ValueError:
                raise UserError(f"--targets {t!r}: {val.strip()!r} is not a number") from None
            if not math.isfinite(consts[key]):
                raise UserError(f"--targets {t!r}: constants must be finite")
            given.append(key)
        name = ",".join(f"{k}={consts[k]:g}" for k in "ab" if k in given)
        if name in out:
            raise UserError(f"--targets: {name!r} is given twice")
        out[name] = (consts["a"], consts["b"])
    return out


def _check_budget(seeds, pretrain_epochs, finetune_epochs, lr, batch_size, n_train, n_eval, hidden) -> None:
    if not seeds:
        raise UserError("--seeds needs at least one seed")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise UserError(f"seeds must be integers >= 0, got {list(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"seeds must be distinct, got {list(seeds)}")
    for name, v, lo in (("--pretrain-epochs", pretrain_epochs, 1), ("--finetune-epochs", finetune_epochs, 1),
                        ("batch_size", batch_size, 1), ("n_train", n_train, 1), ("n_eval", n_eval, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise UserError(f"{name}={v!r} must be an integer >= {lo}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UserError(f"lr={lr!r} must be a positive number")
    if not hidden or any(int(h) < 1 for h in hidden):
        raise UserError(f"hidden widths must be >= 1, got {list(hidden)}")


# ----------------------------------------------------------------------------- persistence
def transfer_row_problem(row) -> str | None:
    """What is wrong with a transfer row (None: valid)."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    missing = [k for k in ("row_id", "status", "mode", "target", "seed") if row.get(k) is None or row.get(k) == ""]
    if row.get("status") == "ok":
        missing += [k for k in ("stored_bits", "val_rmse", "test_rmse") if row.get(k) is None]
    if missing:
        return "missing " + ", ".join(missing)
    if not isinstance(row["row_id"], str):
        return f"row_id is {row['row_id']!r}, not a string"
    if row["status"] not in ("ok", "diverged"):
        return f"status {row['status']!r} is not one of ok, diverged"
    if row["mode"] not in MODE_ORDER:
        return f"mode {row['mode']!r} is not one of {', '.join(MODE_ORDER)}"
    return None


def write_transfer_csv(out: Path, rows: list[dict]) -> None:
    """``transfer.csv``: every row, sorted by target, seed, mode, stored bits and ranks."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in sorted(rows, key=_row_order):
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    atomic_write_bytes(out / CSV_NAME, buf.getvalue().encode())


TRANSFER_ROWS = RowKind(ROWS_DIR, "row_id", transfer_row_problem, ("ok",), write_transfer_csv, "bench transfer")


def transfer_store(out: str | Path) -> ResultsStore:
    """The results store of a transfer folder (``transfer_rows/``, ``transfer.csv``)."""
    return ResultsStore(out, kind=TRANSFER_ROWS)


def _pretrained_path(out: Path, key: str) -> Path:
    return Path(out) / PRETRAINED_DIR / f"{key}.pt"


def load_pretrained(out: Path, key: str) -> dict | None:
    """The cached pre-trained model of ``key`` (None if absent or unreadable: recomputed, never trusted)."""
    path = _pretrained_path(out, key)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a cache we cannot read is recomputed, never trusted
        return None


def save_pretrained(out: Path, key: str, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(_pretrained_path(out, key), buf.getvalue())


def _row_order(r: dict):
    return (r.get("target") or "", int(r.get("seed") or 0), MODE_ORDER.index(r["mode"]) if r.get("mode") in
            MODE_ORDER else 9, r.get("stored_bits") or 0, r.get("ranks") or "")


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- the benchmark
def run_transfer(out: str | Path | None = None, ranks_list=DEFAULT_RANKS, targets: dict | None = None,
                 hidden: tuple[int, ...] = (8,), basis: str = "bspline",
                 pretrain_epochs: int = DEFAULT_PRETRAIN_EPOCHS, finetune_epochs: int = DEFAULT_FINETUNE_EPOCHS,
                 lr: float = 3e-3, batch_size: int = 64, n_train: int = 1000, n_eval: int = 1000,
                 seeds=(0,), lr_rule: str = "balanced", progress: bool = False, log=print) -> list[dict]:
    """Pre-train on the source task per seed, adapt to each target; returns the rows of this
    setup (finished ones read back from ``out``, the rest computed and written one by one)."""
    targets = dict(TARGETS if targets is None else targets)
    seeds = list(seeds)
    ranks_list = [list(r) for r in ranks_list]
    for r in ranks_list:
        check_rank_spec(r)
    _check_budget(seeds, pretrain_epochs, finetune_epochs, lr, batch_size, n_train, n_eval, hidden)
    if lr_rule not in ("balanced", "shared"):
        raise UserError(f"unknown learning-rate rule {lr_rule!r}; valid: balanced, shared")
    if not targets:
        raise UserError("no target tasks given")
    widths = [2, *[int(h) for h in hidden], 1]
    shapes = [layer.source.shape for _, layer in kan_layers(KAN(widths, basis=basis))]
    for r in ranks_list:
        check_ranks_fit(shapes, r)

    with ExitStack() as held:
        if out is not None:
            held.enter_context(results_writer(out))
        store = transfer_store(out) if out is not None else None
        done = store.finished_rows() if store is not None else {}
        setup = {"hidden": list(widths[1:-1]), "basis": basis, "pretrain_epochs": pretrain_epochs,
                 "finetune_epochs": finetune_epochs, "lr": lr, "batch_size": batch_size, "n_train": n_train,
                 "n_eval": n_eval, "lr_rule": lr_rule, "source": list(SOURCE_CONSTANTS)}
        prov = {"device": "cpu", "host": socket.gethostname(), "torch_version": torch.__version__,
                "python": platform.python_version(), "git_sha": git_sha()}
        plan = []  # (seed, target name, constants, mode, ranks or None, row_id)
        for seed in seeds:
            for name, consts in targets.items():
                consts = (float(consts[0]), float(consts[1]))
                for mode, ranks in [("zero_shot", None), ("full", None)] + [("lotra", r) for r in ranks_list]:
                    rid = _hash({"seed": seed, "constants": list(consts), "mode": mode, "ranks": ranks, **setup})
                    plan.append((seed, name, consts, mode, ranks, rid))
        rows: dict[str, dict] = {rid: done[rid] for *_, rid in plan if rid in done}
        todo = [p for p in plan if p[-1] not in rows]
        if rows:
            log(f"resuming: {len(rows)} of {len(plan)} rows already finished in {out}")
        for seed in seeds:
            mine = [p for p in todo if p[0] == seed]
            if not mine:
                continue
            model, src_val, src_test = _pretrained(store, setup, seed, widths, basis, pretrain_epochs, lr, batch_size,
                                                   n_train, n_eval, progress, log)
            for name, consts in targets.items():
                consts = (float(consts[0]), float(consts[1]))
                work = [p for p in mine if p[1] == name]
                if not work:
                    continue
                tseed = task_seed(seed, consts)
                trainer = Trainer(task_splits(consts, tseed, n_train, n_eval, n_eval), "regression", "cpu",
                                  batch_size, lr, seed=tseed, progress=progress)
                for _, _, _, mode, ranks, rid in work:
                    started = _now()
                    row = {"row_id": rid, "seed": seed, "target": name, "a": consts[0], "b": consts[1], "mode": mode,
                           "ranks": json_ranks(ranks) if ranks else "", "source_a": SOURCE_CONSTANTS[0],
                           "source_b": SOURCE_CONSTANTS[1], "source_val_rmse": src_val,
                           "source_test_rmse": src_test, **{k: v for k, v in setup.items() if k != "source"},
                           "hidden": json.dumps(setup["hidden"]), **prov, "started_at": started}
                    try:
                        row.update(_adapt(model, trainer, mode, ranks, finetune_epochs, lr, lr_rule, seed,
                                          f"{mode} {name}" + (f" {json_ranks(ranks)}" if ranks else "")))
                        row["status"], row["error"] = "ok", ""
                    except Diverged as exc:
                        row.update(status="diverged", error=str(exc), test_rmse=float("nan"), val_rmse=float("nan"))
                    row["finished_at"] = _now()
                    rows[rid] = row
                    if store is not None:
                        store.add(row)
                log(f"seed {seed} target {name}: " + ", ".join(
                    f"{rows[p[-1]]['mode']}{rows[p[-1]]['ranks']} {rows[p[-1]].get('test_rmse', float('nan')):.4g}"
                    for p in plan if p[0] == seed and p[1] == name))
        if store is not None:
            store.flush()
        return [rows[p[-1]] for p in plan]


def _pretrained(store, setup, seed, widths, basis, epochs, lr, batch_size, n_train, n_eval, progress, log):
    """The seed's pre-trained source model (from the cache when there is one)."""
    key = "seed{}_{}".format(seed, _hash({"seed": seed, **{k: v for k, v in setup.items()
                                                            if k not in ("finetune_epochs", "lr_rule")}}))
    torch.manual_seed(seed)
    model = KAN(widths, basis=basis)
    cached = load_pretrained(store.out, key) if store is not None else None
    if cached is not None:
        model.load_state_dict(cached["state"])
        log(f"seed {seed}: pre-trained source model from cache (val RMSE {cached['val_rmse']:.4g})")
        return model, float(cached["val_rmse"]), float(cached["test_rmse"])
    sseed = task_seed(seed, SOURCE_CONSTANTS)
    trainer = Trainer(task_splits(SOURCE_CONSTANTS, sseed, n_train, n_eval, n_eval), "regression", "cpu",
                      batch_size, lr, seed=sseed, progress=progress)
    fit = trainer.fit(model, epochs, desc=f"pretrain seed {seed}")
    val, test = float(fit.best_val), float(trainer.evaluate(model, "test"))
    if store is not None:
        save_pretrained(store.out, key, {"state": model.state_dict(), "val_rmse": val, "test_rmse": test})
    log(f"seed {seed}: pre-trained on source a,b={SOURCE_CONSTANTS} in {fit.seconds:.0f}s: val RMSE {val:.4g}")
    return model, val, test


def _adapt(model, trainer: Trainer, mode: str, ranks, epochs: int, lr: float, lr_rule: str, seed: int,
           desc: str) -> dict:
    """One (target, mode) cell on a copy of the pre-trained model."""
    if mode == "zero_shot":
        return {"stored_bits": 0, "trainable_params": 0, "layer_ranks": "", "best_epoch": 0, "fit_seconds": 0.0,
                "val_rmse": trainer.evaluate(model, "val"), "test_rmse": trainer.evaluate(model, "test")}
    adapted = copy.deepcopy(model)
    groups, layer_ranks = None, ""
    if mode == "lotra":
        attach_lotra(adapted, ranks, torch.Generator().manual_seed(seed))
        groups = tucker_param_groups(adapted, lr, lr_rule)
        layer_ranks = " ".join("-".join(map(str, layer.source.update.ranks)) for _, layer in kan_layers(adapted))
        bits = update_bits(adapted)
    else:
        bits = trainable_bits(adapted)
    n_trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    res = trainer.fit(adapted, epochs, param_groups=groups, desc=desc)
    return {"stored_bits": bits, "trainable_params": n_trainable, "layer_ranks": layer_ranks,
            "best_epoch": res.best_epoch, "fit_seconds": time.perf_counter() - t0, "val_rmse": res.best_val,
            "test_rmse": trainer.evaluate(adapted, "test")}
