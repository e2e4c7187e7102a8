"""Running sweeps: one run is a pure call, ``RunSpec`` in, results row out.

For every (dataset, model, basis, seed) the dense base model is trained once and cached under
``<out>/cache/``; post-training methods compress that same checkpoint with the same fine-tune
budget. Methods that re-parameterise before training (``prepare``) get their own trained model,
cached by the method's ``stage_key`` so a sweep over post-training knobs trains it once (where
and for how many epochs: :mod:`bench.run.plan`). Seeds derive from (seed, dataset, model, basis),
never from the method, so every method sees the same data split and the same initialisation.

:func:`run_sweep` plans the sweep once (:func:`bench.run.plan.plan_sweep`) and :func:`run_plan`, the
``local`` backend, executes the plan in this process, in sweep order.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import io
import json
import math
import os
import platform
import socket
import time
import traceback
from collections import OrderedDict
from pathlib import Path

import torch

from bench.compression.methods import CompressContext, control_finetune
from bench.compression.pipeline import is_pipeline_class, method_class
from bench.compression.storage import count_params, export_model, header_bytes, load_model, storage_report, zstd_bytes
from bench.data import Splits, get_dataset
from bench.deploy import compact, held_bytes, onnx_row
from bench.errors import Infeasible, UserError
from bench.model import kinds as model_specs
from bench.model.bases import features_path, use_fused_features
from bench.provenance import git_sha

from .lock import results_writer
from .plan import Plan, control_cache, plan_sweep, stage_cache, stage_epochs
from .results import ResultsStore, atomic_write_bytes
from .sweep import RunSpec, Sweep
from .train import Diverged, Trainer, batchnorms


def derive_seed(*parts) -> int:
    """A 31-bit seed from any JSON-able parts (stable across processes and machines)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(device)


SPLIT_CACHE_SIZE = 3  # a bundled sweep's three seeds: its runs alternate between them within every method
# (with two kept, the conv sweep reloaded Fashion-MNIST ~80 times; a split is 220 MB there, 740 MB for CIFAR)


class RunEnv:
    """Per-process state shared by runs: output folder, data cache, device."""

    def __init__(self, out: str | Path, data_dir: str | Path, device: str = "auto", progress: bool = False):
        self.out, self.data_dir = Path(out), Path(data_dir)
        self.device = resolve_device(device)
        self.progress = progress
        self._splits: OrderedDict = OrderedDict()
        self.sha = git_sha()

    # ------------------------------------------------------------------ data
    def splits(self, spec: RunSpec) -> tuple[object, Splits]:
        ds = get_dataset(spec.dataset, **spec.dataset_options)
        key = json.dumps([spec.dataset, spec.dataset_options, spec.seed], sort_keys=True)
        if key not in self._splits:
            while len(self._splits) >= SPLIT_CACHE_SIZE:
                self._splits.popitem(last=False)
            splits = ds.load(self.data_dir, derive_seed(spec.seed, spec.dataset, "split"))
            self._splits[key] = splits.to(self.device)
        self._splits.move_to_end(key)
        return ds, self._splits[key]

    def trainer(self, spec: RunSpec, ds, splits: Splits) -> Trainer:
        t = spec.train
        use_fused_features(t.get("compile"))  # every run of this process, as its budget says (unset: compiled)
        return Trainer(splits, ds.task, self.device, batch_size=t["batch_size"], lr=t["lr"],
                       weight_decay=t["weight_decay"], seed=derive_seed(spec.seed, spec.dataset, spec.model,
                                                                         spec.basis, "shuffle"),
                       progress=self.progress, amp=t.get("amp", False), schedule=t.get("schedule", "constant"),
                       patience=t.get("patience", 0))

    @staticmethod
    def context(spec: RunSpec, trainer: Trainer, device) -> CompressContext:
        """The compress context of this spec: the shared fine-tune budget and the run's compress seed
        (derived without the method, so the control and every method fine-tune alike)."""
        t = spec.train
        return CompressContext(trainer=trainer, finetune_epochs=t["finetune_epochs"],
                               seed=derive_seed(spec.seed, spec.dataset, spec.model, spec.basis, "compress"),
                               device=device, finetune_lr=t["lr"] * t.get("finetune_lr_scale", 1.0))

    # ------------------------------------------------------------------ models
    def fresh_model(self, spec: RunSpec, ds):
        seed_everything(derive_seed(spec.seed, spec.dataset, spec.model, spec.basis, "init"))
        opts = model_specs.model_options(spec.model, spec.model_options)
        return model_specs.build(spec.model, opts, ds, spec.basis, spec.basis_options)

    def _load_cached(self, path: Path, model) -> dict:
        """Load a cached trained model's weights into ``model``; return its info."""
        blob = torch.load(path, map_location=self.device, weights_only=False)
        model.load_state_dict(blob["state_dict"])
        return blob["info"]

    @staticmethod
    def _save_cached(path: Path, model, info: dict, key: dict) -> None:
        buf = io.BytesIO()
        torch.save({"state_dict": model.state_dict(), "info": info, "key": key}, buf)
        atomic_write_bytes(path, buf.getvalue())

    def trained(self, spec: RunSpec, ds, trainer: Trainer, method=None):
        """The trained model for this spec's stage (dense base if ``method`` is None), cached
        where :func:`bench.run.plan.stage_cache` says, trained for :func:`bench.run.plan.stage_epochs`."""
        key, name = stage_cache(spec, method)
        stage, epochs = key["stage"], stage_epochs(spec, method).epochs
        path = self.out / "cache" / name
        model = self.fresh_model(spec, ds)
        if method is not None:
            method.prepare(model)
        model.to(self.device)
        if path.exists():
            return model, self._load_cached(path, model)
        _, trainable = count_params(model)
        given = model_specs.MODELS.lookup(spec.model).pretrained(
            model_specs.model_options(spec.model, spec.model_options)) if method is None else None
        if given is not None:  # a base model read from a file (bench.interop.base_model): scored, not trained
            model.load_state_dict(given.state_dict())
            model.eval()
            info = {"train_seconds": 0.0, "peak_memory_bytes": 0, "optimizer_state_bytes": 0,
                    "params_trainable": trainable, "best_epoch": None, "epochs_run": 0,
                    "best_val": trainer.evaluate(model, "val"), "history": [], "given": True}
        else:
            seed_everything(derive_seed(spec.seed, spec.dataset, spec.model, spec.basis, "train"))
            fit = trainer.fit(model, epochs, param_groups=method.param_groups(model) if method else None,
                              desc=f"{stage['method']} {spec.dataset}/{spec.basis}")
            info = {"train_seconds": fit.seconds, "peak_memory_bytes": fit.peak_memory_bytes,
                    "optimizer_state_bytes": fit.optimizer_state_bytes, "params_trainable": trainable,
                    "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run, "best_val": fit.best_val,
                    "history": fit.history}
        if method is None:  # the dense base's scores and file size, shared by every run compressing it
            info["test_metric"] = trainer.evaluate(model, "test")
            info["file_bytes"] = export_model(copy.deepcopy(model).cpu(), path.with_suffix(".kanb"))
        self._save_cached(path, model, info, key)
        return model, info

    def control(self, spec: RunSpec, trainer: Trainer, base) -> tuple[object, dict]:
        """The ``dense_ft`` control of this spec's base: ``base`` fine-tuned with the shared budget
        (:func:`bench.compression.methods.control_finetune`), cached, with its validation and test scores."""
        key, name = control_cache(spec)
        path = self.out / "cache" / name
        model = copy.deepcopy(base)
        if path.exists():
            return model, self._load_cached(path, model)
        ctx = self.context(spec, trainer, self.device)
        seed_everything(ctx.seed)
        try:
            fit = control_finetune(model, ctx)
        except Diverged as exc:  # name the control, not the method whose run needed it
            raise Diverged(f"the dense_ft control's fine-tune diverged ({exc}); every run of this base "
                           f"needs it: lower finetune_lr_scale") from None
        tuned = spec.train["finetune_epochs"] > 0
        model.eval()
        info = {"val_metric": trainer.evaluate(model, "val"), "test_metric": trainer.evaluate(model, "test"),
                "finetune_best_epoch": fit.best_epoch if tuned else None,
                "finetune_epochs_run": fit.epochs_run if tuned else None,
                "finetune_lr": fit.lr, "finetune_seconds": fit.seconds, "peak_memory_bytes": fit.peak_memory_bytes}
        self._save_cached(path, model, info, key)
        return model, info


BUDGET_COLUMNS = ("lr", "batch_size", "finetune_lr_scale", "schedule", "patience", "weight_decay", "threads", "compile",
                  "bn_recalibration")


def budget_columns(spec: RunSpec) -> dict:
    """What a row records of its budget and options, so the report never groups different budgets."""
    cols = {k: spec.train.get(k) for k in BUDGET_COLUMNS if k != "threads"}
    for k in ("dataset_options", "basis_options"):
        cols[k] = json.dumps(getattr(spec, k), sort_keys=True)
    kind = model_specs.MODELS.lookup(spec.model)
    cols["model_options"] = json.dumps(kind.group_options(spec.model_options), sort_keys=True)
    return cols


def nondefault_config(method: str, config: dict, cls: type | None = None) -> str | None:
    """JSON of the hyperparameters in ``config`` that differ from the method's defaults (``{}``: all
    defaults), so the report shows ``K=16`` without loading the plugin; None if the method is unknown."""
    import dataclasses

    try:
        cls = cls or method_class(method)
        if is_pipeline_class(cls):  # per stage, flattened as stage.option (prune.ratio=2)
            flat = {}
            for c in cls.stage_classes:
                sub = nondefault_config(c.name, config.get(c.name, {}), c)
                flat.update({f"{c.name}.{k}": v for k, v in json.loads(sub).items()})
            return json.dumps(flat, default=str)
        fields = dataclasses.fields(cls.Config)
    except Exception:
        return None
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in fields if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}

    def same(a, b) -> bool:
        return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)

    return json.dumps({k: v for k, v in sorted(config.items()) if k not in defaults or not same(v, defaults[k])},
                      default=str)


def _metric_is_bad(x: float) -> bool:
    return x is None or not math.isfinite(x)


def run_one(spec: RunSpec, env: RunEnv) -> dict:
    """Execute one run and return its results row (status ok | diverged; exceptions propagate).

    Every row carries its base model's scores (``dense_*``), the ``dense_ft`` control's scores
    (``control_*``) and its own; ``metric_delta`` is against the control, ``dense_delta`` against
    the un-fine-tuned base."""
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    torch.set_num_threads(int(spec.train.get("threads", torch.get_num_threads())))
    method = method_class(spec.method)(**spec.method_config)
    ds, splits = env.splits(spec)
    trainer = env.trainer(spec, ds, splits)
    row = {"run_id": spec.run_id, "sweep": spec.sweep, "dataset": spec.dataset, "task": ds.task,
           "model": spec.model, "basis": spec.basis, "method": spec.method,
           "method_config": json.dumps(spec.method_config, sort_keys=True), "seed": spec.seed,
           "metric_name": trainer.metric_name, "metric_direction": "higher" if trainer.higher_is_better else "lower",
           "method_config_nondefault": nondefault_config(spec.method, method.config_dict()),
           "epochs": spec.train["epochs"],
           "finetune_epochs": spec.train["finetune_epochs"], "device": str(env.device),
           "host": socket.gethostname(), "torch_version": torch.__version__, "git_sha": env.sha,
           "started_at": started, "python": platform.python_version(), "threads": torch.get_num_threads(),
           **budget_columns(spec)}
    row.update(model_specs.MODELS.lookup(spec.model).provenance(model_specs.model_options(spec.model,
                                                                                          spec.model_options)))

    base, base_info = env.trained(spec, ds, trainer)
    row["dense_metric"] = base_info.get("test_metric")
    if row["dense_metric"] is None:  # a cache written before the score was kept in it
        row["dense_metric"] = trainer.evaluate(base, "test")
    row["dense_val_metric"] = base_info["best_val"]
    dense_file_bytes = base_info.get("file_bytes") or export_model(copy.deepcopy(base).cpu(),
                                                                   env.out / "cache" / "dense-reference.kanb")
    control, control_info = env.control(spec, trainer, base)
    row["control_metric"], row["control_val_metric"] = control_info["test_metric"], control_info["val_metric"]
    is_control = getattr(method, "is_control", False)
    if is_control:  # the dense_ft row is the cached control itself (same model as the control_* columns)
        model, info = control, base_info
    elif method.trains_own_model():
        model, info = env.trained(spec, ds, trainer, method)
    else:
        model, info = copy.deepcopy(base), base_info
    dense_ref = storage_report(base)  # the uncompressed architecture, even if a method shrinks the model
    del base
    epochs = stage_epochs(spec, method)
    if epochs.by_method:
        row["stage_epochs"] = epochs.epochs  # `epochs` stays the sweep's budget (the group key)
    row.update(train_seconds=info["train_seconds"], params_trainable=info["params_trainable"],
               optimizer_state_bytes=info["optimizer_state_bytes"], best_epoch=info.get("best_epoch"),
               epochs_run=info.get("epochs_run"))

    ctx = env.context(spec, trainer, env.device)
    t0 = time.perf_counter()
    if is_control:
        finetunes = [control_info]
    else:
        seed_everything(ctx.seed)
        method.compress(model, ctx)
        finetunes = [{"finetune_best_epoch": f.best_epoch, "finetune_epochs_run": f.epochs_run, "finetune_lr": f.lr,
                      "peak_memory_bytes": f.peak_memory_bytes} for f in ctx.finetunes]
    row["compress_seconds"] = time.perf_counter() - t0
    if is_control:  # its fine-tune ran once, when the control was cached
        row["compress_seconds"] = control_info.get("finetune_seconds", row["compress_seconds"])
    last = finetunes[-1] if finetunes else {}
    row.update(finetune_best_epoch=last.get("finetune_best_epoch"), finetune_epochs_run=last.get("finetune_epochs_run"),
               finetune_lr=last.get("finetune_lr"))
    row["peak_memory_bytes"] = max([info["peak_memory_bytes"]] + [f["peak_memory_bytes"] for f in finetunes])
    row["peak_memory_kind"] = "cuda_max_allocated" if env.device.type == "cuda" else "step_tensors"
    recal = int(spec.train.get("bn_recalibration", 0))
    if recal and not is_control and not getattr(method, "untouched", False) and batchnorms(model):
        # BatchNorm statistics of the compressed weights (the control's and the base's are their own training's)
        before = trainer.evaluate(model, "val")
        trainer.recalibrate_batchnorm(model, recal, ctx.seed)
        ctx.result.details.update(val_before_bn_recalibration=before, bn_recalibration_batches=recal)
    model.eval()

    row["val_metric"] = trainer.evaluate(model, "val")
    row["metric"] = trainer.evaluate(model, "test")  # the one test evaluation of this run
    row["metric_delta"] = row["metric"] - row["control_metric"]
    row["dense_delta"] = row["metric"] - row["dense_metric"]

    rep = storage_report(model)
    row.update(stored_bits=rep.stored_bits, dense_bits=dense_ref.dense_bits,
               compression_ratio=dense_ref.dense_bits / rep.stored_bits, coef_stored_bits=rep.coef_stored_bits,
               coef_dense_bits=dense_ref.coef_dense_bits,
               coef_compression_ratio=dense_ref.coef_dense_bits / rep.coef_stored_bits,
               params_total=sum(it.count for _, it in rep.items), arch=model_specs.arch_string(model),
               requested_ratio=ctx.result.requested_ratio,
               theoretical_speedup=ctx.result.theoretical_speedup)
    path = env.out / "models" / f"{spec.run_id}.kanb"
    row["file_bytes"] = export_model(model.cpu(), path)
    row["header_bytes"] = header_bytes(path)
    row["zstd_file_bytes"] = zstd_bytes(path)
    row["dense_file_bytes"] = dense_file_bytes
    row["file_compression_ratio"] = dense_file_bytes / row["file_bytes"]
    reloaded = load_model(path)
    x_check = splits.x_test[:256].cpu()
    with torch.no_grad():
        row["reload_max_abs_diff"] = float((reloaded(x_check) - model(x_check)).abs().max())
    row.update(onnx_row(reloaded, path.with_suffix(".onnx"), x_check))  # the deployable graph, checked
    row["runtime_bytes"] = held_bytes(compact(reloaded, inplace=True))  # what the deployed PyTorch model holds
    row["info"] = json.dumps(ctx.result.details, sort_keys=True, default=str)
    row["status"] = "diverged" if _metric_is_bad(row["metric"]) else "ok"
    row["error"] = "non-finite test metric" if row["status"] == "diverged" else None
    row["features"] = features_path()  # what computed the KAN features: "compiled" or "eager" (same values)
    row["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return row


def failed_row(spec: RunSpec, status: str, error: str) -> dict:
    return {"run_id": spec.run_id, "sweep": spec.sweep, "dataset": spec.dataset, "model": spec.model,
            "basis": spec.basis, "method": spec.method, "method_config": json.dumps(spec.method_config, sort_keys=True),
            "method_config_nondefault": nondefault_config(spec.method, spec.method_config), "seed": spec.seed,
            "status": status, "error": error, "epochs": spec.train["epochs"],
            "finetune_epochs": spec.train["finetune_epochs"], **budget_columns(spec), "host": socket.gethostname(),
            "torch_version": torch.__version__, "git_sha": git_sha(),
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


def error_text(exc: BaseException) -> str:
    """One line for a failed run: a UserError's message alone (it says what to change), otherwise
    the exception and the last lines of its traceback."""
    if isinstance(exc, UserError):
        return f"UserError: {exc}"
    tb = traceback.format_exc(limit=3).strip().splitlines()
    return f"{type(exc).__name__}: {exc} | {' / '.join(tb[-3:])}"


def error_row(spec: RunSpec, exc: BaseException) -> dict:
    """The results row of a run that raised: ``diverged`` for a non-finite loss, ``infeasible`` for a
    setting the model cannot meet (:class:`bench.errors.Infeasible`), else ``failed`` with the full
    traceback in the row file (``traceback``; ``error`` is its one-line summary)."""
    if isinstance(exc, Diverged):
        return failed_row(spec, "diverged", str(exc))
    if isinstance(exc, Infeasible):
        return failed_row(spec, "infeasible", str(exc))
    row = failed_row(spec, "failed", error_text(exc))
    if not isinstance(exc, UserError):
        row["traceback"] = "".join(traceback.format_exception(exc))
    return row


def not_ok_lines(sweep: Sweep, out: Path, limit: int = 20) -> list[str]:
    """The end-of-sweep table: every run of ``sweep`` whose row is failed, diverged or infeasible,
    with its one-line reason and the row file holding the full error (empty if all are ok)."""
    rows = {r["run_id"]: r for r in ResultsStore(out, warn=lambda _m: None).rows()}
    bad = [(rows[s.run_id], s) for s in sweep.runs if s.run_id in rows and rows[s.run_id]["status"] != "ok"]
    if not bad:
        return []
    counts = {st: sum(r["status"] == st for r, _ in bad) for st in ("failed", "diverged", "infeasible")}
    lines = [f"runs not ok: {', '.join(f'{n} {st}' for st, n in counts.items() if n)} "
             "(status, run, reason, row file with the full error):"]
    for row, spec in bad[:limit]:
        reason = " ".join(str(row.get("error") or "").split())
        reason = reason if len(reason) <= 110 else reason[:109] + "…"
        lines.append(f"  {row['status']:10s} {spec.label()}  {reason}  -> {out / 'rows' / (spec.run_id + '.json')}")
    if len(bad) > limit:
        lines.append(f"  … and {len(bad) - limit} more: see the status and error columns of {out / 'runs.csv'}")
    return lines


def check_data(sweep: Sweep, data_dir: Path) -> None:
    """Fail fast (UserError) if any dataset of the sweep cannot be had offline."""
    for name, opts in sweep.datasets.items():
        get_dataset(name, **opts).check_available(Path(data_dir))


def run_sweep(sweep: Sweep, out: str | Path, data_dir: str | Path, quiet: bool = False,
              device: str | None = None, log=print) -> dict:
    """Plan the sweep (:func:`bench.run.plan.plan_sweep`) and run the plan in this process (the
    ``local`` backend), holding the folder's writer lock; returns counts by status."""
    with results_writer(out):
        return run_plan(plan_sweep(sweep, Path(out)), data_dir, quiet, device, log)


def run_plan(plan: Plan, data_dir: str | Path, quiet: bool = False, device: str | None = None,
             log=print) -> dict:
    """The ``local`` backend: every run of ``plan`` in sweep order, each training (or loading) the
    cached models it needs; every row is stored the moment its run ends. Returns counts by status."""
    out = plan.out
    store = ResultsStore(out)
    store.remove_partial_writes()
    env = RunEnv(out, data_dir, device or plan.sweep.device, progress=not quiet)
    counts = plan.counts()
    plan.announce(f"on {env.device}", log, quiet)
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan.runs), desc="runs", unit="run")
    for spec in plan.runs:
        if bar is not None:
            bar.set_postfix_str(spec.label()[:80])
        try:
            row = run_one(spec, env)
        except Exception as exc:  # a failed run is recorded and the sweep goes on
            row = error_row(spec, exc)
        store.add(row)
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    store.flush()
    os.makedirs(out, exist_ok=True)
    return counts
