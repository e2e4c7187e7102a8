"""Model specs: how a sweep's model name and options become a KAN for a given dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .config import build_config
from .errors import UserError, unknown
from .kan import KAN, ConvKAN


@dataclass
class KANOptions:
    hidden: list[int] | None = field(default=None, metadata={
        "min": 1, "help": "hidden widths; default: the dataset's default_hidden"})


@dataclass
class ConvKANOptions:
    channels: list[int] = field(default_factory=lambda: [8, 16], metadata={"min": 1, "help": "conv channels"})
    kernel: int = field(default=3, metadata={"min": 1})
    pool_every: int = field(default=1, metadata={"min": 1, "help": "2x2 max-pool after every N conv layers"})


MODELS: dict[str, type] = {"kan": KANOptions, "convkan": ConvKANOptions}


def model_options(name: str, options: dict | None):
    if name not in MODELS:
        raise unknown("model", name, MODELS)
    return build_config(MODELS[name], options, f"model {name!r}")


def incompatibility(name: str, dataset) -> str | None:
    """Why model ``name`` cannot take ``dataset`` (None: it can)."""
    if name == "convkan" and not dataset.is_image:
        return (f"model 'convkan' needs an image dataset; {dataset.name!r} has input shape "
                f"{tuple(dataset.input_shape)}")
    return None


def compatible(name: str, dataset) -> bool:
    return incompatibility(name, dataset) is None


def build(name: str, options, dataset, basis: str, basis_kwargs: dict | None) -> nn.Module:
    if name == "kan":
        hidden = options.hidden if options.hidden is not None else list(dataset.default_hidden)
        return KAN([dataset.in_features, *hidden, dataset.n_outputs], basis, basis_kwargs)
    if name == "convkan":
        if (why := incompatibility(name, dataset)) is not None:
            raise UserError(why)
        return ConvKAN(tuple(dataset.input_shape), dataset.n_outputs, options.channels, options.kernel,
                       options.pool_every, basis, basis_kwargs)
    raise unknown("model", name, MODELS)


def arch_string(model: nn.Module) -> str:
    cfg = model.config()
    if cfg["model"] == "kan":
        return "kan[" + ",".join(map(str, cfg["widths"])) + "]"
    return "convkan[" + ",".join(map(str, cfg["channels"])) + f"]->{cfg['n_outputs']}"
