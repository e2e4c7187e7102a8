"""Pipelines: a chain of methods applied in order, each stage compressing the previous stage's model.

**Syntax.** A pipeline is named by its stages joined with ``>``: ``prune>kmeans`` prunes the model,
then clusters the surviving edges. Each stage has its own config:

- in a sweep file, under the pipeline's method table, one sub-table per stage (a list is a grid
  axis, as for a single method; the pipeline's points are the product of its stages' points)::

      methods = ["dense_ft", "prune>kmeans"]
      [method."prune>kmeans".prune]
      ratio = [2, 4]
      [method."prune>kmeans".kmeans]
      K = 16

- inline, in a sweep's ``methods`` list or on the command line, options in parentheses after each
  stage (TOML literals; a list is a grid axis, as in a table)::

      python -m bench run --methods "dense_ft,prune(ratio=[2,4])>kmeans(K=16)>entropy_code"

  ``kmeans(K=8)`` (one stage) is the method ``kmeans`` with ``K = 8``.

**Which chains.** Only post-training methods (those that do not override ``Method.prepare``) may
follow the first stage; a method that trains its own model (``metakan``, ``metacluster``, …) may only
be the first stage, and a stage may appear once. Anything else is a :class:`~bench.errors.UserError`
raised while the sweep is built, before any training.

**Identity.** A pipeline of one stage is the method itself (same name, same config, same run id). A
longer one is its own method: ``method = "prune>kmeans"``, ``method_config = {"prune": {...},
"kmeans": {...}}`` (every stage's full config), so grouping, caching and the leaderboard treat it
as one method named ``prune>kmeans``. Its stage-1 model is the first stage's (``stage_key``,
``train_epochs``, ``prepare``, ``param_groups`` are the first stage's), so ``metacluster>kmeans``
reuses ``metacluster``'s cached trained model.

**Fine-tune budget (the comparison protocol).** The whole chain shares the one budget every single
method gets, the sweep's ``finetune_epochs``: it is split evenly over the stages, the remainder going
to the last stages (2 epochs over 2 stages: 1 each; 2 over 3 stages: 0, 1, 1). A stage whose own
config fixes its fine-tune epochs (``kmeans``' ``finetune_epochs``) uses them, as it would alone.
A stage that never fine-tunes (``uses_finetune = False``: ``small_dtype``, ``entropy_code``) takes no
share. A stage marked ``last_stage_only`` (``small_dtype``, ``entropy_code``: nothing may train after
it) may be followed only by other such stages (``kmeans>entropy_code>small_dtype``), and one marked
``needs_previous_stage`` (``entropy_code``, which codes the integers an earlier stage leaves) cannot
be a method on its own or a first stage.

**Storage** is counted once, on the final model (the runner's usual storage report and export).
The row's ``info`` keeps each stage's details under ``stages``; ``requested_ratio`` is the first
stage's that names one, ``theoretical_speedup`` the product of the stages'.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from typing import ClassVar

from bench.errors import UserError, unknown

from .methods import METHODS, CompressContext, CompressResult, Method

SEP = ">"


def is_pipeline(name: str) -> bool:
    return SEP in name


def stage_names(name: str) -> list[str]:
    return [s.strip() for s in name.split(SEP)]


class Pipeline(Method):
    """A chain of methods (built by :func:`method_class`; never registered)."""

    stage_classes: ClassVar[tuple[type[Method], ...]] = ()

    @dataclass
    class Config:
        pass

    def __init__(self, **config):
        names = [c.name for c in self.stage_classes]
        extra = sorted(set(config) - set(names))
        if extra:
            raise UserError(f"pipeline {self.name!r} has no stage {extra[0]!r}; its stages: {', '.join(names)} "
                            f"(give each stage's options under its own name)")
        for k, v in config.items():
            if not isinstance(v, dict):
                raise UserError(f"pipeline {self.name!r}: the options of stage {k!r} must be a table, got {v!r}")
        self.stages = [cls(**config.get(cls.name, {})) for cls in self.stage_classes]
        self.config = None

    def config_dict(self) -> dict:
        return {s.name: s.config_dict() for s in self.stages}

    @classmethod
    def trains_own_model(cls) -> bool:
        return cls.stage_classes[0].trains_own_model()

    def stage_key(self) -> dict:
        return self.stages[0].stage_key()

    def train_epochs(self) -> int | None:
        return self.stages[0].train_epochs()

    def prepare(self, model) -> None:
        self.stages[0].prepare(model)

    def param_groups(self, model):
        return self.stages[0].param_groups(model)

    @staticmethod
    def budget_split(epochs: int, n: int) -> list[int]:
        """The shared fine-tune budget over ``n`` stages: even shares, the remainder to the last ones."""
        base, extra = divmod(int(epochs), n)
        return [base + (1 if j >= n - extra else 0) for j in range(n)]

    def shares(self, epochs: int) -> list[int]:
        """Each stage's fine-tune epochs: the budget split over the stages that fine-tune (a stage
        with ``uses_finetune = False``, such as ``small_dtype``, gets none)."""
        tuning = [s for s in self.stages if s.uses_finetune]
        split = iter(self.budget_split(epochs, max(len(tuning), 1)))
        return [next(split) if s.uses_finetune else 0 for s in self.stages]

    def compress(self, model, ctx: CompressContext) -> None:
        shares = self.shares(ctx.finetune_epochs)
        details, speedup = [], 1.0
        for stage, epochs in zip(self.stages, shares):
            sub = dataclasses.replace(ctx, finetune_epochs=epochs, result=CompressResult(), finetunes=ctx.finetunes)
            stage.compress(model, sub)
            r = sub.result
            speedup *= r.theoretical_speedup
            if ctx.result.requested_ratio is None and r.requested_ratio is not None:
                ctx.result.requested_ratio = r.requested_ratio
            details.append({"method": stage.name, "finetune_epochs": epochs,
                            "theoretical_speedup": r.theoretical_speedup, **r.details})
        ctx.result.theoretical_speedup = speedup
        ctx.result.details["stages"] = details


_PIPELINES: dict[tuple[str, ...], type[Pipeline]] = {}


def method_class(name: str) -> type[Method]:
    """The class of a method or of a pipeline ``a>b>…`` (one stage: the method itself). Unknown
    stages, repeated stages and a stage that trains its own model after the first are UserErrors."""
    if not is_pipeline(name):
        if name not in METHODS:
            raise unknown("method", name, METHODS, "or a pipeline 'a>b' of them (see `python -m bench list`)")
        if METHODS[name].needs_previous_stage:
            raise UserError(f"method {name!r} works on what an earlier stage leaves: use it as a later stage of a "
                            f"pipeline, e.g. \"kmeans>{name}\" or \"prune>quantize>{name}\"")
        return METHODS[name]
    names = stage_names(name)
    classes = []
    for s in names:
        if s not in METHODS:
            raise unknown("method", s, METHODS, f"in pipeline {name!r}")
        classes.append(METHODS[s])
    if len(names) == 1:
        return classes[0]
    if len(set(names)) != len(names):
        raise UserError(f"pipeline {name!r} names a stage twice; each method may appear once in a chain")
    if classes[0].needs_previous_stage:
        raise UserError(f"pipeline {name!r}: method {names[0]!r} works on what an earlier stage leaves, so it "
                        "cannot be the first stage")
    for cls, nxt in zip(classes[:-1], classes[1:]):
        if cls.last_stage_only and not nxt.last_stage_only:
            raise UserError(f"pipeline {name!r}: method {cls.name!r} must be the last stage (nothing may train "
                            f"after it; only {', '.join(sorted(n for n, c in METHODS.items() if c.last_stage_only))} "
                            "may follow it)")
    for cls in classes[1:]:
        if cls.trains_own_model():
            raise UserError(f"pipeline {name!r}: method {cls.name!r} trains its own model, so it can only be the "
                            f"first stage; only post-training methods may follow it")
    key = tuple(names)
    if key not in _PIPELINES:
        doc = "Pipeline " + " > ".join(names) + " (each stage compresses the previous stage's model)."
        _PIPELINES[key] = type(f"Pipeline_{'_'.join(names)}", (Pipeline,),
                               {"name": SEP.join(names), "stage_classes": tuple(classes), "__doc__": doc,
                                "test_config": {c.name: dict(c.test_config) for c in classes}})
    return _PIPELINES[key]


def is_pipeline_class(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, Pipeline)


# ----------------------------------------------------------------------------- parsing the methods list
def split_methods(text: str) -> list[str]:
    """``"a,b(x=1,y=[2,4])>c"`` -> ``["a", "b(x=1,y=[2,4])>c"]``: commas inside parentheses or brackets
    do not split."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [s.strip() for s in out if s.strip()]


def _literal(text: str, where: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if text.replace("_", "").replace("-", "").isalnum():
            return text  # a bare word: a string option (score=magnitude)
        raise UserError(f"cannot read the value {text!r} in {where!r}; write a TOML literal (2, 0.5, true, \"x\")") \
            from None


def _stage_options(stage: str, entry: str) -> tuple[str, dict]:
    stage = stage.strip()
    if "(" not in stage:
        return stage, {}
    if not stage.endswith(")") or stage.count("(") != 1:
        raise UserError(f"cannot read method {entry!r}: write name(option=value,...) for each stage, e.g. "
                        "prune(ratio=2)>kmeans(K=16)")
    name, body = stage[:-1].split("(", 1)
    opts = {}
    for part in split_methods(body):
        if "=" not in part:
            raise UserError(f"cannot read {part!r} in method {entry!r}: options are option=value")
        k, v = part.split("=", 1)
        opts[k.strip()] = _literal(v.strip(), entry)
    return name.strip(), opts


def parse_entry(entry: str) -> tuple[str, dict]:
    """One entry of a ``methods`` list: ``(name, inline options)``. For a single method the options are
    its own (``kmeans(K=8)`` -> ``("kmeans", {"K": 8})``); for a pipeline one table per stage
    (``prune(ratio=2)>kmeans`` -> ``("prune>kmeans", {"prune": {"ratio": 2}})``). The name is checked
    (:func:`method_class`)."""
    parts = [_stage_options(s, entry) for s in split_methods_stages(entry)]
    name = SEP.join(n for n, _ in parts)
    cls = method_class(name)
    if is_pipeline_class(cls):
        return name, {n: o for n, o in parts if o}
    return name, parts[0][1]


def split_methods_stages(entry: str) -> list[str]:
    """Split an entry on ``>`` outside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in entry:
        depth += ch == "("
        depth -= ch == ")"
        if ch == SEP and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


SYNTAX = ("pipelines: chain methods with '>', each stage compressing the previous stage's model and the chain "
          "sharing the one fine-tune budget, e.g. --methods \"prune(ratio=2)>kmeans(K=16)\" or in a sweep file "
          "methods = [\"prune>kmeans\"] with [method.\"prune>kmeans\".prune] ratio = 2 and "
          "[method.\"prune>kmeans\".kmeans] K = 16; only post-training methods may follow the first stage")
