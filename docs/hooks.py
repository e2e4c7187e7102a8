"""mkdocs hooks: the pages that must not drift from the code are generated at build time.

- ``methods/<name>.md``, one per registered method, and ``methods/index.md``: each method file's own
  docstring (its recipe and what it stores), its hyperparameters with defaults, limits and help (the
  same table ``python -m bench list`` prints), its sweep grid and its test config, read from
  ``bench.compression.methods.METHODS`` after loading the plugin folders.
- ``reports/**``: the committed reference results (leaderboards, figures, interactive pages) served as
  they are, so the docs link to the real files rather than copies.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
REPORT_SUFFIXES = {".md", ".png", ".html", ".csv"}


def _method_page(name: str, cls) -> str:
    from bench.config import describe

    module = sys.modules[cls.__module__]
    path = Path(inspect.getfile(cls)).resolve().relative_to(ROOT)
    recipe = re.sub(r":(?:mod|class|func|meth|data|attr):", "", inspect.cleandoc(module.__doc__ or cls.__doc__ or ""))
    lines = [f"# `{name}`", "", f"*{(cls.__doc__ or '').strip().splitlines()[0]}*" if cls.__doc__ else "", "",
             f"Defined in `{path}`: the whole recipe is that one file.", "", "## Recipe", "", recipe, "",
             "## Hyperparameters", "", "| option | type | default | notes |", "|---|---|---|---|"]
    for opt, tp, default, help_ in describe(cls.Config):
        lines.append(f"| `{opt}` | `{tp}` | `{default!r}` | {help_.replace('|', '/')} |")
    if not list(describe(cls.Config)):
        lines.append("| (none) | | | |")
    lines += ["", "## Sweep grid (`--grid`)", ""]
    lines += [f"- `{k}`: `{v}`" for k, v in cls.grid.items()] or ["None declared: the defaults above."]
    lines += ["", "## How it runs", "",
              f"- trains its own model from scratch: **{'yes' if cls.trains_own_model() else 'no'}** "
              "(otherwise it compresses the sweep's dense base)",
              f"- fine-tunes with the shared budget: **{'yes' if cls.uses_finetune else 'no'}**",
              f"- only as a pipeline's later stage: **{'yes' if cls.needs_previous_stage else 'no'}**",
              f"- tests run it with: `{cls.test_config or {}}`", ""]
    return "\n".join(lines)


def _methods():
    sys.path.insert(0, str(ROOT))
    from bench.compression.methods import METHODS
    from bench.registry import load_plugins

    load_plugins()
    return METHODS, sorted(n for n, c in METHODS.items() if not getattr(c, "test_only", False))


def on_config(config):
    """The Methods section of the navigation: the index, then one page per registered method."""
    _, names = _methods()
    for i, entry in enumerate(config["nav"]):
        if isinstance(entry, dict) and entry.get("Methods") == "methods/index.md":
            config["nav"][i] = {"Methods": ["methods/index.md", *(f"methods/{n}.md" for n in names)]}
    return config


def on_files(files, config):
    METHODS, names = _methods()
    index = ["# Methods", "", "One file each under `methods/`; these pages are generated from those files "
             "when the site is built, so they cannot drift from the code.", "", "| method | what it is |", "|---|---|"]
    for name in names:
        cls = METHODS[name]
        first = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        index.append(f"| [`{name}`]({name}.md) | {first} |")
        files.append(File.generated(config, f"methods/{name}.md", content=_method_page(name, cls)))
    files.append(File.generated(config, "methods/index.md", content="\n".join(index) + "\n"))
    for path in sorted((ROOT / "reports").rglob("*")):
        # a report folder's README.md is for someone browsing the repository (a site would make it the
        # folder's index.html, over the report's interactive page); the docs pages say the same
        if path.is_file() and path.suffix in REPORT_SUFFIXES and path.name != "README.md":
            uri = path.relative_to(ROOT).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
