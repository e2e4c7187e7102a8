"""The leaderboard, one module per job:

* :mod:`~bench.report.numbers`: runs -> operating points, and every decision (tolerance on validation,
  rankings, Pareto frontiers, each method's smallest point within an accuracy budget);
* :mod:`~bench.report.tables`: formatting, the markdown tables, the headline and its plain-words summary;
* :mod:`~bench.report.plots`: the static seaborn PNGs; :mod:`~bench.report.claims`: the papers' claims;
* :mod:`~bench.report.transfer`: the LoTRA transfer section;
* :mod:`~bench.report.html`: the self-contained interactive ``index.html`` (plotly, sortable tables);
* :mod:`~bench.report.leaderboard`: writes it all; :mod:`~bench.report.cli`: from a results folder.

The report reads only the rows (``metric_direction``, ``method_config_nondefault`` and the rest); it
never loads a plugin.
"""

import importlib

# Imported on first use, so ``bench run`` does not pay for matplotlib and seaborn before its first run.
_WHERE = {"report_folder": "cli", "write_report": "leaderboard", "aggregate": "numbers", "compact_config": "numbers",
          "config_labels": "numbers", "pareto_front": "numbers", "smallest_within": "numbers",
          "within_tolerance": "numbers", "_decimals": "tables", "fmt_mean_std": "tables",
          "transfer_section": "transfer", "write_transfer_report": "transfer"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
