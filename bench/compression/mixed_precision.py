"""Mixed precision: per-unit bit widths under a total-bits budget, from a measured sensitivity.

A *unit* is one branch of one KAN layer (the whole edge vector, or with branch-aware
quantisation the basis coefficients and the base-branch weight separately). For every unit and
candidate width the sensitivity is the mean squared change of the model's outputs when that unit
alone is quantised (round to nearest on its calibrated grid) and everything else stays float32,
measured on a calibration batch of *training* inputs (never validation or test). Its cost is the
unit's exact stored bits at that width (codes, scales, zero points, width). Widths are then
allocated greedily, HAWQ-style: start every unit at its widest width and repeatedly narrow the
unit whose next step down adds the least sensitivity per bit saved, until the model fits the
budget; then widen any unit the leftover bits still pay for, most sensitivity removed per bit first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bench.errors import Infeasible


@torch.no_grad()
def output_sensitivity(model: nn.Module, x: torch.Tensor, apply: Callable[[], Callable[[], None]]) -> float:
    """Mean squared output change on ``x`` while ``apply()`` has modified the model; ``apply``
    returns the function that undoes its change."""
    was = model.training
    model.eval()
    ref = model(x)
    undo = apply()
    try:
        out = model(x)
    finally:
        undo()
        model.train(was)
    return float(((out - ref) ** 2).mean())


def allocate_widths(costs: dict, sens: dict, budget: float) -> dict:
    """Widths per unit. ``costs[unit][width]`` stored bits, ``sens[unit][width]`` sensitivity,
    ``budget`` total bits. Raises :class:`Infeasible` when even the narrowest widths exceed it."""
    widths = {u: sorted(costs[u]) for u in costs}
    smallest = sum(costs[u][widths[u][0]] for u in costs)
    if smallest > budget:
        raise Infeasible(f"mixed precision cannot meet {budget:,.0f} bits: every unit at its narrowest width "
                         f"({', '.join(str(w[0]) for w in widths.values())} bits) stores {smallest:,} bits")
    pick = {u: widths[u][-1] for u in costs}

    def total():
        return sum(costs[u][pick[u]] for u in costs)

    while total() > budget:  # narrow: least added sensitivity per saved bit
        moves = []
        for u in costs:
            i = widths[u].index(pick[u])
            if i > 0:
                lo = widths[u][i - 1]
                saved = costs[u][pick[u]] - costs[u][lo]
                moves.append(((sens[u][lo] - sens[u][pick[u]]) / max(saved, 1), u, lo))
        _, u, lo = min(moves, key=lambda m: (m[0], str(m[1])))
        pick[u] = lo
    while True:  # widen what the leftover bits pay for: most removed sensitivity per added bit
        moves = []
        for u in costs:
            i = widths[u].index(pick[u])
            if i + 1 < len(widths[u]):
                hi = widths[u][i + 1]
                added = costs[u][hi] - costs[u][pick[u]]
                if total() + added <= budget and sens[u][hi] < sens[u][pick[u]]:
                    moves.append(((sens[u][hi] - sens[u][pick[u]]) / max(added, 1), u, hi))
        if not moves:
            return pick
        _, u, hi = min(moves, key=lambda m: (m[0], str(m[1])))
        pick[u] = hi
