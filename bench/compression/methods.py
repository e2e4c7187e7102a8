"""The compression-method interface and its registry.

A method is one file under ``methods/``::

    @register_method("mymethod")
    class MyMethod(Method):
        '''One line saying what it does.'''

        @dataclass
        class Config:                       # validated hyperparameters (bench.config)
            K: int = field(default=16, metadata={"min": 2})

        grid = {"K": [4, 16, 64]}           # what a sweep with grid=true expands
        test_config = {"K": 4}              # tiny setting the generated tests use

        def prepare(self, model):           # before training (re-parameterise); optional
            ...
        def compress(self, model, ctx):     # after training; optional
            ...

Methods that override ``prepare`` are trained from scratch in their own form; the trained
model is cached by ``stage_key()`` (the config fields listed in ``stage_fields``), so a sweep
over post-training knobs reuses one trained model. Methods that do not override ``prepare``
compress the cached dense base model of the same (dataset, model, basis, seed).
``compress`` gets a :class:`CompressContext` with the data, the trainer and the fine-tune
budget; it swaps layer sources (:mod:`bench.model.sources`) and may fine-tune with ``ctx.finetune``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from bench.config import build_config, to_dict
from bench.registry import Registry

METHODS = Registry("method")
DEFAULT_FINETUNE_LR_SCALE = 0.1  # the sweep's default finetune_lr_scale (bench.run.sweep.TrainBudget)


register_method = METHODS.register


def get_method_class(name: str) -> type[Method]:
    return METHODS.lookup(name)


@dataclass
class CompressResult:
    """What a method reports beside the compressed model; the runner writes it on the run's row."""

    theoretical_speedup: float = 1.0  # forward FLOPs of the dense model / of the compressed one
    requested_ratio: float | None = None  # the compression ratio the configuration asked for, if it names one
    details: dict = dataclasses.field(default_factory=dict)  # method-specific numbers: the row's ``info`` (JSON)


@dataclass
class CompressContext:
    """What ``Method.compress`` may use."""

    trainer: Any  # bench.run.train.Trainer (data splits, evaluate, fit)
    finetune_epochs: int
    seed: int
    device: Any
    finetune_lr: float | None = None  # the shared rule: the sweep's finetune_lr_scale * lr (None: 0.1 * lr)
    result: CompressResult = dataclasses.field(default_factory=lambda: CompressResult())  # what the method reports
    finetunes: list = dataclasses.field(default_factory=list)  # FitResult of every ctx.finetune call

    def __post_init__(self):
        if self.finetune_lr is None:
            self.finetune_lr = DEFAULT_FINETUNE_LR_SCALE * self.trainer.lr

    @property
    def splits(self):
        return self.trainer.splits

    @property
    def finetune_scale(self) -> float:
        """The shared rule's fine-tune rate as a fraction of the training rate (``finetune_lr_scale``):
        methods with their own training rates (MetaKAN's embeddings) scale those by it."""
        return self.finetune_lr / self.trainer.lr if self.trainer.lr else 1.0

    def calibration_batch(self, n: int) -> torch.Tensor:
        """``n`` training inputs drawn without replacement, the same ones for the same seed (the
        calibration data of post-training methods: pruning attribution, quantiser clipping)."""
        x = self.splits.x_train
        g = torch.Generator().manual_seed(self.seed)
        return x[torch.randperm(x.shape[0], generator=g)[:n].to(x.device)]

    def finetune(self, model: nn.Module, param_groups: list[dict] | None = None, epochs: int | None = None,
                 lr: float | None = None, desc: str = "finetune"):
        """Fine-tune with the shared budget: up to ``finetune_epochs`` (unless ``epochs`` is given)
        at peak rate ``finetune_lr`` (unless ``lr`` is given; groups may carry ``lr_scale``
        multiples of it) under the sweep's schedule and patience, selecting the best epoch on
        validation (epoch 0, no fine-tuning, is a candidate: ``best_epoch == 0`` means the
        fine-tune changed nothing, and the row says so)."""
        epochs = self.finetune_epochs if epochs is None else epochs
        result = self.trainer.fit(model, epochs, param_groups=param_groups,
                                  lr=self.finetune_lr if lr is None else lr, desc=desc)
        if epochs > 0:  # a budget of 0 epochs is no fine-tune (the row's finetune_* columns stay empty)
            self.finetunes.append(result)
        return result


def control_finetune(model: nn.Module, ctx: CompressContext):
    """The ``dense_ft`` control: every trainable parameter fine-tuned with the shared budget. The runner
    applies it once per base model (cached); ``methods/dense_ft.py`` is the same call as a method."""
    return ctx.finetune(model, desc="dense_ft control")


class Method:
    name: ClassVar[str] = "?"

    @dataclass
    class Config:
        pass

    grid: ClassVar[dict[str, list]] = {}
    test_config: ClassVar[dict] = {}
    stage_fields: ClassVar[tuple[str, ...]] = ()
    uses_finetune: ClassVar[bool] = True  # False: never fine-tunes (a pipeline gives it no share of the budget)
    last_stage_only: ClassVar[bool] = False  # True: nothing may train after it (only last-stage methods follow it)
    needs_previous_stage: ClassVar[bool] = False  # True: only a later stage of a pipeline (entropy_code)
    test_previous_stage: ClassVar[str | None] = None  # with needs_previous_stage: what the generated tests put first
    in_all: ClassVar[bool] = True  # False: a sweep's methods = ["all"] leaves it out (a stage meant for pipelines)

    def __init__(self, **hyperparameters):
        self.config = build_config(self.Config, hyperparameters, f"method {self.name!r}")

    # -- identity -------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return to_dict(self.config)

    @classmethod
    def trains_own_model(cls) -> bool:
        """True if ``prepare`` is overridden (the method trains from scratch in its own form)."""
        return cls.prepare is not Method.prepare

    def stage_key(self) -> dict:
        """Config fields that change the trained model (before ``compress``)."""
        cfg = self.config_dict()
        return {"method": self.name, **{k: cfg[k] for k in self.stage_fields}}

    def train_epochs(self) -> int | None:
        """Epochs for training the prepared model (None: the sweep's ``epochs``)."""
        return None

    def finetune_epochs(self, budget: int) -> int:
        """Epochs this method fine-tunes in ``compress`` out of the sweep's ``budget`` (at most; for the
        dry run's estimate, :mod:`bench.run.estimate`): the whole budget unless the method says less."""
        return budget if self.uses_finetune else 0

    # -- hooks ----------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        """Before training: re-parameterise the model (swap in trainable sources)."""

    def param_groups(self, model: nn.Module) -> list[dict] | None:
        """Optimiser groups for training the prepared model (None: every trainable parameter
        at the sweep's learning rate)."""
        return None

    def compress(self, model: nn.Module, ctx: CompressContext) -> None:
        """After training: compress in place (swap sources, fine-tune)."""
