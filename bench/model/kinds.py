"""Model kinds: how a sweep's model name and options become a KAN for a given dataset.

Each kind is a class registered in :data:`MODELS` (one :class:`~bench.registry.Registry`, as for
methods, datasets, bases and sources) that says, in one place, everything the harness needs to
know about it: its sweep ``Options``, which datasets it takes, how it is built for a dataset,
how it is rebuilt from an exported ``config()``, and how its architecture is written in a row.
No code compares model-kind strings; it asks the kind::

    @register_model("kan")
    class KANModel(ModelKind):
        Options = KANOptions
        def build(self, options, dataset, basis, basis_kwargs): ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from bench.config import build_config
from bench.errors import UserError
from bench.registry import Registry

from .kan import KAN, NORMS, ConvKAN

# ConvKAN options an import sets (a sweep never does); written into config() only when not the default
CONVKAN_OPTIONS = ("act", "pad", "bias", "padding", "head", "head_basis_kwargs", "head_bias", "head_norm", "head_act")

MODELS = Registry("model")
register_model = MODELS.register


class ModelKind:
    """A family of models a sweep can name (``models = ["kan"]``)."""

    name: ClassVar[str] = "?"
    Options: ClassVar[type]  # dataclass of the options a sweep's [model.NAME] table may set
    convolutional: ClassVar[bool] = False  # methods with per-paper defaults for ConvKANs read this
    given: ClassVar[bool] = False  # the base model is read from a file (``pretrained``), not trained from a sweep

    @classmethod
    def options(cls, values: dict | None):
        return build_config(cls.Options, values, f"model {cls.name!r}")

    @classmethod
    def takes_hidden(cls) -> bool:
        """Whether a dataset's ``hidden`` widths apply to this kind (``[dataset.NAME] hidden = ...``)."""
        return "hidden" in {f.name for f in dataclasses.fields(cls.Options)}

    @classmethod
    def incompatibility(cls, dataset) -> str | None:
        """Why this kind cannot take ``dataset`` (None: it can)."""
        return None

    @classmethod
    def build(cls, options, dataset, basis: str, basis_kwargs: dict | None) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict) -> nn.Module:
        """Rebuild (with fresh dense sources) from the model's ``config()``."""
        raise NotImplementedError

    @classmethod
    def arch(cls, config: dict) -> str:
        """The architecture as written in a results row."""
        raise NotImplementedError

    @classmethod
    def pretrained(cls, options) -> nn.Module | None:
        """The base model as given (no training), or None: the runner trains it (every built-in kind)."""
        return None

    @classmethod
    def group_options(cls, options: dict) -> dict:
        """The options that make two rows' models different (the report averages seeds only over rows
        with equal ones): all of them, except where a kind says otherwise."""
        return options

    @classmethod
    def provenance(cls, options) -> dict:
        """Columns a results row records about where its base model came from."""
        return {}


@dataclass
class KANOptions:
    hidden: list[int] | None = field(default=None, metadata={
        "min": 1, "help": "hidden widths; default: the dataset's default_hidden"})


@register_model("kan")
class KANModel(ModelKind):
    """Fully connected KAN: the dataset's inputs flattened, ``hidden`` widths, its outputs."""

    Options = KANOptions

    @classmethod
    def build(cls, options, dataset, basis, basis_kwargs):
        hidden = options.hidden if options.hidden is not None else list(dataset.default_hidden)
        return KAN([dataset.in_features, *hidden, dataset.n_outputs], basis, basis_kwargs)

    @classmethod
    def from_config(cls, config):
        return KAN(config["widths"], config["basis"], config.get("basis_kwargs"), bias=config.get("bias", True),
                   norms=config.get("norms", "none"), acts=config.get("acts", "none"))

    @classmethod
    def arch(cls, config):
        return "kan[" + ",".join(map(str, config["widths"])) + "]"


@dataclass
class ConvKANOptions:
    channels: list[int] = field(default_factory=lambda: [8, 16], metadata={"min": 1, "help": "conv channels"})
    kernel: int = field(default=3, metadata={"min": 1})
    pool_every: int = field(default=1, metadata={"min": 0, "help": "2x2 max-pool after every N conv layers (0: never)"})
    strides: list[int] | None = field(default=None, metadata={"min": 1, "help": "one stride per layer; default 1"})
    norm: str = field(default="batch", metadata={"choices": list(NORMS),
                                                 "help": "normalisation after each KAN convolution"})

    def validate(self):
        if self.strides is not None and len(self.strides) != len(self.channels):
            raise UserError(f"model 'convkan' needs one stride per layer ({len(self.channels)}); got {self.strides}")


@register_model("convkan")
class ConvKANModel(ModelKind):
    """KAN convolutions (``channels``), global average pooling, one KAN layer to the outputs."""

    Options = ConvKANOptions
    convolutional = True

    @classmethod
    def incompatibility(cls, dataset):
        if not dataset.is_image:
            return (f"model 'convkan' needs an image dataset; {dataset.name!r} has input shape "
                    f"{tuple(dataset.input_shape)}")
        return None

    @classmethod
    def build(cls, options, dataset, basis, basis_kwargs):
        if (why := cls.incompatibility(dataset)) is not None:
            raise UserError(why)
        return ConvKAN(tuple(dataset.input_shape), dataset.n_outputs, options.channels, options.kernel,
                       options.pool_every, basis, basis_kwargs, strides=options.strides, norm=options.norm)

    @classmethod
    def from_config(cls, config):
        return ConvKAN(tuple(config["input_shape"]), config["n_outputs"], config["channels"], config["kernel"],
                       config["pool_every"], config["basis"], config.get("basis_kwargs"),
                       strides=config.get("strides"), norm=config.get("norm", "none"),  # files before norm: none
                       **{k: config[k] for k in CONVKAN_OPTIONS if k in config})

    @classmethod
    def arch(cls, config):
        norm = config.get("norm", "none")
        return "convkan[" + ",".join(map(str, config["channels"])) + f"]->{config['n_outputs']}" + \
            ("" if norm == "none" else f",{norm}norm")


# -- what the rest of the harness calls ------------------------------------------------------
def model_options(name: str, options: dict | None):
    return MODELS.lookup(name).options(options)


def incompatibility(name: str, dataset) -> str | None:
    """Why model ``name`` cannot take ``dataset`` (None: it can)."""
    return MODELS.lookup(name).incompatibility(dataset)


def compatible(name: str, dataset) -> bool:
    return incompatibility(name, dataset) is None


def build(name: str, options, dataset, basis: str, basis_kwargs: dict | None) -> nn.Module:
    return MODELS.lookup(name).build(options, dataset, basis, basis_kwargs)


def kind_of(model: nn.Module) -> type[ModelKind]:
    """The registered kind of a built model (from its ``config()``)."""
    return MODELS.lookup(model.config()["model"])


def from_config(config: dict) -> nn.Module:
    """Rebuild a model (with fresh dense sources) from its ``config()``."""
    return MODELS.lookup(config["model"]).from_config(config)


def arch_string(model: nn.Module) -> str:
    return kind_of(model).arch(model.config())
