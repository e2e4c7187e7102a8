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

from .cli import report_folder
from .leaderboard import write_report
from .numbers import aggregate, compact_config, config_labels, pareto_front, smallest_within, within_tolerance
from .tables import _decimals, fmt_mean_std
from .transfer import transfer_section, write_transfer_report

__all__ = ["_decimals", "aggregate", "compact_config", "config_labels", "fmt_mean_std", "pareto_front",
           "report_folder", "smallest_within", "transfer_section", "within_tolerance", "write_report",
           "write_transfer_report"]
