"""Plugin loading and the registries of methods and datasets.

``methods/`` and ``datasets/`` are plugin folders: every ``*.py`` file in them is loaded by path
(not imported as a top-level package, so a ``datasets`` folder never shadows Hugging Face's
``datasets`` library). A plugin registers what it defines with ``@register_method`` /
``@register_dataset``; ``--plugin PATH`` loads more files (or folders) from anywhere.

Every registry (methods, datasets, bases, sources) adds names through :func:`register`: a name
registered again from a *different* file is a :class:`UserError` naming both files (a plugin never
silently replaces a built-in); the same file registering again (a re-import) is idempotent.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from .errors import UserError, unknown

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIRS = [REPO_ROOT / "methods", REPO_ROOT / "datasets"]

_loaded: set[Path] = set()


def defining_file(obj) -> str:
    """The resolved path of the file that defines ``obj`` (its module's name if it has no file)."""
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    file = getattr(module, "__file__", None)
    return str(Path(file).resolve()) if file else str(getattr(obj, "__module__", "?"))


class Registry(dict):
    """Name -> registered class, for one kind of plugin (``method``, ``dataset``, ``basis``,
    ``source``, ``model``): the one registry type of the harness.

    It is a ``dict`` (``name in R``, ``R[name]``, ``sorted(R)``), plus:

    - :meth:`register` — the decorator plugins use (``@METHODS.register("kmeans")``); it sets the
      class's ``name`` and refuses a name already registered by a *different* file
      (:class:`UserError` naming both files), while the same file registering again (a re-import)
      is idempotent;
    - :meth:`lookup` — ``R[name]`` or one :class:`UserError` line listing the valid names.
    """

    def __init__(self, kind: str, hint: str = ""):
        super().__init__()
        self.kind = kind
        self.hint = hint  # appended to the unknown-name error (e.g. how to load a plugin)
        self._origins: dict[str, str] = {}

    def add(self, name: str, obj) -> None:
        file = defining_file(obj)
        old = self._origins.get(name)
        if name in self and old is not None and old != file:
            raise UserError(f"{self.kind} {name!r} is registered twice: by {old} and by {file}; "
                            "give the new one another name")
        self[name] = obj
        self._origins[name] = file

    def register(self, name: str | None = None, set_name: bool = True):
        """Class decorator registering under ``name`` (default: the class's own name)."""

        def deco(obj):
            key = name if name is not None else obj.__name__
            if set_name:
                obj.name = key
            self.add(key, obj)
            return obj

        return deco

    def lookup(self, name: str):
        if name not in self:
            raise unknown(self.kind, name, self, self.hint)
        return self[name]


def _plugin_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.glob("*.py") if not p.name.startswith("_"))
    if path.is_file() and path.suffix == ".py":
        return [path]
    raise UserError(f"plugin path {str(path)!r} is not a .py file or a folder of them")


def load_plugin_file(path: Path) -> None:
    path = path.resolve()
    if path in _loaded:
        return
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    mod_name = f"bench_plugins.{path.parent.name}.{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    _loaded.add(path)
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        _loaded.discard(path)
        sys.modules.pop(mod_name, None)
        if isinstance(exc, UserError) or not isinstance(exc, Exception):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"plugin {path} failed to load: {type(exc).__name__}: {first}") from exc


def load_plugins(extra: list[str | Path] | tuple = ()) -> None:
    """Load the bundled plugin folders, then every extra file or folder given."""
    missing = [str(d) for d in PLUGIN_DIRS if not d.is_dir()]
    if missing:
        raise UserError(f"bundled plugin folders not found ({', '.join(missing)}): the harness runs from a "
                        "checkout; install it with `pip install -e .` from the repository root")
    for d in PLUGIN_DIRS:
        for f in _plugin_files(d):
            load_plugin_file(f)
    for p in extra:
        p = Path(p)
        if not p.exists():
            raise UserError(f"plugin path {str(p)!r} does not exist")
        for f in _plugin_files(p):
            load_plugin_file(f)
