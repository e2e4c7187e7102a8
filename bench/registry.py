"""Plugin loading and the registries of methods and datasets.

``methods/`` and ``datasets/`` are plugin folders: every ``*.py`` file in them is loaded by path
(not imported as a top-level package, so a ``datasets`` folder never shadows Hugging Face's
``datasets`` library). A plugin registers what it defines with ``@register_method`` /
``@register_dataset``; ``--plugin PATH`` loads more files (or folders) from anywhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from .errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIRS = [REPO_ROOT / "methods", REPO_ROOT / "datasets"]

_loaded: set[Path] = set()


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
    except UserError:
        raise
    except Exception as exc:
        _loaded.discard(path)
        sys.modules.pop(mod_name, None)
        raise UserError(f"plugin {path} failed to load: {type(exc).__name__}: {exc}") from exc


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
