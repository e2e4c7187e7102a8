"""What every importer shares: reading a library's state_dict with one-line refusals, and writing
folded edge tensors into a freshly built project model."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar

import torch
from torch import nn

from bench.errors import UserError
from bench.model.kan import KANLayer


class Refused(UserError):
    """An import that has no exact mapping, or inputs that do not fit: one line, nothing written."""


class StateReader:
    """A library's ``state_dict`` as the importer reads it: every tensor in float64 (the scales are
    folded into the edge vector in float64, then rounded once to the model's dtype), a missing key or
    a wrong shape refused in one line naming the model, and keys nobody read refused at the end."""

    def __init__(self, state: Mapping[str, torch.Tensor], what: str):
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise Refused(f"{what}: state_dict entries are not tensors: {bad[:3]}")
        self.state, self.what, self.read = dict(state), what, set()

    def has(self, key: str) -> bool:
        return key in self.state

    def get(self, key: str, shape: tuple | None = None) -> torch.Tensor:
        if key not in self.state:
            raise Refused(f"state_dict does not fit {self.what}: it has no {key!r}")
        t = self.state[key]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise Refused(f"state_dict does not fit {self.what}: {key!r} is {list(t.shape)}, expected {list(shape)}")
        self.read.add(key)
        return t.detach().to(torch.float64) if t.is_floating_point() else t.detach()

    def keys_under(self, prefix: str) -> list[str]:
        return [k for k in self.state if k.startswith(prefix)]

    def numbered(self, root: str) -> list[str]:
        """The prefixes ``root0.``, ``root1.``, ... of a numbered module list (``layers.``), in order;
        one refusal line if there is none."""
        n = len({k[len(root):].split(".")[0] for k in self.keys_under(root)})
        if n == 0:
            raise Refused(f"state_dict does not fit {self.what}: no {root}N.* tensors")
        return [f"{root}{i}." for i in range(n)]

    def ignore(self, *keys: str) -> None:
        """Keys the forward never reads (buffers such as ChebyKAN's ``arange``, BatchNorm's counter)."""
        self.read.update(k for k in keys if k in self.state)

    def done(self) -> None:
        left = sorted(set(self.state) - self.read)
        if left:
            raise Refused(f"state_dict does not fit {self.what}: unexpected keys {left[:4]}"
                          + (f" and {len(left) - 4} more" if len(left) > 4 else ""))


def option(constructor: Mapping, key: str, default, what: str, allowed=None):
    """A constructor argument (plain value), checked against ``allowed`` values where given."""
    value = constructor.get(key, default)
    if allowed is not None and value not in allowed:
        raise Refused(f"{what}: {key}={value!r} has no exact mapping (supported: "
                      f"{', '.join(repr(a) for a in allowed)})")
    return value


def silu_only(constructor: Mapping, key: str, what: str, default_ok: bool = True) -> None:
    """Refuse a base activation other than SiLU (it is a constructor argument, not in the state_dict)."""
    act = constructor.get(key)
    if act is None and default_ok:
        return
    name = act if isinstance(act, str) else getattr(act, "__name__", type(act).__name__)
    if name.rsplit(".", 1)[-1].lower() != "silu":
        raise Refused(f"{what}: {key}={name!r} has no exact mapping (the project's base branch is SiLU)")


@torch.no_grad()
def set_edges(layer: KANLayer, edges: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Write a folded ``[out, in, n_basis + 1]`` edge tensor (and the bias) into a dense layer."""
    w = layer.source.weight
    if tuple(edges.shape) != tuple(w.shape):
        raise AssertionError(f"edge tensor {list(edges.shape)} for a layer of {list(w.shape)}")
    w.copy_(edges.to(w.dtype))
    if bias is not None:
        layer.bias.copy_(bias.to(layer.bias.dtype))


@torch.no_grad()
def copy_into(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Copy ``value`` into ``module``'s parameter or buffer ``name`` (shapes must agree)."""
    t = dict(module.named_parameters()) | dict(module.named_buffers())
    t[name].copy_(value.to(t[name].dtype))


DTYPE: ContextVar[torch.dtype] = ContextVar("import_dtype", default=torch.float32)


def build(factory):
    """Build a project model in the import's dtype (:data:`DTYPE`, so float64 folds are not rounded
    through float32), without touching the caller's random state (every initial value is overwritten)."""
    with torch.random.fork_rng(devices=[]):
        return factory().to(DTYPE.get())
