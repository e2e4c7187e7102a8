"""Planning a sweep, once, for every backend: what is finished, what to run, what to train first.

:func:`plan_sweep` reads the results folder (the runs whose rows are ``ok`` or ``infeasible`` are
finished; failed and diverged ones run again) and lists, in sweep order, the runs still to do and
the distinct cached models they need that are not in ``<out>/cache/`` yet:

- the dense base of each (dataset, model, basis, seed, training budget), with the ``dense_ft``
  control of each fine-tune budget (one stage: the control fine-tunes the base);
- every distinct stage-1 model of the methods that train their own (``Method.prepare``), keyed by
  the method's ``stage_key``.

The backends only execute a :class:`Plan`: ``local`` (:func:`bench.run.runner.run_sweep`) runs it in
this process in sweep order, each run training what it needs the first time it is needed; ``ray``
and ``slurm`` (:mod:`bench.run.executors`) train the plan's stages first, then run its runs.

Where a stage is cached (:func:`stage_cache`, :func:`control_cache`) and how many epochs it trains
(:func:`stage_epochs`) are decided here, and only here: the runner's cache and the plan agree by
construction.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from bench.compression.pipeline import method_class

from .results import ResultsStore
from .sweep import RunSpec, Sweep

FINETUNE_KEYS = ("finetune_epochs", "finetune_lr_scale")  # budget keys that do not change a trained stage
POST_KEYS = ("bn_recalibration",)  # applied after a method compresses: neither a trained stage nor the control


class StageEpochs(NamedTuple):
    epochs: int  # how many epochs the stage's model trains
    by_method: bool  # the method set them (``Method.train_epochs``), not the sweep's ``epochs``


def stage_epochs(spec: RunSpec, method=None) -> StageEpochs:
    """The epochs the trained model of this spec's stage gets: a method that trains its own model
    may set them (``train_epochs()``); otherwise, and for the dense base (``method`` None), the
    sweep's ``epochs``. The one place this is decided (cache keys, training and rows read it)."""
    own = method.train_epochs() if method is not None and method.trains_own_model() else None
    if own is None:
        return StageEpochs(int(spec.train["epochs"]), False)
    return StageEpochs(int(own), True)


def _digest(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_cache(spec: RunSpec, method=None) -> tuple[dict, str]:
    """(key, file name under ``<out>/cache/``) of the trained model of this spec's stage: the dense
    base (``method`` None) or the method's own trained form. The fine-tune budget is not part of it."""
    stage = method.stage_key() if method is not None else {"method": "dense"}
    key = {k: v for k, v in spec.identity().items() if k not in ("method", "method_config")}
    key["train"] = {k: v for k, v in spec.train.items() if k not in FINETUNE_KEYS + POST_KEYS}
    key["train"]["epochs"] = stage_epochs(spec, method).epochs
    key["stage"] = stage
    return key, f"{stage['method']}-{_digest(key)}.pt"


def control_cache(spec: RunSpec) -> tuple[dict, str]:
    """(key, file name under ``<out>/cache/``) of the ``dense_ft`` control of this spec's base:
    the base's key plus the fine-tune budget."""
    key, _ = stage_cache(spec)
    key["finetune"] = {k: spec.train.get(k) for k in FINETUNE_KEYS}
    return key, f"dense_ft-{_digest(key)}.pt"


@dataclass(frozen=True, eq=False)
class Stage:
    """One cached model (or two: the dense base and its control) that runs of the plan need."""

    key: str  # what identifies it (JSON of its cache key; the control's for the dense stage)
    spec: RunSpec  # the first run of the plan that needs it
    own: bool  # a method's own stage-1 model (else the dense base and its dense_ft control)
    files: tuple[str, ...]  # the files it writes under <out>/cache/

    @property
    def what(self) -> str:
        return "stage-1 model" if self.own else "dense base model"


def stages_of(spec: RunSpec) -> list[Stage]:
    """The cached models ``spec`` needs: the dense base with its control, then the method's own
    stage-1 model if it trains one."""
    _, base = stage_cache(spec)
    control_key, control = control_cache(spec)
    out = [Stage(json.dumps(control_key, sort_keys=True, default=str), spec, False, (base, control))]
    cls = method_class(spec.method)
    if cls.trains_own_model():
        key, name = stage_cache(spec, cls(**spec.method_config))
        out.append(Stage(json.dumps(key, sort_keys=True, default=str), spec, True, (name,)))
    return out


@dataclass
class Plan:
    """What a backend executes: ``runs`` (not finished, in sweep order), ``stages`` (cached models
    not yet on disk, by key, in the order runs first need them) and ``needs`` (run_id -> the keys
    of the stages it waits for)."""

    sweep: Sweep
    out: Path
    runs: list[RunSpec]
    finished: int  # runs of the sweep already finished (skipped)
    stages: dict[str, Stage] = field(default_factory=dict)
    needs: dict[str, set[str]] = field(default_factory=dict)

    def counts(self) -> dict:
        """The counts a backend fills in as rows arrive (``skipped_finished``: the finished ones)."""
        return {"ok": 0, "failed": 0, "diverged": 0, "infeasible": 0, "skipped_finished": self.finished}

    def announce(self, where: str, log, quiet: bool) -> None:
        """The lines a sweep starts with: skipped incompatible pairs, then what is to do ``where``."""
        if quiet:
            return
        if self.sweep.skipped:
            log(f"skipping incompatible dataset/model pairs: {', '.join(self.sweep.skipped)}")
        log(f"sweep {self.sweep.name!r}: {len(self.sweep.runs)} runs, {self.finished} already finished, "
            f"{len(self.runs)} to run {where} -> {self.out}")


def plan_sweep(sweep: Sweep, out: str | Path, store: ResultsStore | None = None) -> Plan:
    """The plan of ``sweep`` on the results folder ``out`` (read only; the caller holds its lock)."""
    out = Path(out)
    done = (store or ResultsStore(out)).finished_ids()
    todo = [r for r in sweep.runs if r.run_id not in done]
    plan = Plan(sweep, out, todo, len(sweep.runs) - len(todo))
    for spec in todo:
        plan.needs[spec.run_id] = set()
        for stage in stages_of(spec):
            if all((out / "cache" / f).exists() for f in stage.files):
                continue
            plan.stages.setdefault(stage.key, stage)
            plan.needs[spec.run_id].add(stage.key)
    return plan
