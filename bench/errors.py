"""User-facing errors.

Anything a user can get wrong (an unknown name, a bad hyperparameter, data that is missing
offline) raises :class:`UserError`. The CLI turns it into one line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """A mistake in what the user asked for; the message is one line naming the fix."""


def unknown(kind: str, name: object, valid, hint: str = "") -> UserError:
    """The standard 'unknown X' error, listing what is valid (and ``hint``, if any)."""
    choices = ", ".join(sorted(str(v) for v in valid)) or "(none registered)"
    return UserError(f"unknown {kind} {name!r}; valid: {choices}" + (f"; {hint}" if hint else ""))


class Infeasible(Exception):
    """A configuration that cannot be met on this model (a pruning budget below the smallest
    connected model, a codebook larger than the edges it clusters, a Tucker rank above its mode).

    Not a user mistake in the sweep file's syntax and not a failure: the runner records the run
    with ``status = "infeasible"`` and this message as the reason, and a rerun does not retry it.
    """


def warn_stderr(message: str) -> None:
    """One ``warning:`` line on stderr (what the harness says about a run without stopping it)."""
    print(f"warning: {message}", file=sys.stderr)
