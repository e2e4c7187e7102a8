"""KAN compression benchmark harness.

The packages are the architecture's layers, each importing only the ones below it:

- :mod:`bench.model` — the KAN: bases, swappable edge sources, layers, model kinds;
- :mod:`bench.data` — the dataset registry and splits;
- :mod:`bench.compression` — the method interface, pipelines, the compressed sources and their
  mechanisms, storage accounting and the model file;
- :mod:`bench.interop` — models trained by other KAN libraries, imported exactly;
- :mod:`bench.run` — sweep files → plan → runner → results, executors, training, estimates, perf;
- :mod:`bench.report` — leaderboards, tables and figures;
- :mod:`bench.cli` — the ``python -m bench`` commands; :func:`bench.compress` (:mod:`bench.api`) — one
  model compressed in one call, on the runner's code path.

Module paths from before the split keep working (``from bench.kan import KAN``,
``bench.storage.load_model``, ``from bench.methods import Method``): each old name is the *same*
module object as its new home (:data:`MOVED`), loaded on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

MOVED = {  # old module path -> where it lives now
    "bench.kan": "bench.model.kan", "bench.bases": "bench.model.bases", "bench.sources": "bench.model.sources",
    "bench.models": "bench.model.kinds",
    "bench.codebook": "bench.compression.codebook", "bench.entropy": "bench.compression.entropy",
    "bench.generated": "bench.compression.generated", "bench.pruning": "bench.compression.pruning",
    "bench.quant": "bench.compression.quant", "bench.ptq": "bench.compression.ptq",
    "bench.mixed_precision": "bench.compression.mixed_precision",
    "bench.tucker_factors": "bench.compression.tucker_factors",
    "bench.storage": "bench.compression.storage", "bench.methods": "bench.compression.methods",
    "bench.pipeline": "bench.compression.pipeline", "bench.imagedata": "bench.data.images",
    "bench.sweep": "bench.run.sweep", "bench.plan": "bench.run.plan", "bench.runner": "bench.run.runner",
    "bench.results": "bench.run.results", "bench.executors": "bench.run.executors", "bench.lock": "bench.run.lock",
    "bench.merge": "bench.run.merge", "bench.estimate": "bench.run.estimate", "bench.train": "bench.run.train",
    "bench.transfer": "bench.run.transfer", "bench.perf": "bench.run.perf",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module at its new one (one object under two names)."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._real_spec  # the import system stamped the alias's spec on it


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str):
    if name in ("compress", "Compressed"):  # loaded on first use: ``import bench`` stays light
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
