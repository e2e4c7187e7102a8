"""Bring your own KAN: exact import of models trained by other KAN libraries.

:func:`import_model` turns a library's ``state_dict`` (or a live module of that library, recognised
by its class without importing the library) into a project model (:class:`bench.model.kan.KAN` or
:class:`~bench.model.kan.ConvKAN`) that computes the same function, so every method compresses it.
One module per library says its forward, its exact mapping and what it refuses:

- ``efficient-kan`` (:mod:`bench.interop.efficient_kan`): ``KAN``, ``KANLinear``;
- ``fast-kan`` (:mod:`bench.interop.fast_kan`): ``FastKAN``, ``FastKANLayer``;
- ``pykan`` (:mod:`bench.interop.pykan`): ``KAN`` / ``MultKAN``, also from ``saveckpt`` files;
- ``torch-conv-kan`` (:mod:`bench.interop.torch_conv_kan`): ``SimpleConvKAGN``, ``KAGNConv2DLayer``,
  ``KAGN``;
- ``ChebyKAN`` (:mod:`bench.interop.chebykan`): ``nn.Sequential`` of ``ChebyKANLayer`` and
  ``LayerNorm``, or one ``ChebyKANLayer``.

An import is proven by outputs, not by shapes: :func:`check_outputs` compares the project model with
the library's recorded ``y`` (``python -m bench import`` prints it). What has no exact mapping is
refused with one :class:`~bench.errors.UserError` line naming it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from . import chebykan, efficient_kan, fast_kan, pykan, torch_conv_kan
from .common import DTYPE, Refused

LIBRARIES = {m.LIBRARY: m for m in (efficient_kan, fast_kan, pykan, torch_conv_kan, chebykan)}
_ALIASES = {name.lower().replace("_", "-"): name for name in LIBRARIES} | {
    "fastkan": "fast-kan", "kagn": "torch-conv-kan"}


def library_module(library: str):
    """The importer module of ``library`` (case and ``-``/``_`` do not matter), or one refusal line."""
    key = _ALIASES.get(str(library).lower().replace("_", "-"), _ALIASES.get(str(library).lower()))
    if key is None:
        raise Refused(f"unknown library {library!r}; valid: {', '.join(sorted(LIBRARIES))}")
    return LIBRARIES[key]


def class_name(model_class: str | None, lib) -> str:
    """The class an import builds: its dotted path or bare name (``"kan.KAN (= kan.MultKAN.MultKAN)"``
    reads as ``KAN``); ``None`` is the library's main model class."""
    if model_class is None:
        return lib.MAIN_CLASS
    name = str(model_class).split(" (", 1)[0].strip().rsplit(".", 1)[-1]
    if name not in lib.CLASSES:
        raise Refused(f"{lib.LIBRARY} class {model_class!r} has no importer; valid: {', '.join(sorted(lib.CLASSES))}")
    return name


def recognise(module: nn.Module):
    """(library module, class name) of a live module of one of the libraries, or None."""
    name, where = type(module).__name__, type(module).__module__
    for lib in LIBRARIES.values():
        prefixes = lib.MODULE_PREFIX if isinstance(lib.MODULE_PREFIX, tuple) else (lib.MODULE_PREFIX,)
        if name in lib.CLASSES and any(where == p or where.startswith(p + ".") for p in prefixes):
            return lib, name
    if isinstance(module, nn.Sequential) and any(type(m).__name__ == "ChebyKANLayer" for m in module):
        return chebykan, "Sequential"
    return None


def import_model(state_dict: Mapping[str, torch.Tensor] | nn.Module, library: str | None = None,
                 constructor: dict | None = None, model_class: str | None = None, *,
                 dtype: torch.dtype = torch.float32, input_shape: tuple[int, int, int] | None = None) -> nn.Module:
    """A project model computing what the library's model computes.

    ``state_dict``: the library model's ``state_dict()``, or the live module itself (then ``library``,
    ``constructor`` and ``model_class`` are read from it). ``constructor``: the class's keyword
    arguments as plain values (a ``torch.nn`` class as its dotted name), as the interop fixtures hold
    them; what the state_dict already says (shapes, grids) may be left out. ``model_class``: dotted or
    bare class name; ``None`` is the library's main class. Scales are folded into the edge vectors in
    float64 and the model is returned in ``dtype``, in eval mode. ``input_shape`` ``(C, H, W)`` for the
    convolutional classes (only flat inputs need it; default ``(C, 32, 32)``).
    """
    if isinstance(state_dict, nn.Module):
        found = recognise(state_dict)
        if found is None:
            raise Refused(f"{type(state_dict).__module__}.{type(state_dict).__name__} is not a class of a supported "
                          f"library ({', '.join(sorted(LIBRARIES))})")
        lib, name = found
        constructor = {**lib.describe_live(state_dict), **(constructor or {})}
        state = state_dict.state_dict()
    else:
        if library is None:
            raise Refused("import_model needs library= for a bare state_dict; valid: " + ", ".join(sorted(LIBRARIES)))
        lib = library_module(library)
        name, state = class_name(model_class, lib), state_dict
    if not isinstance(state, Mapping):
        raise Refused(f"{lib.LIBRARY}: expected a state_dict (a mapping of tensors), got {type(state).__name__}")
    fn = lib.CLASSES[name]
    kwargs = {"input_shape": input_shape} if name in getattr(lib, "TAKES_INPUT_SHAPE", ()) else {}
    token = DTYPE.set(dtype)
    try:
        model = fn(state, dict(constructor or {}), **kwargs)
    finally:
        DTYPE.reset(token)
    model.imported_from = {"library": lib.LIBRARY, "class": name}
    return model.to(dtype).eval()


# -- files ------------------------------------------------------------------------------------------
FIXTURE_KEYS = ("library", "state_dict")


def read_import_file(path: str | Path, library: str | None = None, constructor: dict | None = None,
                     model_class: str | None = None) -> dict:
    """What ``python -m bench import`` reads: a file in the interop fixtures' format (a dict with
    ``library``, ``model_class``, ``constructor``, ``state_dict`` and optionally ``x``, ``y``,
    ``y_float64``: it describes itself), a bare ``state_dict`` (``library`` needed), or pykan's
    ``saveckpt`` prefix (``PREFIX_config.yml`` + ``PREFIX_state``). Returns a dict with ``state_dict``,
    ``library``, ``model_class``, ``constructor``, ``x``/``y``/``y_float64`` where present and
    ``sha256`` of the file read. Flags given override what the file says."""
    path = Path(path)
    if not path.exists() and Path(str(path) + "_state").is_file():  # pykan's saveckpt prefix
        state, ctor = pykan.read_saveckpt(path)
        digest = hashlib.sha256(Path(str(path) + "_state").read_bytes()).hexdigest()
        return {"state_dict": state, "library": "pykan", "model_class": model_class, "sha256": digest,
                "constructor": {**ctor, **(constructor or {})}}
    if not path.is_file():
        raise Refused(f"{path}: no such file (nor pykan saveckpt files {path}_config.yml / {path}_state)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one that needs pickled classes
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise Refused(f"{path}: not a torch file of tensors and plain values ({type(exc).__name__}: {first})") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if isinstance(obj, Mapping) and all(k in obj for k in FIXTURE_KEYS):
        out = {"state_dict": obj["state_dict"], "library": library or obj["library"],
               "model_class": model_class or obj.get("model_class"),
               "constructor": {**dict(obj.get("constructor") or {}), **(constructor or {})}, "sha256": digest}
        out.update({k: obj[k] for k in ("x", "y", "y_float64") if k in obj})
        return out
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if library is None:
            raise Refused(f"{path} is a bare state_dict: say which library made it with --from "
                          f"({', '.join(sorted(LIBRARIES))})")
        return {"state_dict": obj, "library": library, "model_class": model_class, "constructor": constructor or {},
                "sha256": digest}
    raise Refused(f"{path}: neither a state_dict nor an interop file (a dict with {', '.join(FIXTURE_KEYS)})")


@torch.no_grad()
def check_outputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest |model(x) - y| (in the model's dtype)."""
    dtype = next(model.parameters()).dtype
    out = model(x.to(dtype))
    if out.shape != y.shape:
        raise Refused(f"the imported model gives outputs of shape {list(out.shape)}, the file's y is {list(y.shape)}")
    return float((out - y.to(dtype)).abs().max())
