"""Sweep files: TOML in, a validated list of runs out.

A sweep names what to cross (every key optional; the CLI overrides any of them)::

    name = "quick"
    datasets = ["digits", "eq_exp_sin"]
    models   = ["kan"]
    bases    = ["bspline", "rbf"]
    methods  = ["all"]          # "all" = every registered method (but those only meant as a pipeline stage)
    seeds    = [0]
    grid     = false            # true: expand each method's declared grid
    device   = "auto"

    [train]                     # the budget every method gets
    epochs = 30
    finetune_epochs = 2
    batch_size = 64
    lr = 1e-3

    [dataset.eq_exp_sin]        # dataset options, per-dataset [train] overrides, and
    n_train = 1000              # `hidden` (this dataset's KAN hidden widths)
    epochs = 200
    hidden = [5]

    [dataset.feynman_I_6_2]     # a model file as the base (bench.interop.base_model): not trained;
    base_model = "pykan_seed{seed}.kanb"   # {seed}: one file per seed; models and bases come from it

    [dataset.eq_exp_sin.method.prune]   # per-dataset method settings (replace [method.prune]'s keys)
    ratio = [2, 4, 8]                   # e.g. leave out ratios this small model cannot meet

    [[dataset.digits.method.quantize]]  # an array of tables: several grids, their points united
    bits = [4, 2]
    [[dataset.digits.method.quantize]]
    avg_bits = 2.5
    n_seeds = 1                         # these points at the first of the sweep's seeds only

    [model.kan]                 # model options
    hidden = [64]

    [basis.bspline]             # basis options
    grid = 5

    [method.metacluster]        # method hyperparameters; a list gives grid values
    K = [4, 16]

A run is (dataset, model, basis, method, method config, seed) plus the training budget;
``run_id`` hashes all of it, so a rerun with the same sweep finds its finished runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from bench.compression.methods import DEFAULT_FINETUNE_LR_SCALE, METHODS
from bench.compression.pipeline import is_pipeline_class, method_class, parse_entry, split_methods
from bench.config import build_config
from bench.data import DATASETS, get_dataset
from bench.errors import UserError, unknown
from bench.interop.base_model import base_model_spec
from bench.model.bases import BASES, make_basis
from bench.model.kinds import MODELS, compatible, incompatibility, model_options

SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"
TOP_KEYS = {"name", "description", "datasets", "models", "bases", "methods", "seeds", "grid", "device",
            "train", "dataset", "model", "basis", "method"}


@dataclass
class TrainBudget:
    """The budget every method gets (the comparison protocol).

    Every model is trained for up to ``epochs`` at peak rate ``lr`` under ``schedule`` with early
    stopping after ``patience`` epochs without a better validation score, then fine-tuned for up
    to ``finetune_epochs`` at ``finetune_lr_scale * lr`` under the same schedule and patience: the
    ``dense_ft`` control, every post-training method and every method that trains its own model
    (MetaKAN, Slim-KAN) alike. A method may override its fine-tune rate (recorded in the row).
    ``threads`` pins torch's CPU threads, so a run gives the same numbers under every executor.
    """

    epochs: int = field(default=20, metadata={"min": 1})
    finetune_epochs: int = field(default=2, metadata={"min": 0})
    batch_size: int = field(default=64, metadata={"min": 1})
    lr: float = field(default=1e-3, metadata={"min": 0.0})
    finetune_lr_scale: float = field(default=DEFAULT_FINETUNE_LR_SCALE, metadata={
        "min": 0.0, "max": 1.0, "help": "fine-tune peak lr as a fraction of lr (one rule for every method)"})
    schedule: str = field(default="cosine", metadata={"choices": ["cosine", "constant"],
                                                      "help": "learning-rate schedule of training and fine-tune"})
    patience: int = field(default=5, metadata={
        "min": 0, "help": "stop after this many epochs without a better validation score (0: never)"})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    threads: int = field(default=2, metadata={"min": 1, "help": "torch CPU threads per run (pinned)"})
    amp: bool = field(default=False, metadata={"help": "bfloat16 autocast on CUDA (ignored on CPU)"})
    bn_recalibration: int = field(default=0, metadata={
        "min": 0, "help": "after a method compresses, re-estimate BatchNorm statistics on this many training "
                          "batches (0: off); the control and the dense base keep their own"})
    compile: bool | None = field(default=None, metadata={
        "help": "compiled basis features (torch.compile, bench.model.bases.fused_features); unset: wherever a "
                "compiler works (the default; a one-line notice and eager where not), false: always eager. "
                "Either gives the same values up to float rounding"})


TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainBudget)}


@dataclass
class RunSpec:
    """Everything that defines one run (JSON-able: an executor can ship it anywhere)."""

    sweep: str
    dataset: str
    dataset_options: dict
    model: str
    model_options: dict
    basis: str
    basis_options: dict
    method: str
    method_config: dict
    seed: int
    train: dict

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("sweep")
        return d

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def label(self) -> str:
        cfg = ",".join(f"{k}={v}" for k, v in self.method_config.items())
        return f"{self.dataset}/{self.model}/{self.basis}/{self.method}({cfg})/seed{self.seed}"


@dataclass
class Sweep:
    name: str
    runs: list[RunSpec]
    device: str
    skipped: list[str]
    datasets: dict  # name -> options (for availability checks)


def bundled_sweeps() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SWEEPS_DIR.glob("*.toml"))}


def read_sweep_file(path: str | Path | None = None, name: str | None = None) -> dict:
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"sweep file {str(path)!r} not found")
    else:
        sweeps = bundled_sweeps()
        name = name or "quick"
        if name not in sweeps:
            raise unknown("sweep", name, sweeps)
        p = sweeps[name]
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"sweep file {str(p)!r} is not valid TOML: {exc}") from None
    data.setdefault("name", p.stem)
    return data


def _names(value, kind: str, registry: dict, singular: str) -> list[str]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"sweep key {kind!r} must be a list of names, got {value!r}")
    if not value:
        raise UserError(f"no {kind} given (--{kind} or the sweep's {kind!r} is empty); valid: "
                        + ", ".join(sorted(registry)))
    if value == ["all"]:
        return sorted(registry)
    for v in value:
        if v not in registry:
            raise unknown(singular, v, registry)
    return list(dict.fromkeys(value))


def _table(data: dict, key: str) -> dict:
    t = data.get(key, {})
    if not isinstance(t, dict):
        raise UserError(f"sweep key {key!r} must be a table")
    return t


def _method_points(cls, fixed: dict, use_grid: bool) -> list[dict]:
    """Expand a method's grid (declared and/or given as lists in the sweep) into configs; a
    pipeline's points are the product of its stages' points (``fixed``: one table per stage)."""
    if is_pipeline_class(cls):
        cls(**{k: {} for k in fixed})  # checks the stage names
        for k, v in fixed.items():
            if not isinstance(v, dict):
                raise UserError(f"pipeline {cls.name!r}: the options of stage {k!r} must be a table, got {v!r}")
        per_stage = [_method_points(c, fixed.get(c.name, {}), use_grid) for c in cls.stage_classes]
        return [{c.name: p for c, p in zip(cls.stage_classes, combo)} for combo in itertools.product(*per_stage)]
    hints = typing.get_type_hints(cls.Config)
    names = {f.name for f in dataclasses.fields(cls.Config)}
    axes: dict[str, list] = dict(cls.grid) if use_grid else {}
    scalars = {}
    for k, v in fixed.items():
        if k not in names:
            raise UserError(f"method {cls.name!r} has no option {k!r}; valid: {', '.join(sorted(names)) or '(none)'}")
        is_list_type = typing.get_origin(hints[k]) in (list, tuple) or any(
            typing.get_origin(a) in (list, tuple) for a in typing.get_args(hints[k]))
        if isinstance(v, list) and (not is_list_type or (v and isinstance(v[0], list))):
            axes[k] = v
            scalars.pop(k, None)
        else:
            scalars[k] = v
            axes.pop(k, None)
    keys = list(axes)
    points = []
    for combo in itertools.product(*(axes[k] for k in keys)) if keys else [()]:
        overrides = {**scalars, **dict(zip(keys, combo))}
        points.append(cls(**overrides).config_dict())  # validates every point now
    unique = {json.dumps(p, sort_keys=True): p for p in points}
    return list(unique.values())


def _n_seeds(table: dict, where: str) -> int | None:
    """Pop a method table's ``n_seeds`` (run its points at the first n of the sweep's seeds; None: all)."""
    n = table.pop("n_seeds", None)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise UserError(f"{where}: n_seeds must be a positive integer (the first n of the sweep's seeds), got {n!r}")
    return n


def _merge_tables(base: dict, over: dict, pipeline: bool) -> dict:
    """``over``'s keys on top of ``base``'s; a pipeline's stage by stage (its ``n_seeds``, not a stage, as a
    plain key)."""
    if not pipeline:
        return {**base, **over}
    merged = {k: {**base.get(k, {}), **over.get(k, {})} for k in {*base, *over} if k != "n_seeds"}
    n = over.get("n_seeds", base.get("n_seeds"))
    return merged if n is None else {**merged, "n_seeds": n}


def _dataset_points(cls, general: dict | list[dict], per_dataset: dict | list[dict],
                    use_grid: bool) -> list[tuple[dict, int | None]]:
    """A method's configs on one dataset, each with how many of the sweep's seeds it runs at (None: all):
    ``[method.M]`` updated by ``[dataset.D.method.M]``; either may be an array of tables
    (``[[method.M]]``, ``[[dataset.D.method.M]]``): the union of their grids, every general table updated
    by every per-dataset one. A table's ``n_seeds`` runs its points at the first n seeds only (a curve's
    extra points at fewer repetitions); a point two tables give runs at the larger of their counts."""
    unique: dict[str, tuple[dict, int | None]] = {}
    for base in general if isinstance(general, list) else [general]:
        for table in per_dataset if isinstance(per_dataset, list) else [per_dataset]:
            merged = _merge_tables(base, table, is_pipeline_class(cls))
            n = _n_seeds(merged, f"method {cls.name!r}")
            for p in _method_points(cls, merged, use_grid):
                key = json.dumps(p, sort_keys=True)
                if key in unique:
                    old = unique[key][1]
                    n_p = None if old is None or n is None else max(old, n)
                else:
                    n_p = n
                unique[key] = (p, n_p)
    return list(unique.values())


def _method_entries(value) -> dict[str, tuple[str, dict]]:
    """The sweep's ``methods``: entry text -> (method or pipeline name, inline options), in order
    (``all``: every registered method; an entry may be ``kmeans(K=8)`` or ``prune(ratio=2)>kmeans``,
    see :mod:`bench.compression.pipeline`)."""
    if isinstance(value, str):
        value = split_methods(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"sweep key 'methods' must be a list of names, got {value!r}")
    if not value:
        raise UserError("no methods given (--methods or the sweep's 'methods' is empty); valid: "
                        + ", ".join(sorted(METHODS)) + ", or pipelines a>b of them")
    if value == ["all"]:  # every registered method meant to stand alone (not small_dtype, a pipeline's last stage)
        value = sorted(name for name, cls in METHODS.items() if cls.in_all)
    return {v.replace(" ", ""): parse_entry(v) for v in value}


def _entry_points(name: str, inline: dict, general, per_dataset, use_grid: bool) -> list[tuple[dict, int | None]]:
    """The configs of one ``methods`` entry: its method table(s), each with its inline options on top
    (``kmeans(K=8)`` sets K in every ``[[method.kmeans]]`` table; a pipeline's stage by stage)."""
    cls = method_class(name)
    if inline:
        pipeline = is_pipeline_class(cls)
        general = [_merge_tables(t, inline, pipeline) for t in (general if isinstance(general, list) else [general])]
        per_dataset = [_merge_tables(t, inline, pipeline)
                       for t in (per_dataset if isinstance(per_dataset, list) else [per_dataset])]
    return _dataset_points(cls, general, per_dataset, use_grid)


def _check_pairs(datasets: list[str], models: list[str], ds_objs: dict) -> None:
    """Every model and every dataset asked for must run at least once: a model (convkan) that pairs
    with none of the datasets, or a dataset with none of the models, is a mistake named by its pairs.
    A sweep where only some pairs are incompatible skips those (and the CLI says which)."""
    for kind, name, pairs in [("model", m, [(d, m) for d in datasets]) for m in models] + \
                             [("dataset", d, [(d, m) for m in models]) for d in datasets]:
        reasons = [incompatibility(m, ds_objs[d]) for d, m in pairs]
        if all(reasons):
            raise UserError(f"nothing to run for {kind} {name!r}: " + "; ".join(dict.fromkeys(reasons)))


def build_sweep(data: dict, overrides: dict | None = None) -> Sweep:
    """Validate a sweep dict (plus CLI overrides) and expand it into runs."""
    data = dict(data)
    for k in data:
        if k not in TOP_KEYS:
            raise UserError(f"unknown sweep key {k!r}; valid: {', '.join(sorted(TOP_KEYS))}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    train_over = {k: overrides.pop(k) for k in list(overrides) if k in TRAIN_KEYS}
    base_over = overrides.pop("base_model", None)  # --base-model: every dataset's base
    data.update(overrides)
    name = str(data.get("name", "sweep"))
    datasets = _names(data.get("datasets", ["digits"]), "datasets", DATASETS, "dataset")
    trainable_models = {k: v for k, v in MODELS.items() if not v.given}  # "imported": a dataset's base_model
    models = _names(data.get("models", ["kan"]), "models", trainable_models, "model")
    bases = _names(data.get("bases", ["bspline"]), "bases", BASES, "basis")
    methods = _method_entries(data.get("methods", ["all"]))
    seeds = data.get("seeds", [0])
    if isinstance(seeds, int):
        seeds = [seeds]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise UserError(f"seeds must be a list of non-negative integers, got {seeds!r}")
    if not seeds:
        raise UserError("no seeds given (--seeds or the sweep's 'seeds' is empty); give e.g. 0 or 0,1,2")
    device = data.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device {device!r} is not allowed; valid: auto, cpu, cuda")
    use_grid = data.get("grid", False)
    if not isinstance(use_grid, bool):
        raise UserError(f"sweep key 'grid' must be true or false, got {use_grid!r}")

    base_train = {**_table(data, "train"), **train_over}
    build_config(TrainBudget, base_train, "sweep [train]")
    dtables, mtables = _table(data, "dataset"), _table(data, "model")
    btables, meth_tables = _table(data, "basis"), _table(data, "method")
    for kind, tables, reg in (("dataset", dtables, DATASETS), ("model", mtables, MODELS),
                              ("basis", btables, BASES)):
        for key in tables:
            if key not in reg:
                raise unknown(kind, key, reg)
    for key, value in meth_tables.items():
        method_class(key)  # a method or a pipeline (UserError otherwise)
        if not isinstance(value, dict) and not (isinstance(value, list) and value
                                                and all(isinstance(v, dict) for v in value)):
            raise UserError(f"sweep key 'method.{key}' must be a table or an array of tables")

    ds_objs, ds_opts, ds_train, ds_hidden, ds_methods, ds_base = {}, {}, {}, {}, {}, {}
    for d in datasets:
        table = dict(dtables.get(d, {}))
        tr = {k: table.pop(k) for k in list(table) if k in TRAIN_KEYS}
        base = table.pop("base_model", None) if base_over is None else base_over
        table.pop("base_model", None)
        if base is not None:
            if not isinstance(base, str) or not base:
                raise UserError(f"sweep key 'dataset.{d}.base_model' must be a model file path, got {base!r}")
            ds_base[d] = base
        if "hidden" in table:  # per-dataset KAN widths (equation tasks want narrower KANs than images)
            ds_hidden[d] = table.pop("hidden")
        ds_methods[d] = table.pop("method", {})  # per-dataset method settings
        if not isinstance(ds_methods[d], dict):
            raise UserError(f"sweep key 'dataset.{d}.method' must be a table of method tables")
        for key, value in ds_methods[d].items():
            method_class(key)
            if not isinstance(value, dict) and not (isinstance(value, list) and value
                                                    and all(isinstance(v, dict) for v in value)):
                raise UserError(f"sweep key 'dataset.{d}.method.{key}' must be a table or an array of tables")
        ds_objs[d] = get_dataset(d, **table)
        ds_opts[d] = table
        ds_train[d] = dataclasses.asdict(build_config(TrainBudget, {**base_train, **tr}, f"sweep [dataset.{d}]"))
        if train_over:  # CLI flags beat per-dataset settings
            ds_train[d].update(train_over)
        # unset / off: left out, so run ids and caches match earlier ones (an explicit compile = true or false
        # stays: the conv sweep's ids have it, and false is how a run asks for the eager path)
        if ds_train[d]["compile"] is None:
            del ds_train[d]["compile"]
        if not ds_train[d]["bn_recalibration"]:
            del ds_train[d]["bn_recalibration"]
    mo = {m: dataclasses.asdict(model_options(m, mtables.get(m, {}))) for m in models}
    bo = {}
    for b in bases:
        opts = btables.get(b, {})
        make_basis(b, 2, **opts)  # validates the options
        bo[b] = dict(opts)
    points = {(d, entry): _entry_points(name, inline, meth_tables.get(name, {}), ds_methods[d].get(name, {}),
                                        use_grid)
              for d in datasets for entry, (name, inline) in methods.items()}

    trained = [d for d in datasets if d not in ds_base]
    if trained:
        _check_pairs(trained, models, ds_objs)
    runs, skipped = [], []
    for d, meth, seed in itertools.product([d for d in datasets if d in ds_base], methods, seeds):
        m_opts, b, b_opts = base_model_spec(ds_base[d], ds_objs[d], seed)
        for cfg, n in points[(d, meth)]:
            if n is None or seed in seeds[:n]:
                runs.append(RunSpec(name, d, ds_opts[d], "imported", m_opts, b, b_opts, methods[meth][0], cfg, seed,
                                    ds_train[d]))
    for d, m, b, meth, seed in itertools.product(trained, models, bases, methods, seeds):
        if not compatible(m, ds_objs[d]):
            skipped.append(f"{d}/{m}")
            continue
        m_opts = mo[m]
        if d in ds_hidden and MODELS[m].takes_hidden():
            m_opts = dataclasses.asdict(model_options(m, {**mtables.get(m, {}), "hidden": ds_hidden[d]}))
        for cfg, n in points[(d, meth)]:
            if n is None or seed in seeds[:n]:
                runs.append(RunSpec(name, d, ds_opts[d], m, m_opts, b, bo[b], methods[meth][0], cfg, seed,
                                    ds_train[d]))
    return Sweep(name, runs, device, sorted(set(skipped)), ds_opts)
